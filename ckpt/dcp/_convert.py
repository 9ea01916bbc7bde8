"""Offline conversion from and to a torch.distributed.checkpoint (DCP) directory.

* ``import_dcp``: a DCP checkpoint directory becomes a ckpt checkpoint. DCP's ``.metadata``
  is a pickle, read with torch's own reader; DCP's pickled non-tensor values are loaded
  only when asked (``torch.load(weights_only=True)``). The tree is rebuilt from DCP's keys
  by ``rebuild_tree``, as ``Writer`` does for a save in progress. Tensors are read one
  batch of about ``batch_bytes`` at a time.
* ``export_dcp``: a ckpt step becomes a DCP directory that plain ``dcp.load`` reads; the
  whole state is held in memory, by the nature of ``dcp.save``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from ckpt._api import first_loadable
from ckpt._open import open_url
from ckpt._read import read_manifest_tree
from ckpt.convert import ConvertResult, OfflineRanks, Progress, no_progress, split_box
from ckpt.dcp._tree import LEFT_OUT, Path, dcp_paths, encode_value, rebuild_tree
from ckpt.engine import FlatTensor, PieceInfo, SaveOptions, Snapshotter
from ckpt.errors import (
    AlreadyCommittedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidStateError,
    storage_errors,
)
from ckpt.format import TENSOR_REF, Box, Manifest, dtype_name, element_size, torch_dtype
from recovery import committed_steps
from storage_backends import StorageBackend

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DcpImportResult",
    "export_dcp",
    "import_dcp",
    "read_dcp_metadata",
]

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 1 << 30
"""Tensor bytes a DCP import holds in memory at once (one larger tensor is read alone)."""

_STEP_KEYS = ("step", "global_step")


@dataclass(frozen=True)
class DcpImportResult(ConvertResult):
    """What ``import_dcp`` wrote, and which of DCP's pickled values it imported or left out.

    Attributes:
        values: the non-tensor values imported (dotted DCP names).
        skipped: (name, why) of the non-tensor values left out.
    """

    values: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Tensor:
    """A tensor of a DCP checkpoint: its DCP name (also its ckpt name), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def import_dcp(
    src_dir: str | os.PathLike[str],
    dst: str | os.PathLike[str] | StorageBackend,
    *,
    step: int | None = None,
    world_size: int | None = None,
    trust_pickled_values: bool = False,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    options: SaveOptions | None = None,
    progress: Progress = no_progress,
) -> DcpImportResult:
    """Write the DCP checkpoint in ``src_dir`` to ``dst`` as a ckpt checkpoint.

    The tree DCP saved comes back nested as it was (``{"model": {...}, "optim": {"state":
    ..., "param_groups": [...]}}``), with the tensors whole, under the names ``ckpt.save``
    gives them; an optimizer's per-parameter state gets the integer keys DCP turned into
    strings back. Tensors are read with ``dcp.load`` on this process (no process group)
    in batches of about ``batch_bytes``, each written before the next is read.

    DCP's ``.metadata`` is a pickle: it is read with torch's own
    ``FileSystemReader.read_metadata``, so import only checkpoints you trust. DCP also
    pickles every non-tensor value (step counters, learning rates, an optimizer's
    ``param_groups``); those are left out and named in a warning and in the result,
    unless ``trust_pickled_values``: then they are loaded with
    ``torch.load(weights_only=True)`` and kept when ckpt can store them. A value left out
    of a list leaves None in its place.

    Args:
        src_dir: the DCP checkpoint directory (its ``.metadata`` and ``*.distcp`` files).
        dst: the ckpt root to write (a URL is opened once the source has been read).
        step: the step number to write; None takes the checkpoint's top-level "step" or
            "global_step" integer when one was imported, else 0.
        world_size: write the layout ``world_size`` ranks would have saved (tensors split
            along dim 0, as ``ckpt.convert.relayout`` does); None means one rank.
        trust_pickled_values: unpickle DCP's non-tensor values (with ``weights_only``).
        batch_bytes: tensor bytes read from DCP at once.
        options: the layout of the written checkpoint.
        progress: called with (bytes done, bytes total, what).

    Raises:
        CheckpointNotFoundError: ``src_dir`` holds no finished DCP checkpoint.
        CorruptCheckpointError: DCP could not read its metadata or data, or its keys do
            not form one tree.
        InvalidStateError: a tensor's dtype cannot be stored by ckpt.
        AlreadyCommittedError: ``step`` is already committed under ``dst``.
    """
    if world_size is not None and world_size < 1:
        raise ValueError("world_size must be at least 1")
    source = os.fspath(src_dir)
    metadata = read_dcp_metadata(source)
    paths = dcp_paths(metadata)
    pickled = [
        fqn
        for fqn, md in metadata.state_dict_metadata.items()
        if not isinstance(md, TensorStorageMetadata)
    ]

    values: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if trust_pickled_values:
        values, skipped = _dcp_values(source, pickled)
    else:
        skipped = dict.fromkeys(
            pickled,
            "pickled by DCP and not unpickled (pass --trust-pickled-values to load it "
            "with torch.load(weights_only=True))",
        )
    if skipped:
        log.warning(
            "DCP checkpoint %s: %d non-tensor value(s) not imported: %s",
            source,
            len(skipped),
            _listed_names(list(skipped)),
        )
    if step is None:
        step = _imported_step(values, paths)

    tensors, json_tree = _dcp_tree(metadata, paths, values, source)
    total = sum(t.nbytes for t in tensors)
    ranks = world_size or 1
    batches = _import_batches(tensors, ranks, batch_bytes)
    descriptions = [
        [
            PieceInfo(t.name, box.offsets, box.lengths, box.numel * element_size(t.dtype))
            for t, box in per_rank
            if box.numel
        ]
        for batch in batches
        for per_rank in batch.boxes
    ]
    dst = open_url(dst)
    if step in committed_steps(dst):
        raise AlreadyCommittedError(
            f"step {step} is already committed under {dst.url}: pass another --step, or "
            "another destination"
        )
    writers = OfflineRanks(ranks, descriptions)
    engine = Snapshotter(options)
    done = 0
    note = {"converted_from": f"DCP checkpoint {source}"}
    try:
        for index, batch in enumerate(batches):
            wanted = {
                t.name: torch.empty(t.shape, dtype=torch_dtype(t.dtype)) for t in batch.tensors
            }
            if wanted:
                _dcp_read(source, wanted, DefaultLoadPlanner(flatten_state_dict=False))
            for rank, per_rank in enumerate(batch.boxes):
                writers.rank = index * ranks + rank
                flat = {
                    t.name: FlatTensor(
                        t.name, _region(wanted[t.name], box), t.shape, box, False, t.dtype
                    )
                    for t, box in per_rank
                }
                # Format v1: a rank's data may come in several batches, each its own writer,
                # and v2 has one index file per rank.
                engine.save_flat(
                    flat,
                    json_tree,
                    dst,
                    step,
                    writers,
                    user_metadata=note,
                    format_version=1,
                    reuse_plan=False,
                ).result()
            done += sum(t.nbytes for t in batch.tensors)
            progress(done, total, f"batch {index + 1}/{len(batches)}")
    finally:
        engine.close()
    return DcpImportResult(
        step,
        len(tensors),
        total,
        sorted(writers.files),
        values=tuple(values),
        skipped=tuple(skipped.items()),
    )


def _dcp_tree(
    metadata: Metadata, paths: Mapping[str, Path], values: Mapping[str, Any], source: str
) -> tuple[list[_Tensor], dict[str, Any]]:
    """The tensors of a DCP checkpoint and its ckpt state tree, where ``values`` are the
    JSON of the non-tensor values kept (the others are left out)."""
    tensors: list[_Tensor] = []
    leaves: list[tuple[Path, Any]] = []
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            try:
                dtype = dtype_name(md.properties.dtype)
            except TypeError as exc:
                raise InvalidStateError(f"DCP checkpoint {source}: tensor {fqn!r}: {exc}") from exc
            tensors.append(_Tensor(fqn, tuple(int(n) for n in md.size), dtype))
            leaves.append((paths[fqn], {TENSOR_REF: fqn}))
        else:
            leaves.append((paths[fqn], values.get(fqn, LEFT_OUT)))

    def fail(message: str) -> CheckpointError:
        return CorruptCheckpointError(f"DCP checkpoint {source}: {message}")

    return tensors, rebuild_tree(leaves, fail)


@dataclass(frozen=True)
class _ImportBatch:
    """Tensors read from DCP together, and each rank's regions of them."""

    tensors: list[_Tensor]
    boxes: list[list[tuple[_Tensor, Box]]]


def _import_batches(tensors: list[_Tensor], ranks: int, limit: int) -> list[_ImportBatch]:
    """Consecutive groups of about ``limit`` bytes (a larger tensor alone), each split into
    ``ranks`` regions along dim 0; one empty batch when there are no tensors, so that a
    writer still carries the tree."""
    groups: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return [
        _ImportBatch(
            group,
            [
                [(t, b) for t in group if (b := _box_of(t.shape, ranks, r)) is not None]
                for r in range(ranks)
            ],
        )
        for group in groups
    ]


def read_dcp_metadata(src_dir: str) -> Metadata:
    """The ``.metadata`` of a DCP checkpoint directory, read by torch's ``FileSystemReader``.

    That file is a pickle: nothing else of a DCP checkpoint is unpickled unless asked for.

    Raises:
        CheckpointNotFoundError: no directory, or no ``.metadata`` in it.
        CorruptCheckpointError: torch cannot read it.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(src_dir, ".metadata")
    if not os.path.isfile(path):
        listed = os.listdir(src_dir) if os.path.isdir(src_dir) else []
        has_data = any(n.endswith(".distcp") for n in listed)
        raise CheckpointNotFoundError(
            f"{src_dir} holds no finished DCP checkpoint: "
            + (
                "its .distcp data files have no .metadata (the save never finished)"
                if has_data
                else "there is no .metadata file"
            )
        )
    try:
        metadata = FileSystemReader(src_dir).read_metadata()
    except Exception as exc:  # an unpickler raises nearly anything on a damaged file
        raise CorruptCheckpointError(
            f"{path}: torch.distributed.checkpoint cannot read it ({type(exc).__name__}: "
            f"{_first_line(exc)})"
        ) from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptCheckpointError(f"{path} is not DCP metadata ({type(metadata).__name__})")
    return metadata


class _WeightsOnlyValues(DefaultLoadPlanner):
    """Loads DCP's pickled values with ``torch.load(weights_only=True)``, recording failures
    (DCP's own planner would unpickle them with ``weights_only=False``)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, allow_partial_load=True)
        self.loaded: dict[str, Any] = {}
        self.failed: dict[str, str] = {}

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            self.loaded[fqn] = torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, EOFError) as exc:
            self.failed[fqn] = f"torch.load(weights_only=True) refused it: {_first_line(exc)}"


def _dcp_values(source: str, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """DCP's pickled values ``names``, loaded with weights_only: (the JSON of the kept ones,
    why the others were not kept)."""
    if not names:
        return {}, {}
    planner = _WeightsOnlyValues()
    _dcp_read(source, dict.fromkeys(names), planner)
    kept: dict[str, Any] = {}
    skipped = dict(planner.failed)
    for fqn in names:
        if fqn in skipped:
            continue
        if fqn not in planner.loaded:
            skipped[fqn] = "DCP did not read it"
            continue
        try:
            kept[fqn] = encode_value(fqn, planner.loaded[fqn], "ckpt cannot store it")
        except InvalidStateError as exc:
            skipped[fqn] = str(exc)
    return kept, skipped


def _dcp_read(source: str, state: dict[str, Any], planner: DefaultLoadPlanner) -> None:
    """``dcp.load`` of ``state`` (a flat dict of DCP names) on this process alone."""
    import torch.distributed.checkpoint as dcp

    try:
        with _one_process():
            dcp.load(
                state,
                storage_reader=dcp.FileSystemReader(source),
                planner=planner,
                no_dist=True,
            )
    except Exception as exc:  # DCP wraps every reader failure in its own exception type
        raise CorruptCheckpointError(
            f"reading the DCP checkpoint {source}: {_first_line(exc)}"
        ) from exc


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """DCP on this process alone, without its warning that it runs on one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _imported_step(values: Mapping[str, Any], paths: Mapping[str, Path]) -> int:
    for key in _STEP_KEYS:
        for fqn, value in values.items():
            if paths[fqn] == (key,) and type(value) is int and value >= 0:
                return value
    return 0


def _listed_names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _box_of(shape: tuple[int, ...], ranks: int, rank: int) -> Box | None:
    """Rank ``rank``'s region of a tensor split along dim 0 (a 0-d tensor: rank 0's alone)."""
    if not shape:
        return Box((), ()) if rank == 0 else None
    return split_box(shape, ranks, rank, 0)


def _region(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    if not box.offsets:
        return tensor
    return tensor.narrow(0, box.offsets[0], box.lengths[0])


def export_dcp(
    src: StorageBackend,
    dst_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    progress: Progress = no_progress,
) -> ConvertResult:
    """Write ``step`` of ``src`` (newest committed that verifies when None) as a DCP
    checkpoint that plain ``torch.distributed.checkpoint.load`` reads, on this process.

    The whole state is held in memory (``ckpt.read``'s tree), then saved with DCP's
    ``FileSystemWriter``; DCP pickles the non-tensor values, as it always does.

    Raises:
        CheckpointError: ``dst_dir`` exists and is not empty, or what ``ckpt.read`` raises.
    """
    import torch.distributed.checkpoint as dcp

    target = os.fspath(dst_dir)
    if os.path.isdir(target) and os.listdir(target):
        raise CheckpointError(
            f"{target} is not empty: a DCP export writes a new directory; give another one"
        )

    def read_one(tier: StorageBackend, manifest: Manifest) -> tuple[Manifest, dict[str, Any]]:
        return manifest, read_manifest_tree(tier, manifest)

    found, _, (manifest, tree) = first_loadable(src, step, read_one)
    total = sum(entry.nbytes for entry in manifest.tensors.values())
    progress(0, total, f"step {found} -> DCP")
    with storage_errors(f"writing the DCP checkpoint {target}"):
        os.makedirs(target, exist_ok=True)
        with _one_process():
            dcp.save(tree, storage_writer=dcp.FileSystemWriter(target), no_dist=True)
    progress(total, total, f"step {found} -> DCP")
    files = sorted(os.path.join(target, name) for name in os.listdir(target))
    return ConvertResult(found, len(manifest.tensors), total, files)

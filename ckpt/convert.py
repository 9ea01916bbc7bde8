"""Offline conversion: re-lay a checkpoint for another world size, or export it.

* ``relayout``: a new ckpt checkpoint whose tensors are split along one dimension into
  ``world_size`` pieces, as if ``world_size`` ranks had saved them (torch.chunk sizes,
  the same rule as DTensor ``Shard``), so each rank of the new job reads only its files.
* ``export_safetensors``: one consolidated safetensors file, or several with a
  Hugging Face style ``*.index.json`` when ``max_shard_bytes`` is set.
* ``export_torch``: a plain ``{name: tensor}`` dict written with ``torch.save``.
* ``import_dcp`` / ``export_dcp``: from and to a torch.distributed.checkpoint (DCP)
  directory. DCP's ``.metadata`` is a pickle, read with torch's own reader; DCP's pickled
  non-tensor values are loaded only when asked (``torch.load(weights_only=True)``).

Memory stays bounded: re-layout holds one target rank's data at a time, a DCP import one
batch of tensors, exports one tensor at a time (``export_torch`` and ``export_dcp`` hold
all of them, by their nature).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from ckpt._api import first_loadable
from ckpt._open import open_url
from ckpt._read import read_manifest_tree
from ckpt.coordination import merge_indexes, new_generation, publish
from ckpt.engine._engine import Snapshotter
from ckpt.engine._flatten import FlatTensor, flatten
from ckpt.engine._options import SaveOptions
from ckpt.engine._plan import PieceInfo
from ckpt.errors import (
    AlreadyCommittedError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    storage_errors,
)
from ckpt.format import (
    Box,
    Manifest,
    ShardIndex,
    TensorEntry,
    element_size,
    safetensors_header,
    torch_dtype,
)
from recovery import Destination, Loader, candidates, committed_steps
from storage_backends import StorageBackend

__all__ = [
    "ConvertResult",
    "DcpImportResult",
    "export_dcp",
    "export_safetensors",
    "export_torch",
    "import_dcp",
    "open_manifest",
    "read_dcp_metadata",
    "relayout",
    "split_box",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # bytes done, bytes total, what


def _no_progress(done: int, total: int, what: str) -> None:
    return None


def open_manifest(backend: StorageBackend, step: int | None) -> Manifest:
    """The manifest of ``step`` (newest committed when None), validated."""
    for candidate in candidates(backend, step):
        if candidate.manifest is not None:
            return candidate.manifest
        if step is not None and candidate.error is not None:
            raise candidate.error
    raise CheckpointError(f"no usable committed checkpoint under {backend.url}")


def split_box(shape: Sequence[int], parts: int, index: int, dim: int) -> Box:
    """Region ``index`` of ``parts`` along ``dim``.

    Sizes follow torch.chunk; trailing parts may be empty.
    """
    if not shape:
        return Box((), ())
    size = shape[dim]
    chunk = math.ceil(size / parts) if size else 0
    lo = min(size, index * chunk)
    hi = min(size, lo + chunk)
    offsets = [0] * len(shape)
    lengths = list(shape)
    offsets[dim] = lo
    lengths[dim] = hi - lo
    return Box(tuple(offsets), tuple(lengths))


def _read_region(loader: Loader, name: str, entry: TensorEntry, box: Box) -> torch.Tensor:
    tensor = torch.empty(box.lengths, dtype=torch_dtype(entry.dtype))
    if box.numel:
        loader.load([Destination(name, tensor, box)])
    return tensor


class _OfflineRanks:
    """Plays the coordinator for writers that save one after another in one process.

    There is one writer per entry of ``descriptions`` (what it holds): one per rank of a
    ``world_size`` layout, or more when each rank's data is written in several bounded
    passes. The manifest names ``world_size``; writer 0 carries the state tree.
    """

    def __init__(self, world_size: int, descriptions: list[list[PieceInfo]]) -> None:
        self._world = world_size
        self._descriptions = descriptions
        self._indexes: list[ShardIndex] = []
        self.rank = 0
        self.generation = new_generation()
        self.step_index = None  # the index is the storage listing

    @property
    def world_size(self) -> int:
        return self._world

    def begin(self, step: int, chunk_bytes: int) -> None:
        return None

    def all_gather(self, obj: Any) -> list[Any]:
        return list(self._descriptions)

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        return list(flags)

    def commit(
        self,
        backend: StorageBackend,
        step: int,
        index: ShardIndex,
        *,
        chunk_bytes: int,
        user_metadata: Mapping[str, Any],
    ) -> Manifest | None:
        self._indexes.append(index)
        if len(self._indexes) < len(self._descriptions):
            return None
        manifest = merge_indexes(
            step=step,
            generation=self.generation,
            world_size=self._world,
            chunk_bytes=chunk_bytes,
            indexes=self._indexes,
            user_metadata=user_metadata,
        )
        publish(backend, manifest)
        return manifest

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        return None

    def close(self) -> None:
        return None

    @property
    def files(self) -> list[str]:
        return [f for index in self._indexes for f in index.files]


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote: the step, how many tensors, their bytes, the files."""

    step: int
    tensors: int
    bytes: int
    files: list[str]


def relayout(
    src: StorageBackend,
    dst: StorageBackend,
    *,
    world_size: int,
    step: int | None = None,
    dim: int = 0,
    options: SaveOptions | None = None,
    progress: Progress = _no_progress,
) -> ConvertResult:
    """Write ``step`` of ``src`` to ``dst`` as a checkpoint of ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError("world_size must be at least 1")
    manifest = open_manifest(src, step)
    loader = Loader(src, manifest)
    boxes: dict[int, dict[str, Box]] = {}
    for rank in range(world_size):
        per_rank: dict[str, Box] = {}
        for name, entry in manifest.tensors.items():
            if not entry.shape:
                box = Box((), ()) if rank == 0 else None
            else:
                d = dim if dim < len(entry.shape) else 0
                box = split_box(entry.shape, world_size, rank, d)
            if box is not None:
                per_rank[name] = box
        boxes[rank] = per_rank
    descriptions = [
        [
            PieceInfo(n, b.offsets, b.lengths, b.numel * element_size(manifest.tensors[n].dtype))
            for n, b in boxes[r].items()
            if b.numel
        ]
        for r in range(world_size)
    ]
    ranks = _OfflineRanks(world_size, descriptions)
    # Tensor bytes, as counted below (file sizes would add headers: the bar never reached 100%).
    total = sum(entry.nbytes for entry in manifest.tensors.values())
    done = 0
    engine = Snapshotter(options)
    try:
        for rank in range(world_size):
            ranks.rank = rank
            tensors: dict[str, FlatTensor] = {}
            for name, box in boxes[rank].items():
                entry = manifest.tensors[name]
                local = _read_region(loader, name, entry, box)
                tensors[name] = FlatTensor(name, local, tuple(entry.shape), box, False, entry.dtype)
                done += local.numel() * local.element_size()
                progress(done, total, f"rank {rank}/{world_size}: {name}")
            pending = engine.save_flat(
                tensors,
                manifest.state,
                dst,
                manifest.step,
                ranks,
                user_metadata={
                    **manifest.user_metadata,
                    "converted_from": f"{src.url} step {manifest.step}",
                },
            )
            pending.result()
    finally:
        engine.close()
    return ConvertResult(manifest.step, len(manifest.tensors), total, sorted(ranks.files))


def _selected(manifest: Manifest, prefix: str | None) -> list[tuple[str, str]]:
    """(stored name, exported name) pairs, keeping only names under ``prefix`` and stripping it."""
    out = []
    for name in sorted(manifest.tensors):
        if prefix:
            if not name.startswith(prefix):
                continue
            out.append((name, name[len(prefix) :]))
        else:
            out.append((name, name))
    if not out:
        raise CheckpointError(f"no tensor names start with {prefix!r}")
    return out


def export_safetensors(
    src: StorageBackend,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    prefix: str | None = None,
    max_shard_bytes: int | None = None,
    progress: Progress = _no_progress,
) -> ConvertResult:
    """Consolidate ``step`` into safetensors file(s) at ``path``.

    ``path`` is a file, or a directory when the export is sharded.
    """
    manifest = open_manifest(src, step)
    loader = Loader(src, manifest)
    names = _selected(manifest, prefix)
    groups: list[list[tuple[str, str]]] = [[]]
    group_bytes = 0
    for stored, exported in names:
        nbytes = manifest.tensors[stored].nbytes
        if max_shard_bytes and groups[-1] and group_bytes + nbytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append((stored, exported))
        group_bytes += nbytes
    target = os.fspath(path)
    if len(groups) == 1 and not max_shard_bytes:
        file_paths = [target]
    else:
        os.makedirs(target, exist_ok=True)
        file_paths = [
            os.path.join(target, f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
            for i in range(len(groups))
        ]
    total = sum(manifest.tensors[s].nbytes for s, _ in names)
    done = 0
    weight_map: dict[str, str] = {}
    for group, file_path in zip(groups, file_paths):
        header = safetensors_header(
            [
                (exported, manifest.tensors[stored].dtype, manifest.tensors[stored].shape)
                for stored, exported in group
            ],
            {"format": "pt", "source": f"ckpt step {manifest.step}"},
        )
        weight_map.update((exported, os.path.basename(file_path)) for _, exported in group)
        tmp = f"{file_path}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(header)
                for stored, _ in group:
                    entry = manifest.tensors[stored]
                    tensor = _read_region(loader, stored, entry, Box.full(entry.shape))
                    if tensor.is_complex():
                        tensor = torch.view_as_real(tensor)
                    # reshape first: a 0-d tensor cannot be viewed as bytes of another size.
                    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                    done += entry.nbytes
                    progress(done, total, stored)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            # A failed export leaves no partial file behind.
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.replace(tmp, file_path)
    if len(file_paths) > 1 or max_shard_bytes:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_path = os.path.join(target, "model.safetensors.index.json")
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        file_paths.append(index_path)
    return ConvertResult(manifest.step, len(names), total, file_paths)


def export_torch(
    src: StorageBackend,
    path: str | os.PathLike[str],
    *,
    step: int | None = None,
    prefix: str | None = None,
    progress: Progress = _no_progress,
) -> ConvertResult:
    """Consolidate ``step`` into one ``{name: tensor}`` dict saved with ``torch.save``."""
    manifest = open_manifest(src, step)
    loader = Loader(src, manifest)
    names = _selected(manifest, prefix)
    total = sum(manifest.tensors[s].nbytes for s, _ in names)
    out: dict[str, torch.Tensor] = {}
    done = 0
    for stored, exported in names:
        entry = manifest.tensors[stored]
        out[exported] = _read_region(loader, stored, entry, Box.full(entry.shape))
        done += entry.nbytes
        progress(done, total, stored)
    with storage_errors(f"writing {path}"):
        torch.save(out, os.fspath(path))
    return ConvertResult(manifest.step, len(names), total, [os.fspath(path)])


# -- torch.distributed.checkpoint (DCP) ------------------------------------------------------

DEFAULT_BATCH_BYTES = 1 << 30
"""Tensor bytes a DCP import holds in memory at once (one larger tensor is read alone)."""

_STEP_KEYS = ("step", "global_step")
_INDEX = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class DcpImportResult(ConvertResult):
    """What ``import_dcp`` wrote, and which of DCP's pickled values it imported or left out.

    Attributes:
        values: the non-tensor values imported (dotted DCP names).
        skipped: (name, why) of the non-tensor values left out.
    """

    values: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()


def import_dcp(
    src_dir: str | os.PathLike[str],
    dst: str | os.PathLike[str] | StorageBackend,
    *,
    step: int | None = None,
    world_size: int | None = None,
    trust_pickled_values: bool = False,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    options: SaveOptions | None = None,
    progress: Progress = _no_progress,
) -> DcpImportResult:
    """Write the DCP checkpoint in ``src_dir`` to ``dst`` as a ckpt checkpoint.

    The tree DCP saved comes back nested as it was (``{"model": {...}, "optim": {"state":
    ..., "param_groups": [...]}}``), with the tensors whole; an optimizer's per-parameter
    state gets the integer keys DCP turned into strings back. Tensors are read with
    ``dcp.load`` on this process (no process group) in batches of about ``batch_bytes``,
    each written before the next is read.

    DCP's ``.metadata`` is a pickle: it is read with torch's own
    ``FileSystemReader.read_metadata``, so import only checkpoints you trust. DCP also
    pickles every non-tensor value (step counters, learning rates, an optimizer's
    ``param_groups``); those are left out and named in a warning and in the result,
    unless ``trust_pickled_values``: then they are loaded with
    ``torch.load(weights_only=True)`` and kept when ckpt can store them.

    Args:
        src_dir: the DCP checkpoint directory (its ``.metadata`` and ``*.distcp`` files).
        dst: the ckpt root to write (a URL is opened once the source has been read).
        step: the step number to write; None takes the checkpoint's top-level "step" or
            "global_step" integer when one was imported, else 0.
        world_size: write the layout ``world_size`` ranks would have saved (tensors split
            along dim 0, as ``relayout`` does); None means one rank.
        trust_pickled_values: unpickle DCP's non-tensor values (with ``weights_only``).
        batch_bytes: tensor bytes read from DCP at once.
        options: the layout of the written checkpoint.
        progress: called with (bytes done, bytes total, what).

    Raises:
        CheckpointNotFoundError: ``src_dir`` holds no finished DCP checkpoint.
        CorruptCheckpointError: DCP could not read its metadata or data.
        AlreadyCommittedError: ``step`` is already committed under ``dst``.
    """
    if world_size is not None and world_size < 1:
        raise ValueError("world_size must be at least 1")
    source = os.fspath(src_dir)
    metadata = read_dcp_metadata(source)
    paths = _dcp_paths(metadata)
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

    tensors, fqns, json_tree = _dcp_tree(metadata, paths, values, list(skipped), source)
    total = sum(t.local.numel() * t.local.element_size() for t in tensors.values())
    ranks = world_size or 1
    batches = _import_batches(list(tensors.values()), fqns, ranks, batch_bytes)
    descriptions = [
        [
            PieceInfo(n, b.offsets, b.lengths, b.numel * element_size(tensors[n].dtype))
            for n, b in per_rank.items()
            if b.numel
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
    writers = _OfflineRanks(ranks, descriptions)
    engine = Snapshotter(options)
    done = 0
    note = {"converted_from": f"DCP checkpoint {source}"}
    try:
        for index, batch in enumerate(batches):
            # Read by DCP name; written under the ckpt name the tree refers to.
            wanted = {
                fqn: torch.empty(tensors[n].global_shape, dtype=torch_dtype(tensors[n].dtype))
                for n, fqn in batch.names.items()
            }
            if wanted:
                _dcp_read(source, wanted, DefaultLoadPlanner(flatten_state_dict=False))
            for rank, per_rank in enumerate(batch.boxes):
                writers.rank = index * ranks + rank
                flat = {
                    n: FlatTensor(
                        n,
                        _region(wanted[batch.names[n]], box),
                        tensors[n].global_shape,
                        box,
                        False,
                        tensors[n].dtype,
                    )
                    for n, box in per_rank.items()
                }
                engine.save_flat(flat, json_tree, dst, step, writers, user_metadata=note).result()
            done += sum(t.numel() * t.element_size() for t in wanted.values())
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
    metadata: Metadata,
    paths: Mapping[str, tuple[str | int, ...]],
    values: Mapping[str, Any],
    left_out: list[str],
    source: str,
) -> tuple[dict[str, FlatTensor], dict[str, str], dict[str, Any]]:
    """The ckpt state tree of a DCP checkpoint: (its tensors by ckpt name, the DCP name of
    each, the JSON tree).

    The tensors hold placeholders of the right shape and dtype that own one element: the
    engine's ``flatten`` checks and encodes the tree around them, and each is found again
    by its memory.
    """
    entries = metadata.state_dict_metadata
    placeholders = {
        fqn: torch.zeros((), dtype=md.properties.dtype).expand(tuple(md.size))
        for fqn, md in entries.items()
        if isinstance(md, TensorStorageMetadata)
    }
    kept = {**placeholders, **values}
    tree = _nested(paths, {fqn: kept[fqn] for fqn in entries if fqn in kept}, source)
    _keep_list_lengths(tree, [paths[fqn] for fqn in left_out])
    _optimizer_keys(tree, paths)
    flat, json_tree = flatten(tree)
    fqn_of = {t.data_ptr(): fqn for fqn, t in placeholders.items()}
    return flat, {n: fqn_of[t.local.data_ptr()] for n, t in flat.items()}, json_tree


@dataclass(frozen=True)
class _ImportBatch:
    """Tensors read from DCP together: ckpt name -> DCP name, and each rank's regions."""

    names: dict[str, str]
    boxes: list[dict[str, Box]]


def _import_batches(
    tensors: list[FlatTensor], fqns: Mapping[str, str], ranks: int, limit: int
) -> list[_ImportBatch]:
    """Consecutive groups of about ``limit`` bytes (a larger tensor alone), each split into
    ``ranks`` regions along dim 0; one empty batch when there are no tensors, so that a
    writer still carries the tree."""
    groups: list[list[FlatTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = t.local.numel() * t.local.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return [
        _ImportBatch(
            {t.name: fqns[t.name] for t in group},
            [
                {t.name: b for t in group if (b := _box_of(t.global_shape, ranks, r)) is not None}
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
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})"
        ) from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptCheckpointError(f"{path} is not DCP metadata ({type(metadata).__name__})")
    return metadata


def _dcp_paths(metadata: Metadata) -> dict[str, tuple[str | int, ...]]:
    """Each DCP name's place in the saved tree (DCP's planner records it; a name it did
    not record stays a top-level key)."""
    recorded = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths: dict[str, tuple[str | int, ...]] = {}
    for fqn in metadata.state_dict_metadata:
        path = recorded.get(fqn)
        valid = (
            isinstance(path, tuple)
            and path
            and isinstance(path[0], str)
            and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
        )
        paths[fqn] = cast(tuple[str | int, ...], path) if valid else (fqn,)
    return paths


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
    """DCP's pickled values ``names``, loaded with weights_only: (the kept ones, why others
    were not)."""
    if not names:
        return {}, {}
    planner = _WeightsOnlyValues()
    _dcp_read(source, dict.fromkeys(names), planner)
    loaded = planner.loaded
    kept: dict[str, Any] = {}
    skipped = dict(planner.failed)
    for fqn in names:
        if fqn in skipped:
            continue
        if fqn not in loaded:
            skipped[fqn] = "DCP did not read it"
            continue
        try:
            tensors, _ = flatten({"value": loaded[fqn]})
        except CheckpointError as exc:
            skipped[fqn] = f"ckpt cannot store it: {exc}"
            continue
        if tensors:
            skipped[fqn] = "it holds tensors inside a pickled value"
            continue
        kept[fqn] = loaded[fqn]
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


def _imported_step(values: Mapping[str, Any], paths: Mapping[str, tuple[str | int, ...]]) -> int:
    for key in _STEP_KEYS:
        for fqn, value in values.items():
            if paths[fqn] == (key,) and type(value) is int and value >= 0:
                return value
    return 0


def _nested(
    paths: Mapping[str, tuple[str | int, ...]], leaves: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """The tree the leaves were saved in: dicts where a path has a key, lists where it has
    an index (an index whose value was left out holds None)."""
    root: dict[str, Any] = {}
    for fqn, leaf in leaves.items():
        path = paths[fqn]
        node: Any = root
        for i, part in enumerate(path[:-1]):
            empty: Any = [] if isinstance(path[i + 1], int) else {}
            node = _slot(node, part, empty, fqn, source, leaf=False)
        _slot(node, path[-1], leaf, fqn, source, leaf=True)
    return root


def _slot(node: Any, part: str | int, value: Any, fqn: str, source: str, *, leaf: bool) -> Any:
    """The child ``part`` of ``node``: ``value`` put there (a leaf, or a new container)."""
    if isinstance(node, list) and isinstance(part, int):
        node.extend([None] * (part + 1 - len(node)))
        current = node[part]
    elif isinstance(node, dict) and isinstance(part, str):
        current = node.get(part)
    else:
        raise CorruptCheckpointError(
            f"DCP checkpoint {source}: {fqn!r} does not fit the tree of the other names"
        )
    if current is None:
        node[part] = value
        return value
    if leaf or type(current) is not type(value):
        raise CorruptCheckpointError(
            f"DCP checkpoint {source}: {fqn!r} collides with another name's value"
        )
    return current


def _keep_list_lengths(tree: dict[str, Any], left_out: list[tuple[str | int, ...]]) -> None:
    """A list keeps its length when its last items were left out: they hold None."""
    for path in left_out:
        node: Any = _node_at(tree, path[:-1])
        if isinstance(node, list) and isinstance(path[-1], int) and path[-1] >= len(node):
            node.extend([None] * (path[-1] + 1 - len(node)))


def _node_at(tree: dict[str, Any], path: tuple[str | int, ...]) -> Any:
    """The node of ``tree`` at ``path``, or None."""
    node: Any = tree
    for part in path:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return None
    return node


def _optimizer_keys(tree: dict[str, Any], paths: Mapping[str, tuple[str | int, ...]]) -> None:
    """DCP writes every dict key as text: an optimizer's per-parameter ``state`` (next to a
    ``param_groups``) gets its integer keys back, so that it loads into an optimizer."""
    roots = {path[:i] for path in paths.values() for i, p in enumerate(path) if p == "param_groups"}
    for root in roots:
        node = _node_at(tree, root)
        state = node.get("state") if isinstance(node, dict) else None
        if (
            isinstance(state, dict)
            and state
            and all(isinstance(k, str) and _INDEX.fullmatch(k) for k in state)
        ):
            node["state"] = {int(k): v for k, v in state.items()}


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
    progress: Progress = _no_progress,
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

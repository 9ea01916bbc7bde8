"""``Writer``: a DCP ``StorageWriter`` that writes a ckpt checkpoint.

DCP drives it (``torch.distributed.checkpoint.state_dict_saver``), and DCP's own gathers
are the coordination; nothing here runs a collective:

1. every rank: ``set_up_storage_writer``, ``prepare_local_plan`` (the plan as it is, with
   the flat keys the rank holds, before DCP gives each replicated one to a single rank);
2. the coordinator: ``prepare_global_plan`` picks the step (the one given, or the newest
   committed + 1), refuses one already committed, draws the writer generation, and hands
   both to every rank in its plan's ``storage_data``;
3. every rank: ``write_data`` writes the tensor pieces DCP assigned to it (DCP has already
   given each replicated tensor to one rank) through ckpt's save engine, as a rank of
   ``ckpt.save`` would: safetensors data files, checksums per chunk, S3 multipart through
   the storage backend. Its values DCP would pickle are encoded as JSON (or refused). Its
   shard index and values travel back to the coordinator in its ``WriteResult``s;
4. the coordinator: ``finish`` merges the shard indexes, nests the keys back into the
   state tree from DCP's flatten mappings (with the ``partial_maps`` of ranks that held
   different keys: pipeline stages) and publishes ``manifest.json`` with an atomic
   create: the single commit point. A committed step is never overwritten.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future as PyFuture
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import msgspec
import torch
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ckpt._open import open_url
from ckpt.coordination import merge_indexes, new_generation, publish
from ckpt.dcp._tree import Path, dcp_paths, encode_value, rebuild_tree
from ckpt.engine import FlatTensor, SaveOptions, default_snapshotter, flatten
from ckpt.engine._engine import checked_metadata, checked_step
from ckpt.errors import (
    AlreadyCommittedError,
    CheckpointError,
    InvalidStateError,
    SaveAbortedError,
)
from ckpt.format import TENSOR_REF, Box, Manifest, ShardIndex, merge_trees, step_prefix
from recovery import committed_steps
from storage_backends import StorageBackend

log = logging.getLogger(__name__)

_WHERE = "dcp.save with ckpt.dcp.Writer"

LAYOUT = {"writer": "ckpt.dcp.Writer", "planner": "torch.distributed.checkpoint"}
"""The manifest's ``layout`` for checkpoints written through DCP."""


@dataclass(frozen=True)
class _Assignment:
    """What the coordinator hands every rank in its plan: the step and the generation."""

    step: int
    generation: str


@dataclass(frozen=True)
class _Held:
    """The flat keys one rank's local plan holds, before DCP's deduplication."""

    keys: frozenset[str]


@dataclass(frozen=True)
class _RankReport:
    """One rank's contribution, carried by its first ``WriteResult``.

    Attributes:
        rank: the rank.
        index: its sealed shard index (``ShardIndex.to_bytes``).
        values: the JSON of the values DCP assigned to it, by flat key.
    """

    rank: int
    index: bytes
    values: dict[str, Any]


@runtime_checkable
class ObjectLookup(Protocol):
    """A save planner that hands out the object behind a write item (DCP's
    ``DefaultSavePlanner`` does): ``Writer`` reads plain values through it instead of
    the pickled bytes ``resolve_data`` would make."""

    def lookup_object(self, index: MetadataIndex) -> Any: ...


class _DcpRank:
    """The coordinator one rank's save engine reports to: DCP does the real coordinating.

    It holds this rank's pieces only (DCP already chose one writer per piece), so the
    engine's plan gives them all to this rank; the engine's report lands in ``index``.
    """

    def __init__(self, rank: int, generation: str) -> None:
        self.rank = rank
        self.world_size = rank + 1
        self.generation = generation
        self.step_index = None
        self.index: ShardIndex | None = None

    def begin(self, step: int, chunk_bytes: int) -> None:
        return None

    def all_gather(self, obj: Any) -> list[Any]:
        return [[] for _ in range(self.rank)] + [obj]

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
        self.index = index
        return None

    def report_failure(self, backend: StorageBackend, step: int, reason: str) -> None:
        return None  # DCP gathers every rank's outcome; ``finish`` runs only if all wrote

    def close(self) -> None:
        return None


def is_ckpt_url(checkpoint_id: object) -> bool:
    """Whether ``checkpoint_id`` names a ckpt root: a local path, ``file://`` or ``s3://`` URL."""
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    text = os.fspath(checkpoint_id)
    if not isinstance(text, str) or not text.strip():
        return False
    scheme, sep, _ = text.partition("://")
    return not sep or scheme in ("file", "s3")


class Writer(StorageWriter):
    """A DCP ``StorageWriter`` that writes a ckpt checkpoint, readable by ``ckpt.load``.

    ``dcp.save({"model": model.state_dict(), "optim": opt.state_dict()},
    storage_writer=ckpt.dcp.Writer(url))`` stores what ``ckpt.save({"model": model,
    "optim": opt}, url, step=...)`` would: the same tensor names, the same state tree,
    with checksums, the storage backends (local disk, S3) and the manifest as the single
    commit point. Every rank passes an equal ``Writer``.

    Args:
        url: the checkpoint root (a path, ``file://`` or ``s3://`` URL, or a storage
            backend); ``dcp.save(..., checkpoint_id=url)`` replaces it.
        step: the step to save; None saves the newest committed step + 1 (0 when there
            is none).
        options: layout settings (file size, compression, checksum chunk size).
        user_metadata: stored in the manifest; JSON values only.

    Raises:
        InvalidStateError: ``step`` or ``user_metadata`` cannot be stored.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | StorageBackend,
        *,
        step: int | None = None,
        options: SaveOptions | None = None,
        user_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._url = url
        self._step = None if step is None else checked_step(step)
        self._options = options or SaveOptions()
        self._user_metadata = checked_metadata(user_metadata)
        self._backend: StorageBackend | None = None
        self._rank = 0
        self._assignment: _Assignment | None = None
        self._held: list[frozenset[str] | None] = []

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint root's URL (DCP logs it)."""
        if isinstance(self._url, (str, os.PathLike)):
            return os.fspath(self._url)
        return self._url.url

    @property
    def backend(self) -> StorageBackend:
        """The storage backend of the root (opened on first use)."""
        if self._backend is None:
            self._backend = open_url(self._url)
        return self._backend

    # -- the StorageWriter protocol, in DCP's call order ---------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save; ``checkpoint_id``, when given, is the checkpoint root."""
        if checkpoint_id is not None:
            if not is_ckpt_url(checkpoint_id):
                raise InvalidStateError(
                    f"ckpt.dcp.Writer: checkpoint_id {checkpoint_id!r} is not a ckpt root; "
                    "give a directory, a file:// or an s3://bucket/prefix URL"
                )
            self._url = checkpoint_id
            self._backend = None
        self._assignment = None

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        rank = kwargs.get("rank")
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._rank = int(rank)
        self._assignment = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return replace(plan, storage_data=_Held(frozenset(i.index.fqn for i in plan.items)))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator: choose the step, refuse a committed one, hand it to every rank."""
        committed = committed_steps(self.backend)
        step = self._step if self._step is not None else (committed[0] + 1 if committed else 0)
        if step in committed:
            raise AlreadyCommittedError(
                f"ckpt.dcp.Writer: step {step} under {self.backend.url} is already committed, "
                "and a committed step is never overwritten; nothing was written. Save another "
                f"step (Writer(url, step=None) takes the next one), or delete "
                f"{step_prefix(step)}/ first if you mean to replace it"
            )
        assignment = _Assignment(step, new_generation())
        self._assignment = assignment
        self._held = [
            p.storage_data.keys if isinstance(p.storage_data, _Held) else None for p in plans
        ]
        return [replace(plan, storage_data=assignment) for plan in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's pieces through ckpt's save engine; report them in the results."""
        assignment = plan.storage_data
        if not isinstance(assignment, _Assignment):
            raise CheckpointError(
                "ckpt.dcp.Writer: the save plan carries no step from the coordinator's "
                "prepare_global_plan (a cached plan, or a planner that drops storage_data?); "
                "save with DCP's DefaultSavePlanner without plan caching"
            )
        _check_all_values(planner)
        values: dict[str, Any] = {}
        tensors: dict[str, FlatTensor] = {}
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                values[fqn] = encode_value(fqn, _lookup(planner, item), _WHERE)
                continue
            if fqn in tensors:
                raise InvalidStateError(
                    f"ckpt.dcp.Writer: rank {self._rank} holds two shards of {fqn!r}; ckpt "
                    "stores one region of a tensor per rank (a DTensor, or a ShardedTensor "
                    "with one local shard)"
                )
            tensors[fqn] = _flat_piece(item, planner.resolve_data(item))
        rank = self._rank
        result: Future[list[WriteResult]] = Future()
        if not tensors:
            index = ShardIndex(rank=rank, tensors={}, files={})
            result.set_result(_results(plan.items, _RankReport(rank, index.to_bytes(), values)))
            return result
        ranks = _DcpRank(rank, assignment.generation)
        pending = default_snapshotter().save_flat(
            tensors,
            {},
            self.backend,
            assignment.step,
            ranks,
            user_metadata=self._user_metadata,
            options=self._options,
            format_version=1,  # finish() merges the ranks' pieces itself
            reuse_plan=False,
        )

        def done(_: PyFuture[Any]) -> None:
            error = pending.exception()  # counts as looked at: the engine raises it no later
            if error is not None:
                result.set_exception(error)  # type: ignore[arg-type]  # typed as T in torch
            elif ranks.index is None:
                missing = SaveAbortedError(f"ckpt.dcp.Writer: rank {rank} wrote no shard index")
                result.set_exception(missing)  # type: ignore[arg-type]
            else:
                report = _RankReport(rank, ranks.index.to_bytes(), values)
                result.set_result(_results(plan.items, report))

        pending.add_done_callback(done)
        return result

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator: merge the ranks' reports and publish the manifest (the commit)."""
        assignment = self._assignment
        if assignment is None:
            raise CheckpointError(
                "ckpt.dcp.Writer.finish ran without prepare_global_plan on this rank; "
                "DCP calls both on the coordinator"
            )
        step, chunk_bytes = assignment.step, self._options.chunk_bytes
        reports = [
            r.storage_data
            for per_rank in results
            for r in per_rank
            if isinstance(r.storage_data, _RankReport)
        ]
        indexes = sorted(
            (
                ShardIndex.from_bytes(
                    r.index, f"rank {r.rank}'s report of step {step}", chunk_bytes
                )
                for r in reports
            ),
            key=lambda i: i.rank,
        )
        values = {k: v for r in reports for k, v in r.values.items()}
        tree = rebuild_tree(_leaves(metadata, values), _collision)
        if indexes:
            indexes = [msgspec.structs.replace(i, state=None) for i in indexes]
            indexes[0] = msgspec.structs.replace(indexes[0], state=tree)
        else:
            indexes = [ShardIndex(rank=0, tensors={}, files={}, state=tree)]
        manifest = merge_indexes(
            step=step,
            generation=assignment.generation,
            world_size=max(1, len(results)),
            chunk_bytes=chunk_bytes,
            indexes=indexes,
            user_metadata=self._user_metadata,
            layout=LAYOUT,
            partial_maps=_partial_maps(metadata, self._held),
        )
        try:
            publish(self.backend, manifest)
        except AlreadyCommittedError:
            _discard(self.backend, step, manifest.files)
            raise
        log.info(
            "step %d: committed by dcp.save under %s (%d tensors, %d ranks)",
            step,
            self.backend.url,
            len(manifest.tensors),
            manifest.world_size,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a ckpt root URL (a path, ``file://``, ``s3://``)."""
        return is_ckpt_url(checkpoint_id)


def _flat_piece(item: WriteItem, data: Any) -> FlatTensor:
    """A DCP tensor write item as one piece of a ckpt save (checked as ``ckpt.save`` checks)."""
    fqn = item.index.fqn
    if not isinstance(data, torch.Tensor) or item.tensor_data is None:
        raise InvalidStateError(
            f"ckpt.dcp.Writer: the planner resolved tensor item {fqn!r} to a "
            f"{type(data).__name__}, not a tensor"
        )
    chunk = item.tensor_data.chunk
    box = Box(tuple(int(o) for o in chunk.offsets), tuple(int(n) for n in chunk.sizes))
    if tuple(data.shape) != box.lengths:
        data = data.reshape(box.lengths)  # DCP may hand out a flattened view of the chunk
    flat = flatten({fqn: data})[0][fqn]
    return replace(
        flat,
        global_shape=tuple(int(n) for n in item.tensor_data.size),
        box=box,
        replicated=False,
    )


def _lookup(planner: SavePlanner, item: WriteItem) -> Any:
    if not isinstance(planner, ObjectLookup):
        raise InvalidStateError(
            f"ckpt.dcp.Writer: {item.index.fqn!r} is a plain value, and the planner "
            f"{type(planner).__name__} only hands it out pickled (resolve_data); ckpt stores "
            "no pickle. Use DCP's DefaultSavePlanner (or one with lookup_object)"
        )
    return planner.lookup_object(item.index)


def _check_all_values(planner: SavePlanner) -> None:
    """Refuse a value that cannot be stored on every rank that holds it, before this rank
    writes: DCP's default planner keeps every rank's whole (flattened) state dict, so with
    replicated plain values every rank refuses, not just the one DCP assigned it to."""
    if not isinstance(planner, DefaultSavePlanner):
        return
    for fqn, value in planner.state_dict.items():
        if not isinstance(value, (torch.Tensor, ShardedTensor)) and isinstance(fqn, str):
            encode_value(fqn, value, _WHERE)


def _results(items: Sequence[WriteItem], report: _RankReport) -> list[WriteResult]:
    """One result per item; the first carries the rank's report."""
    out = []
    for i, item in enumerate(items):
        size = item.tensor_storage_size() or 0
        out.append(WriteResult(item.index, size, report if i == 0 else None))
    return out


def _leaves(metadata: Metadata, values: Mapping[str, Any]) -> list[tuple[Path, Any]]:
    """(DCP path, JSON) of every flat key of the save."""
    leaves: list[tuple[Path, Any]] = []
    for fqn, path in dcp_paths(metadata).items():
        if isinstance(metadata.state_dict_metadata[fqn], TensorStorageMetadata):
            leaves.append((path, {TENSOR_REF: fqn}))
        elif fqn in values:
            leaves.append((path, values[fqn]))
        else:
            raise SaveAbortedError(
                f"ckpt.dcp.Writer: no rank reported the value {fqn!r}; step not committed"
            )
    return leaves


def _partial_maps(
    metadata: Metadata, held: Sequence[frozenset[str] | None]
) -> tuple[tuple[str, ...], ...]:
    """The mappings of the saved tree whose keys the ranks held in part (pipeline stages
    hold different parameters): the trees of the ranks' own keys, merged as ckpt's own
    committer merges the ranks' trees. Empty when every rank held the same keys (or a
    rank's plan did not say)."""
    if any(keys is None for keys in held):
        return ()
    distinct = list(dict.fromkeys(k for k in held if k is not None))
    if len(distinct) < 2:
        return ()
    paths = dcp_paths(metadata)
    try:
        skeletons = [
            rebuild_tree(((path, 0) for fqn, path in paths.items() if fqn in keys), _collision)
            for keys in distinct
        ]
    except CheckpointError:  # the whole tree was built from these paths: cannot happen
        log.warning("ckpt.dcp.Writer: the ranks' own keys do not form trees", exc_info=True)
        return ()
    return tuple(tuple(path) for path in merge_trees(skeletons)[1])


def _collision(message: str) -> InvalidStateError:
    return InvalidStateError(f"{_WHERE}: {message}")


def _discard(backend: StorageBackend, step: int, files: Mapping[str, int]) -> None:
    """Remove the data files of a save that lost the commit (no manifest names them)."""
    prefix = step_prefix(step)
    try:
        backend.delete(f"{prefix}/{path}" for path in files)
    except Exception as exc:  # garbage either way; retention cannot see it, so say so
        log.warning("could not remove the data files of step %d under %s: %s", step, prefix, exc)

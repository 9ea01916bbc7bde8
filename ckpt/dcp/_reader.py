"""``Reader``: a DCP ``StorageReader`` that reads a ckpt checkpoint.

DCP drives it (``torch.distributed.checkpoint.state_dict_loader``):

1. every rank: ``read_metadata`` opens the step (the one given, or the newest committed
   that validates) and describes it as DCP ``Metadata``: per tensor its global size,
   dtype and one chunk per stored piece; per plain value of the state tree a bytes
   entry, under the keys DCP's own flattening gives (so a state dict shaped like the
   saved one matches key for key);
2. every rank: ``set_up_storage_reader``, ``prepare_local_plan`` (unchanged); the
   coordinator's ``prepare_global_plan`` hands every rank its step, so that a rank that
   saw another newest step refuses to mix them;
3. every rank: ``read_data`` reads each tensor region DCP's planner asks for (DCP has
   intersected the target's shards with the stored chunks: resharding) through
   recovery's ``Loader``: ranged reads of whole checksum chunks, coalesced, verified.
   Plain values come from the manifest's JSON; the planner wants them as ``torch.save``
   bytes, which are made here from those values: no stored byte is ever unpickled.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckpt._open import open_url
from ckpt.convert import open_manifest
from ckpt.dcp._tree import ArrayRef, TensorStandIns, decode_tree
from ckpt.dcp._writer import is_ckpt_url
from ckpt.engine._engine import checked_step
from ckpt.errors import CheckpointError, CoordinationError, InvalidStateError, StateMismatchError
from ckpt.format import Box, Manifest, torch_dtype
from recovery import Destination, Loader, LoadOptions
from storage_backends import StorageBackend


class Reader(StorageReader):
    """A DCP ``StorageReader`` of ckpt checkpoints: ``dcp.load`` reads what ``ckpt.save``
    (or ``dcp.save`` with ``ckpt.dcp.Writer``) wrote, resharded to the target's layout.

    ``dcp.load({"model": model.state_dict(), "optim": opt.state_dict()},
    storage_reader=ckpt.dcp.Reader(url))`` fills the tensors in place and sets the plain
    values, as DCP does with its own checkpoints; the target's keys must be in the
    checkpoint (extra stored keys are ignored).

    Args:
        url: the checkpoint root (a path, ``file://`` or ``s3://`` URL, or a storage
            backend); ``dcp.load(..., checkpoint_id=url)`` replaces it.
        step: the step to load; None loads the newest committed step that validates,
            passing over damaged newer ones.
        options: reader settings (threads, request sizes).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | StorageBackend,
        *,
        step: int | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        super().__init__()
        self._url = url
        self._step = None if step is None else checked_step(step)
        self._options = options
        self._backend: StorageBackend | None = None
        self._manifest: Manifest | None = None
        self._names: dict[str, str] = {}  # flat key -> stored tensor name
        self._values: dict[str, Any] = {}  # flat key -> plain value
        self._stand_ins: TensorStandIns | None = None

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint root's URL (DCP logs it)."""
        if isinstance(self._url, (str, os.PathLike)):
            return os.fspath(self._url)
        return self._url.url

    @property
    def backend(self) -> StorageBackend:
        if self._backend is None:
            self._backend = open_url(self._url, create=False)
        return self._backend

    @property
    def step(self) -> int | None:
        """The step ``read_metadata`` opened (None before)."""
        return None if self._manifest is None else self._manifest.step

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load; ``checkpoint_id``, when given, is the checkpoint root."""
        if checkpoint_id is not None:
            if not is_ckpt_url(checkpoint_id):
                raise InvalidStateError(
                    f"ckpt.dcp.Reader: checkpoint_id {checkpoint_id!r} is not a ckpt root; "
                    "give a directory, a file:// or an s3://bucket/prefix URL"
                )
            self._url = checkpoint_id
            self._backend = None
        self._manifest = None

    def read_metadata(self) -> Metadata:
        """The step's tensors and plain values as DCP metadata (this rank's own reading).

        Raises:
            CheckpointNotFoundError: no committed checkpoint (or not ``step``).
            CorruptCheckpointError: ``step`` fails validation, or every committed step does.
        """
        manifest = open_manifest(self.backend, self._step)
        where = f"step {manifest.step} under {self.backend.url}"
        stored = {name: (e.dtype, tuple(e.shape)) for name, e in manifest.tensors.items()}
        stand_ins = TensorStandIns(stored)
        decoded = decode_tree(manifest.state, stand_ins, where)
        flat, mappings = flatten_state_dict(decoded)
        entries: dict[str, Any] = {}
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        for fqn, value in flat.items():
            name = stand_ins.name_of(value)
            if name is None:
                values[fqn] = value
                entries[fqn] = BytesStorageMetadata()
                continue
            names[fqn] = name
            entry = manifest.tensors[name]
            entries[fqn] = TensorStorageMetadata(
                properties=TensorProperties(dtype=torch_dtype(entry.dtype)),
                size=torch.Size(entry.shape),
                chunks=[
                    ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.lengths))
                    for p in entry.pieces
                ],
            )
        self._manifest, self._names, self._values = manifest, names, values
        self._stand_ins = stand_ins
        return Metadata(
            state_dict_metadata=entries,
            planner_data=mappings,
            storage_data=manifest.step,
            storage_meta=StorageMeta(checkpoint_id=self.checkpoint_id),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool) -> None:
        self._opened()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Coordinator: every rank must read the step the coordinator opened."""
        step = self._opened().step
        return [replace(plan, storage_data=step) for plan in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fill this rank's tensors (verified ranged reads) and hand over its plain values."""
        manifest = self._opened()
        if plan.storage_data is not None and plan.storage_data != manifest.step:
            raise CoordinationError(
                f"ckpt.dcp.Reader: this rank opened step {manifest.step} under "
                f"{self.backend.url} but the coordinator opened step {plan.storage_data} (a "
                "step committed while the ranks listed the root?); nothing was loaded. Pass "
                "Reader(url, step=N) so that every rank reads the same step"
            )
        destinations: list[Destination] = []
        fills: list[tuple[ReadItem, torch.Tensor, torch.Tensor]] = []
        arrays: dict[str, torch.Tensor] = {}
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                self._hand_over(item, planner, manifest, arrays)
                continue
            name = self._names.get(fqn)
            if name is None:
                raise StateMismatchError(
                    f"ckpt.dcp.Reader: {fqn!r} is not a tensor of step {manifest.step} under "
                    f"{self.backend.url}"
                )
            chunk = item.storage_index.offset or ()
            offsets = tuple(int(c) + int(s) for c, s in zip(chunk, item.storage_offsets))
            box = Box(offsets, tuple(int(n) for n in item.lengths))
            target = planner.resolve_tensor(item).detach()
            dtype = torch_dtype(manifest.tensors[name].dtype)
            # The loader writes stored bytes straight into a matching target: a target of
            # another dtype gets the values through a buffer of the stored one.
            buffer = target if target.dtype == dtype else torch.empty(box.lengths, dtype=dtype)
            destinations.append(Destination(name, buffer, box))
            fills.append((item, target, buffer))
        if destinations:
            Loader(self.backend, manifest, self._options).load(destinations)
        for item, target, buffer in fills:
            if buffer is not target:
                target.copy_(buffer)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a ckpt root URL (a path, ``file://``, ``s3://``)."""
        return is_ckpt_url(checkpoint_id)

    # -- helpers -----------------------------------------------------------------------

    def _opened(self) -> Manifest:
        if self._manifest is None:
            raise CheckpointError(
                "ckpt.dcp.Reader: read_metadata has not run on this rank; DCP calls it first"
            )
        return self._manifest

    def _hand_over(
        self,
        item: ReadItem,
        planner: LoadPlanner,
        manifest: Manifest,
        arrays: dict[str, torch.Tensor],
    ) -> None:
        """Give the planner a plain value as the ``torch.save`` bytes it expects."""
        fqn = item.storage_index.fqn
        if fqn not in self._values:
            raise StateMismatchError(
                f"ckpt.dcp.Reader: {fqn!r} is not a plain value of step {manifest.step} "
                f"under {self.backend.url}"
            )
        value = self._materialized(self._values[fqn], manifest, arrays)
        data = io.BytesIO()
        torch.save(value, data)
        data.seek(0)
        planner.load_bytes(item, data)

    def _materialized(self, value: Any, manifest: Manifest, cache: dict[str, torch.Tensor]) -> Any:
        """``value`` with its stored arrays and tensors (inside a tuple, say) read in full."""
        if isinstance(value, ArrayRef):
            return self._whole(value.name, manifest, cache).numpy()
        name = self._stand_ins.name_of(value) if self._stand_ins is not None else None
        if name is not None:
            return self._whole(name, manifest, cache)
        if isinstance(value, list):
            return [self._materialized(v, manifest, cache) for v in value]
        if isinstance(value, tuple):
            return tuple(self._materialized(v, manifest, cache) for v in value)
        if isinstance(value, Mapping):
            return {k: self._materialized(v, manifest, cache) for k, v in value.items()}
        return value

    def _whole(self, name: str, manifest: Manifest, cache: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in cache:
            entry = manifest.tensors[name]
            tensor = torch.empty(tuple(entry.shape), dtype=torch_dtype(entry.dtype))
            if tensor.numel():
                Loader(self.backend, manifest, self._options).load(
                    [Destination(name, tensor, Box.full(entry.shape))]
                )
            cache[name] = tensor
        return cache[name]

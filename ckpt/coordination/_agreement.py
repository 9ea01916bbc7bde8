"""Agreement among the ranks of a job through its torch.distributed process group.

Used in the training thread only: the generation token, the save plan exchange and
the per-call policy decision. Background threads never come here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class GroupAgreement:
    """Collectives on one process group (the world when ``group`` is None)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._group = group
        self.rank: int = dist.get_rank(group)
        self.world_size: int = dist.get_world_size(group)

    @staticmethod
    def available() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    def _global_rank(self, group_rank: int) -> int:
        if self._group is None:
            return group_rank
        return int(self._dist.get_global_rank(self._group, group_rank))

    def broadcast_from_rank0(self, make: Callable[[], str]) -> str:
        """``make()`` on rank 0, its result on every rank."""
        box: list[str | None] = [make() if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=self._global_rank(0), group=self._group)
        return str(box[0])

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        import torch

        device = "cuda" if self._dist.get_backend(self._group) == "nccl" else "cpu"
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX, group=self._group)
        return [bool(v) for v in tensor.tolist()]

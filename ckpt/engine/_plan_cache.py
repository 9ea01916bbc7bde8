"""The write plan kept between saves: a training job saves the same layout every time.

``PlanCache`` keeps this rank's part of the last plan: each save first exchanges one digest
per rank of what it would describe, and planning only runs again when a digest changed (or
a rank has no plan for them). After a restart, a format v2 manifest gives the plan back: it
records the plan's key, and its layouts say who wrote which region (``PlanCache.seed``), so
a job restored on the same world size does not plan again. When planning does run, it is
made from every rank's rules (``ckpt.engine._regular``) when the state follows them, else
from every rank's pieces (``make_plan``): the same plan either way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import NamedTuple

from ckpt.coordination import Coordinator
from ckpt.engine._flatten import FlatTensor
from ckpt.engine._plan import (
    MIN_SPLIT_BYTES,
    PieceKey,
    RankPlan,
    WritePlan,
    description_digest,
    make_plan,
    piece_key,
)
from ckpt.engine._regular import RegularPlan, regular_plan, rules_of
from ckpt.format import Box, Manifest, TensorEntry

log = logging.getLogger(__name__)


class Agreed(NamedTuple):
    """What ``PlanCache.agree`` settled for this rank's save.

    Attributes:
        part: this rank's part of the plan.
        whole: the whole plan when it was made now (None when every rank reused its part).
        sends_tree: whether this rank reports its state tree: it is the lowest rank whose
            tree has its keys (rank 0, and the first rank of each pipeline stage whose
            state differs); the committer stores their union.
    """

    part: RankPlan
    whole: WritePlan | RegularPlan | None
    sends_tree: bool


class PlanCache:
    """This rank's part of the last write plan, reused while no rank's description changes.

    ``agree`` is a collective (every rank calls it in the same order) and every rank takes
    the same branch: a rank reuses its part only when all ranks report holding the plan of
    exactly the digests just exchanged, so a restarted rank (empty cache) makes everyone
    plan afresh, unless every rank was seeded with the plan of a restored manifest. Only
    ``RankPlan`` is kept: at scale the whole plan takes gigabytes.
    """

    def __init__(self) -> None:
        self._key = ""
        self._mine: RankPlan | None = None
        self._seed: Manifest | None = None

    @property
    def key(self) -> str:
        """The key of the plan the last ``agree`` settled on ("" before any)."""
        return self._key

    def forget(self) -> None:
        """Plan afresh next time (with every rank)."""
        self._key, self._mine, self._seed = "", None, None

    def seed(self, manifest: Manifest) -> None:
        """Offer the plan ``manifest`` was saved with to the next ``agree``: used when every
        rank describes exactly what that save's ranks described (so the plan would come out
        the same), else everyone plans afresh. Manifests without a recorded plan (format 1,
        the DCP writer, offline conversion) leave the cache as it is."""
        if manifest.plan is not None and manifest.writers:
            self._key, self._mine, self._seed = manifest.plan.key, None, manifest

    def agree(
        self,
        coordinator: Coordinator,
        tensors: Mapping[str, FlatTensor],
        *,
        tree_digest: str = "",
        min_split_bytes: int = MIN_SPLIT_BYTES,
    ) -> Agreed:
        """This rank's part of the plan, the whole plan when it was made now, and whether
        this rank sends its state tree (``tree_digest``: ``tree_shape_digest`` of it)."""
        held = self._mine
        if held is None and self._seed is not None:
            held = seeded_part(self._seed, coordinator.rank, tensors)
        offers = coordinator.all_gather(
            (
                description_digest(tensors, min_split_bytes),
                self._key if held is not None else "",
                tree_digest,
            )
        )
        sends_tree = tree_digest not in {tree for _, _, tree in offers[: coordinator.rank]}
        key = hashlib.blake2b(
            "\n".join(str(digest) for digest, _, _ in offers).encode(), digest_size=16
        ).hexdigest()
        if held is not None and all(offered == key for _, offered, _ in offers):
            self._mine, self._seed = held, None
            return Agreed(held, None, sends_tree)
        self.forget()  # a failed exchange leaves nothing half-agreed
        mine, plan = plan_now(coordinator, tensors, min_split_bytes=min_split_bytes)
        self._key, self._mine = key, mine
        return Agreed(mine, plan, sends_tree)


def plan_now(
    coordinator: Coordinator, tensors: Mapping[str, FlatTensor], *, min_split_bytes: int
) -> tuple[RankPlan, WritePlan | RegularPlan]:
    """Plan this save with every rank (a collective): from the ranks' rules when they all
    have some that agree, else from their pieces."""
    try:
        rules = rules_of(tensors, coordinator.rank, coordinator.world_size)
    except Exception:  # a layout the rules misread must not leave the others waiting
        log.warning(
            "rank %d: could not describe its tensors by layout rules; every rank plans this "
            "save from its pieces instead",
            coordinator.rank,
            exc_info=True,
        )
        rules = None
    made = regular_plan(coordinator, tensors, rules, min_split_bytes=min_split_bytes)
    if made is not None:
        return made
    return make_plan(coordinator, tensors, min_split_bytes=min_split_bytes)


def seeded_part(
    manifest: Manifest, rank: int, tensors: Mapping[str, FlatTensor]
) -> RankPlan | None:
    """``rank``'s part of the plan ``manifest``'s layouts record, for ``tensors``; None
    when they do not fit (then the rank offers no plan and every rank plans afresh).

    ``agree`` uses it only when every rank's description matches the plan's key, so the
    layouts are those the planner would make now: each region a rank writes lies inside
    what it holds, and the lowest writer of a tensor (or, of one nobody writes, each
    holder) describes its layout."""
    assert manifest.plan is not None
    boxes: dict[PieceKey, Box] = {}
    described: dict[str, TensorEntry] = {}
    for name, t in tensors.items():
        entry = manifest.tensors.get(name)
        if entry is None or entry.layout is None:
            return None
        if (entry.dtype, entry.shape) != (t.dtype, t.global_shape):
            return None
        if t.local.numel() > 0:
            region = entry.layout.region_of(entry.shape, rank, t.box)
            if region is not None:
                boxes[piece_key(t)] = region
        lowest = entry.layout.lowest_writer
        if lowest is None or lowest == rank:
            described[name] = TensorEntry(entry.dtype, entry.shape, (), entry.layout)
    return RankPlan(boxes, manifest.plan.imbalance, described)

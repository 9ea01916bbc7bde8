"""Distributed sharded save (issue 3, items 1-2) and loads onto the same / other layouts.

Real gloo processes (``tests.support.gloo.run_ranks``). Spawns are expensive, so each one
runs a whole scenario and the tests below check its results:

* 4 ranks save one state holding every layout (1-D and 2x2 DTensors, Megatron shards,
  plain tensors, TP module, FSDP2 + Adam) and reload it onto the same layout;
* 2 ranks load that checkpoint onto another layout, then save their own;
* 3 ranks load the 2-rank checkpoint;
* the pytest process (no process group) loads both into plain full tensors;
* 2 ranks run CheckpointManager policies, include_rng, and saves where ranks disagree.

Written bytes are attributed to ranks by the engine's data file names
(``data/<generation>-r<rank>-<n>.safetensors``).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import ckpt
from ckpt.coordination import ProcessGroupCoordinator
from ckpt.engine import flatten
from ckpt.format import element_size, read_manifest, scan_steps, step_prefix
from ckpt.retention import apply_retention
from recovery import committed_steps
from storage_backends import LocalBackend
from tests.distributed.sharded import (
    REPLICATED_COUNT,
    TOP_KEYS,
    build_state,
    full_values,
    global_value,
    load_expected,
    mismatches,
    named_tensors,
    save_expected,
    zero_state,
)
from tests.support.gloo import run_ranks

STEP = 7
TIMEOUT_S = 120.0
_COLLECTIVES = (
    "all_gather_object",
    "broadcast_object_list",
    "all_reduce",
    "all_gather",
    "broadcast",
    "barrier",
    "reduce_scatter",
    "gather_object",
    "scatter_object_list",
    "send",
    "recv",
)
_RANK_IN_FILE = re.compile(r"-r(\d{5})-[0-9a-f]{8}-\d{3}\.safetensors$")


# --------------------------------------------------------------------------- workers


def _scenario(
    rank: int, world: int, loads: list[list[str]], save: dict[str, str] | None
) -> dict[str, Any]:
    """Load each ``[root, expected, variant]`` checkpoint, then optionally save and reload."""
    out: dict[str, Any] = {"load_problems": []}
    for root, expected_path, variant in loads:
        target = build_state(rank, world, variant, trained=False)
        zero_state(target)
        target["meta"] = {}
        loaded = ckpt.load(target, root)
        problems = mismatches(target, load_expected(expected_path))
        if loaded != STEP or target["meta"] != {"epoch": 3, "note": "sharded"}:
            problems.append(f"step {loaded}, meta {target['meta']!r}")
        out["load_problems"].append(problems)
    if save is None:
        return out
    state = build_state(rank, world, "a")
    values = full_values(state)
    if rank == 0:
        save_expected(values, save["expected"])
    result = ckpt.save(state, save["root"], step=STEP)
    tensors, _ = flatten(state)
    out["held"] = {
        name: [list(t.box.offsets), list(t.box.lengths)]
        for name, t in tensors.items()
        if t.local.numel()
    }
    out["bytes_written"] = result.bytes_written
    out["files"] = result.files
    out["committed"] = result.committed
    # Same layout, fresh objects (FSDP model from another seed, Adam that never stepped).
    target = build_state(rank, world, "a", trained=False)
    zero_state(target)
    ckpt.load(target, save["root"])
    out["same_layout_problems"] = mismatches(target, values)
    return out


# --------------------------------------------------------------------------- checks


def _safetensors_header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _check_checkpoint(
    root: Path, world: int, per_rank: list[dict[str, Any]], expected: dict[str, torch.Tensor]
) -> dict[int, int]:
    """Checks (a)-(c) on a committed checkpoint; returns the raw bytes each rank wrote."""
    from safetensors import safe_open

    backend = LocalBackend(root)
    listing = scan_steps(backend)
    assert listing.committed == (STEP,) and listing.uncommitted == ()
    manifest = read_manifest(backend, STEP)
    assert manifest.world_size == world
    assert set(manifest.tensors) == set(expected)
    step_dir = root / step_prefix(STEP)
    on_disk = {str(p.relative_to(step_dir)) for p in (step_dir / "data").iterdir()}
    # Every rank's index file (format v2) too; the embedded coordinator's reports are not.
    on_disk |= {w.index for w in manifest.writers if (step_dir / w.index).is_file()}
    assert len(manifest.writers) == world
    assert on_disk == set(manifest.files), "every data file is named by the manifest, and exists"

    raw_per_rank: dict[int, int] = defaultdict(int)
    files_per_rank: dict[int, int] = defaultdict(int)
    stored_per_rank: dict[int, int] = defaultdict(int)
    headers = 0
    indexes = {w.index for w in manifest.writers}
    for path, size in manifest.files.items():
        if path in indexes:
            assert path.startswith(f"index/{manifest.generation}-r"), path
            continue
        match = _RANK_IN_FILE.search(path)
        assert match and path.startswith(f"data/{manifest.generation}-"), path
        writer = int(match.group(1))
        files_per_rank[writer] += 1
        stored_per_rank[writer] += size
        assert (step_dir / path).stat().st_size == size
        headers += _safetensors_header_bytes(step_dir / path)

    unique = 0
    for name, entry in manifest.tensors.items():
        want = expected[name]
        assert entry.shape == tuple(want.shape) and entry.dtype == str(want.dtype).removeprefix(
            "torch."
        )
        itemsize = element_size(entry.dtype)
        unique += want.numel() * itemsize
        # (a) the pieces tile the global tensor exactly once.
        cover = torch.zeros(entry.shape, dtype=torch.int32)
        for piece in entry.pieces:
            region = tuple(slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.lengths))
            cover[region] += 1
            assert piece.codec == "raw" and piece.byte_length == piece.box.numel * itemsize
            writer = int(_RANK_IN_FILE.search(piece.file).group(1))  # type: ignore[union-attr]
            raw_per_rank[writer] += piece.byte_length
            # (c) the writer holds this piece, and its file holds exactly its data.
            assert [list(piece.box.offsets), list(piece.box.lengths)] == per_rank[writer]["held"][
                name
            ], f"{name} {piece.box} written by rank {writer}, which does not hold it"
            with safe_open(str(step_dir / piece.file), "pt") as f:
                assert torch.equal(f.get_tensor(name), want[region]), name
        assert bool((cover == 1).all()), (
            f"{name}: pieces cover some elements {cover.unique().tolist()} times"
        )

    # (b) written bytes == unique bytes: no replica stored twice.
    assert sum(raw_per_rank.values()) == unique
    assert sum(manifest.data_files.values()) == unique + headers
    for r in range(world):
        assert per_rank[r]["committed"]
        assert per_rank[r]["files"] == files_per_rank.get(r, 0)
        assert per_rank[r]["bytes_written"] == stored_per_rank.get(r, 0)
    return {r: raw_per_rank.get(r, 0) for r in range(world)}


def _imbalance(per_rank: dict[int, int]) -> float:
    values = list(per_rank.values())
    return max(values) / (sum(values) / len(values))


def _consolidate(root: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint into plain full tensors in this process (no process group)."""
    assert not dist.is_initialized()
    state: dict[str, Any] = {key: {} for key in TOP_KEYS}
    assert ckpt.load(state, root) == STEP
    assert state["meta"] == {"epoch": 3, "note": "sharded"}
    return named_tensors(state)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 ranks saved every layout and reloaded it onto the same layout."""
    base = tmp_path_factory.mktemp("four")
    save = {"root": str(base / "ckpt"), "expected": str(base / "expected.safetensors")}
    results = run_ranks(_scenario, 4, [], save, timeout_s=TIMEOUT_S)
    return {"root": Path(save["root"]), "expected": Path(save["expected"]), "ranks": results}


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, four: dict[str, Any]) -> dict[str, Any]:
    """2 ranks loaded the 4-rank checkpoint onto layout "b", then saved layout "a"."""
    base = tmp_path_factory.mktemp("two")
    save = {"root": str(base / "ckpt"), "expected": str(base / "expected.safetensors")}
    loads = [[str(four["root"]), str(four["expected"]), "b"]]
    results = run_ranks(_scenario, 2, loads, save, timeout_s=TIMEOUT_S)
    return {"root": Path(save["root"]), "expected": Path(save["expected"]), "ranks": results}


# --------------------------------------------------------------------------- tests


def test_four_ranks_commit_one_tiled_deduplicated_checkpoint(four: dict[str, Any]) -> None:
    """(a)-(c) on 4 ranks: one manifest whose pieces tile every tensor once, written bytes
    equal unique bytes, each rank wrote only pieces it holds, busiest writer <= 1.5x mean."""
    expected = load_expected(four["expected"])
    per_rank = _check_checkpoint(four["root"], 4, four["ranks"], expected)
    assert _imbalance(per_rank) <= 1.5, per_rank
    # Every replicated piece (plain tensors, Replicate DTensors, DP copies) was held by
    # several ranks and written by one.
    held_by = defaultdict(list)
    for r, result in enumerate(four["ranks"]):
        for name, box in result["held"].items():
            held_by[(name, json.dumps(box))].append(r)
    assert len([k for k, ranks in held_by.items() if len(ranks) == 4]) >= REPLICATED_COUNT
    assert any(len(ranks) == 2 for ranks in held_by.values())  # 2x2 mesh / TP x DP copies


def test_four_ranks_reload_same_layout_bit_identical(four: dict[str, Any]) -> None:
    """(d) Every tensor, FSDP2 parameters and Adam moments included, reloads bit for bit."""
    for result in four["ranks"]:
        assert result["same_layout_problems"] == []


def test_consolidated_load_on_one_process(four: dict[str, Any], two: dict[str, Any]) -> None:
    """(d) Without a process group, ckpt.load assembles full plain tensors bit for bit."""
    for run in (four, two):
        expected = load_expected(run["expected"])
        loaded = _consolidate(run["root"])
        assert set(loaded) == set(expected)
        for name, value in loaded.items():
            assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name


def test_reshard_four_to_two_ranks(four: dict[str, Any], two: dict[str, Any]) -> None:
    """(d) A 4-rank checkpoint loads on 2 ranks with another layout (incl. FSDP2 + Adam)."""
    for result in two["ranks"]:
        assert result["load_problems"] == [[]]


def test_two_ranks_save_and_reload(two: dict[str, Any]) -> None:
    """(a)-(d) on 2 ranks."""
    expected = load_expected(two["expected"])
    per_rank = _check_checkpoint(two["root"], 2, two["ranks"], expected)
    assert _imbalance(per_rank) <= 1.5, per_rank
    for result in two["ranks"]:
        assert result["same_layout_problems"] == []


def test_reshard_two_to_three_ranks(two: dict[str, Any]) -> None:
    """(d) A 2-rank checkpoint loads on 3 ranks (uneven Shard(0), FSDP2 + Adam)."""
    loads = [[str(two["root"]), str(two["expected"]), "b"]]
    for result in run_ranks(_scenario, 3, loads, None, timeout_s=TIMEOUT_S):
        assert result["load_problems"] == [[]]


@pytest.mark.slow
def test_reshard_matrix_with_three_ranks_in_the_middle(
    four: dict[str, Any], two: dict[str, Any], tmp_path: Path
) -> None:
    """(d) 4 -> 3 ranks (every shard uneven), a 3-rank save checked like the others,
    then 3 -> 4 and 2 -> 4 ranks back onto the 2x2-mesh layout."""
    save = {"root": str(tmp_path / "ckpt3"), "expected": str(tmp_path / "expected3.safetensors")}
    loads = [[str(four["root"]), str(four["expected"]), "a"]]
    three = run_ranks(_scenario, 3, loads, save, timeout_s=TIMEOUT_S)
    for result in three:
        assert result["load_problems"] == [[]] and result["same_layout_problems"] == []
    per_rank = _check_checkpoint(Path(save["root"]), 3, three, load_expected(save["expected"]))
    assert _imbalance(per_rank) <= 1.5, per_rank
    loads = [[save["root"], save["expected"], "a"], [str(two["root"]), str(two["expected"]), "a"]]
    for result in run_ranks(_scenario, 4, loads, None, timeout_s=TIMEOUT_S):
        assert result["load_problems"] == [[], []]


# --------------------------------------------------------------------------- manager, RNG, disagreement


def _coordination(rank: int, world: int, base: str) -> dict[str, Any]:
    """CheckpointManager policy agreement, retention, per-rank RNG, and disagreeing ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import ckpt.retention

    out: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world,))
    weight = distribute_tensor(global_value("mgr.w", (8, 4), torch.float32), mesh, [Shard(0)])
    state: dict[str, Any] = {"w": weight, "bias": torch.zeros(3), "meta": {"step": 0}}

    # Background threads never call a collective: record the thread of every call.
    collective_threads: list[str] = []
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def recording(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            collective_threads.append(threading.current_thread().name)
            return originals[name](*args, **kwargs)

        return call

    for name in _COLLECTIVES:
        setattr(dist, name, recording(name))

    # (e) every_steps + keep_last: same saves on every rank; retention runs on the committer only.
    saved = []
    with (
        mock.patch.object(ckpt.retention, "apply_retention", wraps=apply_retention) as retention,
        ckpt.CheckpointManager(f"{base}/steps", every_steps=2, keep_last=2, if_busy="wait") as mgr,
    ):
        for step in range(1, 10):
            with torch.no_grad():
                weight.to_local().add_(1.0)
                state["bias"].add_(float(step))
            state["meta"] = {"step": step}
            if mgr.maybe_save(step, state) is not None:
                saved.append(step)
        mgr.wait()
    dist.barrier()  # the committer's retention of the last step ran before its save resolved
    out["saved"] = saved
    out["retention_calls"] = retention.call_count
    for name, original in originals.items():
        setattr(dist, name, original)
    out["collective_threads"] = sorted(set(collective_threads))
    out["committed"] = committed_steps(LocalBackend(f"{base}/steps"))
    restored_state: dict[str, Any] = {
        "w": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]),
        "bias": torch.zeros(3),
        "meta": {},
    }
    with ckpt.CheckpointManager(f"{base}/steps", manual=True) as mgr:
        out["restored"] = mgr.restore(restored_state)
    want = global_value("mgr.w", (8, 4), torch.float32)
    for _ in range(8):
        want.add_(1.0)
    out["restored_ok"] = bool(
        torch.equal(restored_state["w"].full_tensor(), want)
        and torch.equal(restored_state["bias"], torch.full((3,), float(sum(range(1, 9)))))
        and restored_state["meta"] == {"step": 8}
    )

    # (e) every_seconds: due on rank 0 only, saved on every rank together.
    period = 0.01 if rank == 0 else 1e6
    timed = []
    with ckpt.CheckpointManager(
        f"{base}/timed", every_seconds=period, keep_last=None, if_busy="wait"
    ) as mgr:
        for step in range(1, 4):
            if rank == 0:
                time.sleep(2 * period)
            pending = mgr.maybe_save(step, state)
            if pending is not None:
                timed.append([step, pending.result(timeout=60).committed])
    out["timed"] = timed
    out["timed_committed"] = committed_steps(LocalBackend(f"{base}/timed"))

    # (f) include_rng: each rank gets its own streams back.
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    np.random.seed(300 + rank)
    torch.randn(5)
    with ckpt.CheckpointManager(f"{base}/rng", include_rng=True, manual=True) as mgr:
        mgr.save(1, state, blocking=True)

    def draw() -> list[float]:
        return [*torch.randn(3).tolist(), random.random(), float(np.random.rand())]

    out["rng_expected"] = draw()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    with ckpt.CheckpointManager(f"{base}/rng", include_rng=True, manual=True) as mgr:
        out["rng_restored_step"] = mgr.restore(state)
    out["rng_after_restore"] = draw()

    # (g) ranks that disagree on a tensor: a clear error on every rank, nothing committed.
    root = f"{base}/disagree"
    good = ckpt.ShardedTensor(
        global_value("g", (8, 4), torch.float32)[rank * 4 : rank * 4 + 4].clone(),
        (8, 4),
        (rank * 4, 0),
    )
    ckpt.save({"t": good}, root, step=1, coordinator=ProcessGroupCoordinator(timeout=60))
    rows = 4 if rank == 0 else 2
    cases: dict[str, Any] = {
        "global_shape": ckpt.ShardedTensor(
            torch.ones(rows, 4), (8, 4) if rank == 0 else (6, 4), (rank * 4, 0)
        ),
        "plain_shape": torch.ones(3 + rank),
        "plain_dtype": torch.ones(3, dtype=torch.float32 if rank == 0 else torch.float64),
        # 3 + 3 rows of 6: the element count matches, but rows 1-2 twice and 4-5 never.
        "overlap": ckpt.ShardedTensor(torch.ones(3, 4), (6, 4), (rank, 0)),
        # 3 + 3 rows of 8: two rows never saved.
        "gap": ckpt.ShardedTensor(torch.ones(3, 4), (8, 4), (rank * 5, 0)),
    }
    errors: dict[str, str] = {}
    for number, (case, value) in enumerate(cases.items(), start=2):
        try:
            ckpt.save(
                {"t": value}, root, step=number, coordinator=ProcessGroupCoordinator(timeout=60)
            )
            errors[case] = "committed"
        except ckpt.CheckpointError as exc:
            errors[case] = f"{type(exc).__name__}: {exc}"
        dist.barrier()
    out["errors"] = errors
    out["disagree_committed"] = committed_steps(LocalBackend(root))

    # Saving the same step again after a failed attempt (one coordinator) commits on every rank.
    retry: list[str] = []
    with ckpt.CheckpointManager(f"{base}/retry", keep_last=None, manual=True) as mgr:
        for value in (torch.ones(3 + rank), torch.full((3,), 5.0)):
            try:
                retry.append(str(mgr.save(3, {"t": value}, blocking=True).result().committed))
            except ckpt.CheckpointError as exc:
                retry.append(f"{type(exc).__name__}: {exc}")
            dist.barrier()
        loaded: dict[str, Any] = {"t": torch.zeros(3)}
        retry.append(str(mgr.restore(loaded)) + str(loaded["t"].tolist()))
    out["retry"] = retry
    return out


@pytest.fixture(scope="module")
def coordination(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One 2-rank run of the manager, RNG and disagreement scenarios."""
    return run_ranks(_coordination, 2, str(tmp_path_factory.mktemp("coord")), timeout_s=TIMEOUT_S)


def test_manager_ranks_agree_on_saves_and_retention_runs_once(
    coordination: list[dict[str, Any]],
) -> None:
    """(e) every_steps/keep_last on 2 ranks: identical saves, retention only on the committer,
    the retention window holds, and a restore brings back the newest step on every rank."""
    for result in coordination:
        assert result["saved"] == [2, 4, 6, 8]
        assert result["committed"] == [8, 6]
        assert result["restored"] == 8 and result["restored_ok"]
    assert [r["retention_calls"] for r in coordination] == [4, 0]


def test_no_collective_from_a_background_thread(coordination: list[dict[str, Any]]) -> None:
    """Issue 3.2: during the managed async saves, every collective ran in the training thread."""
    for result in coordination:
        assert result["collective_threads"] == ["MainThread"]


def test_manager_every_seconds_saves_on_all_ranks_together(
    coordination: list[dict[str, Any]],
) -> None:
    """(e) A time-based save due on rank 0 only happens on every rank (all-reduced decision)."""
    for result in coordination:
        assert result["timed"] == [[1, True], [2, True], [3, True]]
        assert result["timed_committed"] == [3, 2, 1]


def test_include_rng_restores_each_ranks_own_stream(coordination: list[dict[str, Any]]) -> None:
    """(f) include_rng=True on 2 ranks: each rank draws, after restore, what it would have drawn."""
    for result in coordination:
        assert result["rng_restored_step"] == 1
        assert result["rng_after_restore"] == result["rng_expected"]
    assert coordination[0]["rng_expected"] != coordination[1]["rng_expected"]


@pytest.mark.parametrize("case", ["global_shape", "plain_shape", "plain_dtype", "overlap", "gap"])
def test_disagreeing_ranks_get_a_clear_error(coordination: list[dict[str, Any]], case: str) -> None:
    """(g) Ranks that disagree on a tensor's shape or dtype, or whose shards overlap or leave
    holes, fail on every rank naming the tensor; the previous checkpoint stays the newest."""
    for rank, result in enumerate(coordination):
        message = result["errors"][case]
        assert message != "committed", f"rank {rank}: a torn checkpoint was committed ({case})"
        assert "'t'" in message, message
        assert result["disagree_committed"] == [1]


def test_a_step_saved_again_after_a_failed_attempt_commits_on_every_rank(
    coordination: list[dict[str, Any]],
) -> None:
    """After ranks disagreed at step 3, saving step 3 again with the same manager commits on
    every rank (no rank trips over the failed attempt's abort marker or reports)."""
    for result in coordination:
        first, second, restored = result["retry"]
        assert first.startswith("CoordinationError") and "'t'" in first
        assert second == "True"
        assert restored == "3[5.0, 5.0, 5.0]"

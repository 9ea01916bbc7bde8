"""Resharded load: ckpt against DCP's load-time resharding of the same DTensor state.

    .venv/bin/python -m benchmarks.bench_reshard [--mib 256] [--repeats 2] [--dir .bench]

For each source world size N in {2, 4} it spawns N gloo ranks that build the same
global state as ``Shard(0)`` DTensors on a 1-D mesh (four large float32 matrices that
total ``--mib`` MiB, plus small vectors and a small matrix) and save it once with
``ckpt.save`` and once with ``torch.distributed.checkpoint.save``.

For each pair N -> M in (2 -> 1, 4 -> 2, 2 -> 3) it spawns M ranks that build the same
tensors as empty ``Shard(0)`` DTensors on an M-rank mesh and, per repeat, in an order
that alternates between repeats, evict the page cache of both checkpoints (fsync +
``posix_fadvise(DONTNEED)`` per file) and time ``ckpt.restore`` and
``torch.distributed.checkpoint.load`` into those targets (both tools imported before the
first timing). A timing starts and ends on a barrier; the reported time is the max over
ranks, median over repeats, and every repeat's ckpt and DCP times are printed. Read
amplification is ckpt's bytes read / bytes needed, summed over the ranks. Both results
are compared bit for bit with the expected tensors after the first repeat.

Planning scaling (one process, no I/O): ``recovery.plan_reads`` for 8 target
row ranges over a tensor stored as 1k, 10k and 100k row pieces.

The disk and CPUs are shared with whatever else runs: compare only numbers of one run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks._harness import PageCache, run_gloo_world

INIT_TIMEOUT_S = 60
PAGE_CACHE = PageCache()
SOURCES = (2, 4)
PAIRS = ((2, 1), (4, 2), (2, 3))
COLS = 1024
N_LARGE = 4
N_SMALL = 16
SMALL_ROWS = 1000
PLAN_PIECES = (1_000, 10_000, 100_000)
PLAN_TARGETS = 8

TARGET_AMPLIFICATION = 1.05
TARGET_SPEEDUP = 1.5
TARGET_PLAN_GROWTH = 2.0  # per-piece planning time at 100k pieces vs at 1k pieces


# --------------------------------------------------------------------------- state


def global_tensors(total_bytes: int) -> dict[str, torch.Tensor]:
    """The full tensors, the same on every rank and every run (seeded per tensor)."""
    rows = max(1, total_bytes // (N_LARGE * COLS * 4))
    out: dict[str, torch.Tensor] = {}
    shapes: list[tuple[str, tuple[int, ...]]] = [
        (f"large.{i}", (rows, COLS)) for i in range(N_LARGE)
    ]
    shapes += [(f"small.{i}", (SMALL_ROWS,)) for i in range(N_SMALL)]
    shapes.append(("small.matrix", (97, 64)))
    for seed, (name, shape) in enumerate(shapes):
        gen = torch.Generator().manual_seed(1000 + seed)
        out[name] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out


def sharded_state(full: dict[str, torch.Tensor], empty: bool) -> dict[str, Any]:
    """``Shard(0)`` DTensors of ``full`` on a mesh of all ranks (zeros when ``empty``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    state: dict[str, Any] = {}
    for name, tensor in full.items():
        chunks = torch.chunk(tensor, world, dim=0)  # DTensor's Shard(0) split
        local = chunks[rank] if rank < len(chunks) else tensor[tensor.shape[0] :]
        local = torch.zeros_like(local) if empty else local.clone()
        state[name] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=tensor.shape, stride=tensor.stride()
        )
    return state


def expected_local(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    world = dist.get_world_size()
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        chunks = torch.chunk(tensor, world, dim=0)
        out[name] = chunks[rank] if rank < len(chunks) else tensor[tensor.shape[0] :]
    return out


def zero_(state: dict[str, Any]) -> None:
    for value in state.values():
        value.to_local().zero_()


def mismatches(state: dict[str, Any], expected: dict[str, torch.Tensor]) -> list[str]:
    bad = []
    for name, want in expected.items():
        got = state[name].to_local()
        if got.shape != want.shape or not torch.equal(
            got.view(torch.int32), want.view(torch.int32)
        ):
            bad.append(name)
    return bad


def dirs(root: Path, source: int) -> tuple[Path, Path]:
    return root / f"n{source}" / "ckpt", root / f"n{source}" / "dcp"


# --------------------------------------------------------------------------- ranks


def save_rank(root: Path, total_bytes: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import ckpt

    world = dist.get_world_size()
    state = sharded_state(global_tensors(total_bytes), empty=False)
    dir_ckpt, dir_dcp = dirs(root, world)
    dist.barrier()
    start = time.perf_counter()
    ckpt.save(state, str(dir_ckpt), step=1)
    dist.barrier()
    ckpt_s = time.perf_counter() - start
    start = time.perf_counter()
    dcp.save(state, checkpoint_id=str(dir_dcp))
    dist.barrier()
    return {"ckpt_save_s": ckpt_s, "dcp_save_s": time.perf_counter() - start}


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def sum_over_ranks(*values: int) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def load_rank(root: Path, source: int, total_bytes: int, repeats: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import ckpt

    # Both tools' modules are imported before the timings: DCP's above, and ckpt's restore
    # path here (``ckpt`` imports it on first use of ``ckpt.restore``; where bytecode is not
    # cached, PYTHONDONTWRITEBYTECODE=1, that first use compiles ~90 modules per process).
    restore = ckpt.restore
    rank = dist.get_rank()
    full = global_tensors(total_bytes)
    expected = expected_local(full)
    state = sharded_state(full, empty=True)
    del full
    dir_ckpt, dir_dcp = dirs(root, source)
    samples: dict[str, list[float]] = {"ckpt": [], "dcp": []}
    amplification: list[float] = []
    read_bytes: list[int] = []
    checks: dict[str, list[str]] = {}

    def run_ckpt() -> None:
        report = restore(state, str(dir_ckpt))
        stats = report.stats
        needed, read = (stats.bytes_needed, stats.bytes_read) if stats is not None else (0, 0)
        total_needed, total_read = sum_over_ranks(needed, read)
        amplification.append(total_read / total_needed if total_needed else math.nan)
        read_bytes.append(total_read)

    def run_dcp() -> None:
        dcp.load(state, checkpoint_id=str(dir_dcp))

    tools = {"ckpt": run_ckpt, "dcp": run_dcp}
    for i in range(repeats):
        order = ["ckpt", "dcp"] if i % 2 == 0 else ["dcp", "ckpt"]
        for name in order:
            zero_(state)
            if rank == 0:
                PAGE_CACHE.evict(dir_ckpt)
                PAGE_CACHE.evict(dir_dcp)
            dist.barrier()
            start = time.perf_counter()
            tools[name]()
            dist.barrier()
            samples[name].append(max_over_ranks(time.perf_counter() - start))
            if i == 0:
                bad = mismatches(state, expected)
                flags = sum_over_ranks(len(bad))
                checks[name] = [] if flags[0] == 0 else (bad or ["(on another rank)"])
    return {
        "samples": samples,
        "amplification": amplification,
        "read_bytes": read_bytes,
        "checks": checks,
    }


def run_world(world: int, job: str, args: list[Any]) -> dict[str, Any]:
    """Spawn ``world`` gloo ranks running ``job`` ("save" or "load"); return rank 0's result."""
    fn = save_rank if job == "save" else load_rank
    return dict(run_gloo_world(world, fn, *args, init_timeout_s=INIT_TIMEOUT_S))


# --------------------------------------------------------------------------- planning


def plan_time(pieces: int, repeats: int) -> float:
    """Median seconds of ``plan_reads`` over a tensor stored as ``pieces`` row pieces."""
    from ckpt.format import Box, StoredPiece, TensorEntry
    from recovery import plan_reads

    rows_per_piece, cols = 4, 16
    piece_bytes = rows_per_piece * cols * 4
    rows = pieces * rows_per_piece
    stored = tuple(
        StoredPiece.at(
            box=Box((i * rows_per_piece, 0), (rows_per_piece, cols)),
            file=f"data/rank{i % 64:05d}.safetensors",
            byte_offset=(i // 64) * piece_bytes,
            byte_length=piece_bytes,
            codec="raw",
            checksums="0" * 16,
        )
        for i in range(pieces)
    )
    entry = TensorEntry("float32", (rows, cols), stored)
    bounds = [rows * k // PLAN_TARGETS for k in range(PLAN_TARGETS + 1)]
    targets = [
        (k, Box((bounds[k], 0), (bounds[k + 1] - bounds[k], cols))) for k in range(PLAN_TARGETS)
    ]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        requests = plan_reads("w", entry, targets)
        times.append(time.perf_counter() - start)
        assert len(requests) >= pieces
    return statistics.median(times)


# --------------------------------------------------------------------------- main


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="MiB of the large sharded tensors")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--dir", type=Path, default=Path(".bench"), help="parent of the checkpoint folders"
    )
    parser.add_argument("--plan-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    total_bytes = args.mib << 20
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="reshard-", dir=args.dir))
    print(
        f"bench_reshard: {args.mib} MiB, {args.repeats} repeats, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, dir {root}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    try:
        for source in SOURCES:
            saved = run_world(source, "save", [root, total_bytes])
            print(
                f"  saved {source} ranks: ckpt {saved['ckpt_save_s']:.2f} s, DCP {saved['dcp_save_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
        for source, target in PAIRS:
            result = run_world(target, "load", [root, source, total_bytes, args.repeats])
            result["pair"] = f"{source} -> {target}"
            rows.append(result)
            print(f"  loaded {source} -> {target}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(
        f"{'pair':<8} {'ckpt s':>8} {'DCP s':>8} {'speedup':>8} {'ckpt read ampl.':>16}  "
        "bit-identical  per repeat: ckpt s / DCP s = speedup"
    )
    ok_ampl = ok_speed = ok_bits = True
    for r in rows:
        ckpt_s = statistics.median(r["samples"]["ckpt"])
        dcp_s = statistics.median(r["samples"]["dcp"])
        speed = statistics.median(d / c for c, d in zip(r["samples"]["ckpt"], r["samples"]["dcp"]))
        ampl = max(r["amplification"])
        bits = not r["checks"]["ckpt"] and not r["checks"]["dcp"]
        ok_ampl &= ampl <= TARGET_AMPLIFICATION
        ok_speed &= speed >= TARGET_SPEEDUP
        ok_bits &= bits
        check = "yes" if bits else f"NO ckpt={r['checks']['ckpt']} dcp={r['checks']['dcp']}"
        repeats = ", ".join(
            f"{c:.3f}/{d:.3f}={d / c:.2f}x"
            for c, d in zip(r["samples"]["ckpt"], r["samples"]["dcp"])
        )
        print(
            f"{r['pair']:<8} {ckpt_s:>8.3f} {dcp_s:>8.3f} {speed:>7.2f}x {ampl:>16.4f}  "
            f"{check:<13}  {repeats}"
        )
    print(
        "(time: max over ranks, median over repeats; speedup: median of per-repeat DCP/ckpt; "
        "amplification: worst repeat)"
    )

    print()
    print(f"{'pieces':>8} {'plan s':>10} {'us/piece':>9}")
    plan: dict[int, float] = {}
    for pieces in PLAN_PIECES:
        plan[pieces] = plan_time(pieces, args.plan_repeats)
        print(f"{pieces:>8} {plan[pieces]:>10.4f} {plan[pieces] / pieces * 1e6:>9.2f}")
    lo, hi = PLAN_PIECES[0], PLAN_PIECES[-1]
    slope = math.log(plan[hi] / plan[lo]) / math.log(hi / lo)
    growth = (plan[hi] / hi) / (plan[lo] / lo)
    print(
        f"(plan_reads for {PLAN_TARGETS} target row ranges; log-log slope {lo}..{hi}: {slope:.2f}, "
        f"per-piece time {hi} vs {lo}: {growth:.2f}x)"
    )

    print()
    print(f"{verdict(ok_ampl)}  read amplification <= {TARGET_AMPLIFICATION} for every pair")
    print(
        f"{verdict(ok_speed)}  resharded load >= {TARGET_SPEEDUP}x faster than DCP for every pair"
    )
    print(
        f"{verdict(growth <= TARGET_PLAN_GROWTH)}  planning time roughly linear "
        f"(per-piece time at {hi} <= {TARGET_PLAN_GROWTH}x that at {lo})"
    )
    print(f"{verdict(ok_bits)}  both loads bit-identical to the expected tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

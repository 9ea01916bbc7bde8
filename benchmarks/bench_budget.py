"""ckpt's staging budget: a save's peak host memory and stall against the budget.

    .venv/bin/python -m benchmarks.bench_budget [--gib 2] [--budgets none,512,128]
                                                [--repeats 2] [--dir PATH] [--device cpu]
                                                [--zstd] [--json OUT]

For each budget (MiB; ``none`` stages the whole state at once, the default), a fresh
process builds bench_local's model + Adam-like state on ``--device``, then runs a first
``ckpt.async_save`` (which allocates the staging buffer) and ``--repeats`` more, each to
commit, into a step that is deleted afterwards. It reports the buckets a save ran in,
``Snapshotter.staging_bytes`` (and the page-locked part), the peak RSS above the RSS
with the state built (sampled with psutil every millisecond, and the kernel's high-water
mark ``VmHWM``, reset once the state is built), the stall (until ``async_save`` returns)
and the save (until ``result()``). Between those processes this one writes the same
number of bytes to one file in 64 MiB blocks plus ``fsync`` (the raw write), and the
table divides the stall and the save by the median raw write (two after each process,
after one warm-up write).

Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

import ckpt
from benchmarks._harness import git_revision, human_bytes, iter_tensors, median
from benchmarks.bench_local import build_state, write_file
from ckpt.coordination import LocalCoordinator
from ckpt.format import step_prefix
from storage_backends import LocalBackend

MiB = 1 << 20
SAMPLE_S = 0.001


class PeakRss:
    """The largest RSS seen by a thread that samples it (psutil) until ``stop``."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak: int = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5\n")
    except OSError:
        return False
    return True


def high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class BucketCount(logging.Handler):
    """The bucket count of the last save, from the engine's INFO line (1 when it logs none)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.buckets = 1

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r" in (\d+) buckets ", record.getMessage())
        if found:
            self.buckets = int(found.group(1))


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """One budget, in this (fresh) process: the child's part."""
    budget = None if args.child == "none" else int(args.child) * MiB
    device = torch.device(args.device)
    state = build_state(int(args.gib * (1 << 30)))
    if device.type != "cpu":
        for _, t in iter_tensors(state):
            t.data = t.data.to(device)
        torch.cuda.synchronize(device)
    nbytes = sum(t.nbytes for _, t in iter_tensors(state))
    compression = ckpt.Compression(level=1) if args.zstd else None
    options = ckpt.SaveOptions(staging_budget_bytes=budget, compression=compression)
    snap = ckpt.Snapshotter(options)
    counter = BucketCount()
    logging.getLogger("ckpt.engine").addHandler(counter)
    logging.getLogger("ckpt.engine").setLevel(logging.INFO)
    root = Path(args.dir)
    backend = LocalBackend(root)
    coordinator = LocalCoordinator()

    baseline = psutil.Process().memory_info().rss
    hwm_reset = reset_high_water_mark()
    sampler = PeakRss()
    stalls, saves = [], []
    for step in range(1, args.repeats + 2):
        start = time.perf_counter()
        pending = snap.async_save(state, backend, step, coordinator)
        stall = time.perf_counter() - start
        pending.result()
        saves.append(time.perf_counter() - start)
        stalls.append(stall)
        shutil.rmtree(root / step_prefix(step))
    peak = sampler.stop()
    hwm = high_water_mark() if hwm_reset else 0
    result = {
        "budget": budget,
        "bytes": nbytes,
        "buckets": counter.buckets,
        "staging_bytes": snap.staging_bytes,
        "pinned_bytes": snap.pinned_bytes,
        "peak_rss_over_state": peak - baseline,
        "hwm_over_state": (hwm - baseline) if hwm_reset else None,
        "first_stall_s": stalls[0],
        "first_save_s": saves[0],
        "stall_s": stalls[1:],
        "save_s": saves[1:],
    }
    snap.close()
    return result


def raw_write(root: Path, data: np.ndarray) -> float:
    """Seconds to write ``data`` (already in memory) to one file in 64 MiB blocks + fsync."""
    path = root / "raw.bin"
    start = time.perf_counter()
    write_file(path, memoryview(data))  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def run_child(args: argparse.Namespace, budget: str, directory: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_budget",
        "--child",
        budget,
        "--gib",
        str(args.gib),
        "--repeats",
        str(args.repeats),
        "--dir",
        str(directory),
        "--device",
        args.device,
    ] + (["--zstd"] if args.zstd else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"budget {budget}: the measuring process failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def label(budget: int | None) -> str:
    return "unlimited" if budget is None else human_bytes(budget)


def format_report(args: argparse.Namespace, rows: list[dict[str, Any]], raw: list[float]) -> str:
    nbytes = rows[0]["bytes"]
    raw_s = median(raw)
    lines = [
        f"ckpt staging budget: {human_bytes(nbytes)} state on {args.device}, "
        f"{'zstd level 1' if args.zstd else 'raw'}, {args.repeats} repeats after a first "
        f"save (medians), under {args.dir}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"ckpt {git_revision(Path(__file__).resolve().parent.parent)}, "
        f"{os.cpu_count()} CPUs",
        "",
        f"{'budget':>10} {'buckets':>7} {'staging':>10} {'pinned':>10} "
        f"{'peak RSS':>10} {'VmHWM':>10} {'1st stall':>9} {'stall s':>8} {'save s':>7} "
        f"{'stall/raw':>9} {'save/raw':>8}",
    ]
    for r in rows:
        hwm = r["hwm_over_state"]
        stall, save = median(r["stall_s"]), median(r["save_s"])
        lines.append(
            f"{label(r['budget']):>10} {r['buckets']:>7} {human_bytes(r['staging_bytes']):>10} "
            f"{human_bytes(r['pinned_bytes']):>10} {human_bytes(r['peak_rss_over_state']):>10} "
            f"{(human_bytes(hwm) if hwm is not None else 'n/a'):>10} "
            f"{r['first_stall_s']:>9.3f} {stall:>8.3f} {save:>7.3f} "
            f"{stall / raw_s:>9.2f} {save / raw_s:>8.2f}"
        )
    lines += [
        "",
        f"raw write + fsync of the same {human_bytes(nbytes)}: {raw_s:.3f} s "
        f"({nbytes / raw_s / 1e9:.2f} GB/s; median of {len(raw)}: "
        + ", ".join(f"{s:.3f}" for s in raw)
        + ")",
        "peak RSS and VmHWM: above the RSS with the state built, over the first save and "
        "the repeats (VmHWM also counts pages the allocator keeps after a save)",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="state size in GiB")
    parser.add_argument(
        "--budgets", default="none,512,128", help='staging budgets in MiB; "none" = unlimited'
    )
    parser.add_argument("--repeats", type=int, default=2, help="saves after the first one")
    parser.add_argument("--dir", type=Path, default=Path(".bench"), help="disk to measure")
    parser.add_argument("--device", default="cpu", help="where the state lives (cpu, cuda)")
    parser.add_argument("--zstd", action="store_true", help="compress every tensor (level 1)")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_one(args)))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    rows, raw = [], []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-budget-") as tmp:
        directory = Path(tmp)
        data: np.ndarray | None = None
        for budget in args.budgets.split(","):
            rows.append(run_child(args, budget.strip(), directory))
            if data is None:
                data = np.ones(rows[-1]["bytes"], dtype=np.uint8)
                raw_write(directory, data)  # warm-up: the first write here is often slow
            raw += [raw_write(directory, data) for _ in range(2)]
            print(f"  budget {budget}: done", file=sys.stderr, flush=True)
    report = format_report(args, rows, raw)
    print(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "raw_write_s": raw}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

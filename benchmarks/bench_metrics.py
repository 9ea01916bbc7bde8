"""Overhead of ckpt's Prometheus metrics and profiler spans on a save of many small tensors.

Two kinds of child process run the same saves of a state of ``--tensors`` small tensors
to a local folder: one with ``prometheus_client`` importable (metrics recorded, exported on
the default registry), one with its import blocked (nothing recorded). They run in turns,
``--rounds`` times each, so that a busy machine slows both alike; the table shows medians
of the stall of ``ckpt.async_save`` and of ``ckpt.save`` to commit, and the difference.
The cost of one span (a ``record_function`` entered and left, no profiler running) and of
one histogram observation plus one counter increment (what a save records at each of its
two points) are measured directly too; a save has five spans.

    .venv/bin/python -m benchmarks.bench_metrics                 # 1000 tensors, ~1 min
    .venv/bin/python -m benchmarks.bench_metrics --rounds 2 --saves 5   # smoke run

It measures and reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = """
import json, sys, time, torch
if not METRICS:
    sys.modules["prometheus_client"] = None
import ckpt, ckpt.metrics
torch.set_num_threads(1)
state = {f"t{i}": torch.randn(256) for i in range(TENSORS)}
stall, total = [], []
for i in range(WARMUP + SAVES):
    t0 = time.perf_counter()
    pending = ckpt.async_save(state, ROOT, step=i)
    t1 = time.perf_counter()
    pending.result()
    t2 = time.perf_counter()
    t3 = time.perf_counter()
    ckpt.save(state, ROOT, step=10_000 + i)
    t4 = time.perf_counter()
    if i >= WARMUP:
        stall.append(t1 - t0)
        total.append(t4 - t3)
n = 20_000
t0 = time.perf_counter()
for _ in range(n):
    with torch.profiler.record_function("ckpt.bench"):  # a span, where CUDA is not in use
        pass
span_s = (time.perf_counter() - t0) / n
record_s = 0.0
if METRICS:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    reg = CollectorRegistry()
    h = Histogram("bench_seconds", "h", ["backend", "kind"], registry=reg)
    c = Counter("bench_bytes", "c", ["backend"], registry=reg)
    t0 = time.perf_counter()
    for _ in range(n):  # what a save records at each of its two points
        h.labels("local", "async").observe(0.1)
        c.labels("local").inc(1000)
    record_s = (time.perf_counter() - t0) / n
print(json.dumps({"metrics": ckpt.metrics.available(), "stall": stall, "total": total,
                  "span": span_s, "record": record_s}))
"""


def run_child(metrics: bool, tensors: int, saves: int, root: Path) -> dict[str, object]:
    prelude = (
        f"METRICS = {metrics}\nTENSORS = {tensors}\nSAVES = {saves}\nWARMUP = 2\n"
        f"ROOT = {str(root)!r}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(CHILD)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--saves", type=int, default=10, help="timed saves per child")
    parser.add_argument("--rounds", type=int, default=3, help="children of each kind, in turns")
    args = parser.parse_args()
    samples: dict[bool, dict[str, list[float]]] = {
        on: {"stall": [], "total": [], "span": [], "record": []} for on in (False, True)
    }
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-metrics-") as tmp:
        for r in range(args.rounds):
            for on in (False, True):
                root = Path(tmp) / f"r{r}-{'on' if on else 'off'}"
                got = run_child(on, args.tensors, args.saves, root)
                if got["metrics"] is not on:
                    raise SystemExit(f"the child meant to have metrics={on} reports {got}")
                for key in ("stall", "total"):
                    samples[on][key] += got[key]  # type: ignore[arg-type]
                samples[on]["span"].append(float(got["span"]))  # type: ignore[arg-type]
                samples[on]["record"].append(float(got["record"]))  # type: ignore[arg-type]
    print(f"{args.tensors} tensors of 1 KiB, {args.rounds} x {args.saves} saves per mode")
    print(f"{'median':<28}{'no metrics':>14}{'metrics':>14}{'difference':>14}")
    for key, label in (("stall", "async_save stall, ms"), ("total", "save to commit, ms")):
        off = statistics.median(samples[False][key]) * 1e3
        on_ = statistics.median(samples[True][key]) * 1e3
        print(f"{label:<28}{off:>14.3f}{on_:>14.3f}{on_ - off:>+14.3f}")
    span_us = statistics.median(samples[True]["span"] + samples[False]["span"]) * 1e6
    record_us = statistics.median(samples[True]["record"]) * 1e6
    print(f"{'one span (no profiler), us':<28}{span_us:>14.2f}")
    print(f"{'one observe + inc, us':<28}{record_us:>14.2f}")


if __name__ == "__main__":
    main()

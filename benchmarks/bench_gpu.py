"""GPU stall: ckpt.async_save of CUDA tensors against the raw pinned device-to-host copy
and DCP's async_save, on the same tensors, in one run.

    .venv/bin/python -m benchmarks.bench_gpu [--gib 4] [--repeats 5]

Needs a CUDA device (exits with a message otherwise). The stall is the time until
training may mutate the tensors again: until ``ckpt.async_save`` returns, and for DCP
until its staging completes (a reused ``DefaultStager``, its best configuration). The
limit is one ``copy_(non_blocking=True)`` of every tensor into preallocated pinned host
memory on a side stream, synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    import ckpt

    device = torch.device("cuda")
    total = int(args.gib * (1 << 30))
    state: dict[str, torch.Tensor] = {}
    for i in range(8):  # eight large fp32/bf16 matrices hold the bytes, like weights + Adam state
        dtype = torch.bfloat16 if i % 2 else torch.float32
        rows = (total // 8) // (4096 * (2 if dtype == torch.bfloat16 else 4))
        state[f"w{i}"] = torch.randn(rows, 4096, device=device).to(dtype)
    for i in range(200):
        state[f"s{i}"] = torch.randn(4096, device=device)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in state.items()}
    side = torch.cuda.Stream()
    samples: dict[str, list[float]] = {}

    def record(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(
        StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True)
    )
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats + 1):  # the first round warms up every path
            torch.cuda.synchronize()
            t = time.perf_counter()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for k, v in state.items():
                    pinned[k].copy_(v, non_blocking=True)
            side.synchronize()
            raw = time.perf_counter() - t

            torch.cuda.synchronize()
            t = time.perf_counter()
            pending = ckpt.async_save(state, f"{tmp}/ckpt", step=repeat)
            stall = time.perf_counter() - t
            pending.result()
            total_s = time.perf_counter() - t

            torch.cuda.synchronize()
            t = time.perf_counter()
            response = dcp.async_save(
                state, checkpoint_id=f"{tmp}/dcp-{repeat}", async_stager=stager, no_dist=True
            )
            staging = getattr(response, "staging_completion", None)
            if staging is not None:
                staging.result()
            dcp_stall = time.perf_counter() - t
            upload: Any = getattr(response, "upload_completion", response)
            upload.result()
            if repeat:
                record("raw pinned D2H copy (limit)", raw)
                record("ckpt async_save stall", stall)
                record("ckpt async_save total", total_s)
                record("DCP async_save stall (reused DefaultStager)", dcp_stall)
    print(
        f"\n{torch.cuda.get_device_name()}: {nbytes / 2**30:.2f} GiB in {len(state)} CUDA tensors, "
        f"{args.repeats} repeats, medians\n"
    )
    print(f"{'operation':46s} {'median s':>9s} {'GB/s':>7s}")
    med = {k: statistics.median(v) for k, v in samples.items()}
    for name, seconds in med.items():
        print(f"{name:46s} {seconds:9.3f} {nbytes / seconds / 1e9:7.2f}")
    ratio = med["ckpt async_save stall"] / med["raw pinned D2H copy (limit)"]
    print(
        f"\n  {'PASS' if ratio <= 1.3 else 'MISS'}  ckpt stall / raw D2H copy = {ratio:.2f} (target <= 1.3)"
    )
    vs = med["ckpt async_save stall"] / med["DCP async_save stall (reused DefaultStager)"]
    print(f"  {'PASS' if vs < 1 else 'MISS'}  ckpt stall / DCP best stall = {vs:.2f} (target < 1)")


if __name__ == "__main__":
    main()

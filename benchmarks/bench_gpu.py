"""GPU save and load: ckpt against the raw pinned copies and DCP, on the same CUDA tensors,
in one run.

    python3 -m benchmarks.bench_gpu [--gib 4] [--repeats 5]
    python3 -m benchmarks.bench_gpu --gib 0.05 --repeats 1 --cpu-dry-run   # checks the script

Measured (medians over ``--repeats`` after one warm-up round, each contender in turn):

* the stall of ``async_save`` (until training may mutate the tensors again) beside the
  limit, one ``copy_(non_blocking=True)`` of every tensor into preallocated pinned host
  memory on a side stream, and beside DCP's ``async_save`` with a reused ``DefaultStager``
  (its best configuration: DCP's stall is until its staging completes);
* the first save's stall of a fresh engine, with and without ``prepare`` (allocating and
  page-locking the staging buffer ahead);
* the stall of a save issued while the previous one is still writing (one buffer: it
  waits; two buffers, ``max_in_flight=2``: it does not);
* the host memory page-locked for staging against the state's bytes (PyTorch's caching
  host allocator would round each block up to a power of two);
* a load into CUDA tensors (page cache warm) beside the raw host-to-device copy from
  pinned memory.

``--cpu-dry-run`` runs every step on CPU tensors where no CUDA device is present, so the
script is checked before a GPU machine is spent on it; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def _state(total: int, device: torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i in range(8):  # eight large fp32/bf16 matrices hold the bytes, like weights + Adam state
        dtype = torch.bfloat16 if i % 2 else torch.float32
        rows = max(1, (total // 8) // (4096 * (2 if dtype == torch.bfloat16 else 4)))
        state[f"w{i}"] = torch.randn(rows, 4096, device=device).to(dtype)
    for i in range(200):
        state[f"s{i}"] = torch.randn(4096, device=device)
    return state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-dry-run", action="store_true", help="check the script on CPU")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        raise SystemExit("bench_gpu needs a CUDA device (or --cpu-dry-run to check the script)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import ckpt
    from ckpt.coordination import LocalCoordinator
    from ckpt.format import step_prefix
    from storage_backends import LocalBackend

    device = torch.device("cuda" if cuda else "cpu")
    state = _state(int(args.gib * (1 << 30)), device)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=cuda) for k, v in state.items()}
    side = torch.cuda.Stream() if cuda else None
    samples: dict[str, list[float]] = {}
    facts: dict[str, str] = {}

    def record(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds)

    def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
        _sync(device)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        return time.perf_counter() - t, out

    def raw_d2h() -> None:
        if side is None:
            for k, v in state.items():
                pinned[k].copy_(v)
            return
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k, v in state.items():
                pinned[k].copy_(v, non_blocking=True)
        side.synchronize()

    def raw_h2d(targets: dict[str, torch.Tensor]) -> None:
        for k, v in pinned.items():
            targets[k].copy_(v, non_blocking=cuda)
        _sync(device)

    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=cuda,
            use_non_blocking_copy=cuda,
        )
    )
    engine = ckpt.Snapshotter()
    double = ckpt.Snapshotter(max_in_flight=2)
    local = LocalCoordinator()
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(f"{tmp}/ckpt")
        # First saves of fresh engines: with and without preparing the staging buffer.
        cold = ckpt.Snapshotter()
        stall, pending = timed(cold.async_save, state, backend, 1_000_000, local)
        pending.result()
        cold.close()
        shutil.rmtree(f"{tmp}/ckpt/{step_prefix(1_000_000)}")
        facts["first save stall, fresh engine (s)"] = f"{stall:.3f}"
        warm = ckpt.Snapshotter()
        prep, _ = timed(warm.prepare, state)
        stall, pending = timed(warm.async_save, state, backend, 1_000_001, local)
        pending.result()
        facts["first save stall after prepare (s)"] = f"{stall:.3f} (prepare took {prep:.3f})"
        facts["page-locked staging / state bytes"] = (
            f"{warm.pinned_bytes / 2**30:.3f} / {nbytes / 2**30:.3f} GiB"
        )
        warm.close()
        shutil.rmtree(f"{tmp}/ckpt/{step_prefix(1_000_001)}")

        targets = {k: torch.empty_like(v) for k, v in state.items()}
        for repeat in range(args.repeats + 1):  # the first round warms up every path
            step = 10 * repeat
            raw, _ = timed(raw_d2h)
            stall, pending = timed(engine.async_save, state, backend, step, local)
            total_s, _ = timed(pending.result)
            t0, response = timed(
                dcp.async_save,
                state,
                checkpoint_id=f"{tmp}/dcp-{repeat}",
                async_stager=stager,
                no_dist=True,
            )
            staging = getattr(response, "staging_completion", None)
            dcp_stall = t0 + (timed(staging.result)[0] if staging is not None else 0.0)
            upload: Any = getattr(response, "upload_completion", response)
            upload.result()

            # A save issued while the previous one still writes.
            first = engine.async_save(state, backend, step + 1, local)
            busy_one, second = timed(engine.async_save, state, backend, step + 2, local)
            first.result()
            second.result()
            first = double.async_save(state, backend, step + 3, local)
            busy_two, second = timed(double.async_save, state, backend, step + 4, local)
            first.result()
            second.result()

            raw_load, _ = timed(raw_h2d, targets)
            load_s, _ = timed(ckpt.load, targets, backend, step=step)
            # Keep the disk small (64 GiB on the device machine): drop this round's files.
            shutil.rmtree(f"{tmp}/dcp-{repeat}")
            for old in range(step, step + 5):
                shutil.rmtree(f"{tmp}/ckpt/{step_prefix(old)}")
            if repeat:
                record("raw pinned D2H copy (limit)", raw)
                record("ckpt async_save stall", stall)
                record("ckpt async_save to commit", stall + total_s)
                record("DCP async_save stall (reused DefaultStager)", dcp_stall)
                record("ckpt stall, previous save writing (1 buffer)", busy_one)
                record("ckpt stall, previous save writing (2 buffers)", busy_two)
                record("raw pinned H2D copy (load limit)", raw_load)
                record("ckpt.load into device tensors (warm)", load_s)
    engine.close()
    double.close()
    name = torch.cuda.get_device_name() if cuda else "CPU DRY RUN (figures mean nothing)"
    print(
        f"\n{name}: {nbytes / 2**30:.2f} GiB in {len(state)} tensors, "
        f"{args.repeats} repeats, medians\n"
    )
    print(f"{'operation':50s} {'median s':>9s} {'GB/s':>7s}")
    med = {k: statistics.median(v) for k, v in samples.items()}
    for key, seconds in med.items():
        print(f"{key:50s} {seconds:9.3f} {nbytes / seconds / 1e9:7.2f}")
    print()
    for key, value in facts.items():
        print(f"{key:50s} {value}")
    ratio = med["ckpt async_save stall"] / med["raw pinned D2H copy (limit)"]
    print(
        f"\n  {'PASS' if ratio <= 1.3 else 'MISS'}  ckpt stall / raw D2H copy = {ratio:.2f} (<= 1.3)"
    )
    vs = med["ckpt async_save stall"] / med["DCP async_save stall (reused DefaultStager)"]
    print(f"  {'PASS' if vs < 1 else 'MISS'}  ckpt stall / DCP best stall = {vs:.2f} (< 1)")
    load = med["raw pinned H2D copy (load limit)"] / med["ckpt.load into device tensors (warm)"]
    print(
        f"  {'PASS' if load >= 0.5 else 'MISS'}  ckpt.load speed / raw H2D copy = {load:.2f} (>= 0.5)"
    )


if __name__ == "__main__":
    main()

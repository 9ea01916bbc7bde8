"""S3 throughput: ckpt against boto3's TransferManager, and tiered save timing.

    .venv/bin/python -m benchmarks.bench_s3 [--mib 1024] [--repeats 3] [--server seaweedfs|moto]

Starts one S3-compatible server on loopback (SeaweedFS by default: a real server that
persists to disk; the server helper is shared with the tests), builds a state of a few
large fp32/bf16 tensors plus small ones, and in each repeat, interleaved, on the same
bytes:

* **TransferManager upload**: ``upload_fileobj`` of the same bytes from memory, and
  ``upload_file`` of them from a (page-cached) file, with boto3's default
  TransferConfig (8 MiB parts, 10 threads).
* **ckpt save to S3**: ``ckpt.save`` to ``s3://`` until the manifest is committed.
* **TransferManager download**: ``download_fileobj`` into memory.
* **ckpt load from S3**: ``ckpt.restore`` into preallocated tensors (checksums verified),
  10 ranged GETs of 8 MiB in flight (TransferManager's default concurrency and part size),
  each read straight into the target tensor's memory where the piece lands unchanged.
* **tiered**: ``ckpt.save`` to ``TieredBackend(local, s3)``: time to the local commit,
  then to the remote commit (``wait_replicated``).

Prints medians, GB/s and the ratios against the targets (S3 save >= 0.9x TransferManager,
restore >= 1.0x its download). Never asserts timings.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from boto3.s3.transfer import S3Transfer, TransferConfig  # noqa: F401 - documents which manager
from safetensors.torch import save as safetensors_bytes

import ckpt
from recovery import LoadOptions
from storage_backends import LocalBackend, RetryPolicy, S3Backend, TieredBackend
from tests.support.s3_servers import S3Server

# As many ranged GETs in flight as TransferManager's threads, of its part size; the S3
# config's connection pool (32) is larger, so no request waits for a connection.
LOAD_OPTIONS = LoadOptions(io_threads=10, max_request_bytes=8 << 20, read_step_bytes=8 << 20)


def build_state(mib: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    big = (mib << 20) // 4 // 4  # four large fp32 tensors take most of the bytes
    for i in range(4):
        state[f"big.{i}"] = torch.randn(big // 1024, 1024, generator=g)
    for i in range(100):
        state[f"small.{i}"] = torch.randn(1024, generator=g).bfloat16()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", default="seaweedfs", choices=["seaweedfs", "moto"])
    args = parser.parse_args()

    state = build_state(args.mib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    blob = safetensors_bytes(state)  # the same bytes, as one object for TransferManager
    samples: dict[str, list[float]] = {}

    def record(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds)

    with (
        tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp,
        S3Server(args.server, Path(tmp) / "server") as server,
    ):
        server.start()
        client = server.client()
        transfer_config = TransferConfig()  # boto3's defaults
        blob_file = Path(tmp) / "blob.safetensors"
        blob_file.write_bytes(blob)
        config = replace(server.config(), retry=RetryPolicy())

        def transfers(repeat: int) -> None:
            """TransferManager and ckpt on the same bytes; which goes first alternates
            between repeats, for the uploads/save and for the downloads/load."""
            key = f"tm/{repeat}/blob"
            backend = S3Backend(server.url(f"ckpt/{repeat}"), config)
            target = {k: torch.empty_like(v) for k, v in state.items()}
            reports: list[ckpt.RestoreReport] = []

            def tm_upload() -> None:
                t = time.perf_counter()
                client.upload_fileobj(io.BytesIO(blob), server.bucket, key, Config=transfer_config)
                record("TransferManager upload_fileobj (memory)", time.perf_counter() - t)
                t = time.perf_counter()
                client.upload_file(
                    str(blob_file), server.bucket, key + "-file", Config=transfer_config
                )
                record("TransferManager upload_file (cached file)", time.perf_counter() - t)

            def ckpt_save() -> None:
                t = time.perf_counter()
                ckpt.save(state, backend, step=1)
                record("ckpt save to S3 (to commit)", time.perf_counter() - t)

            def tm_download() -> None:
                sink = io.BytesIO()
                t = time.perf_counter()
                client.download_fileobj(server.bucket, key, sink, Config=transfer_config)
                record("TransferManager download_fileobj", time.perf_counter() - t)

            def ckpt_load() -> None:
                t = time.perf_counter()
                reports.append(ckpt.restore(target, backend, options=LOAD_OPTIONS))
                record("ckpt load from S3 (verified)", time.perf_counter() - t)

            steps = (tm_upload, ckpt_save, tm_download, ckpt_load)
            if repeat % 2:
                steps = (ckpt_save, tm_upload, ckpt_load, tm_download)
            for run_step in steps:
                run_step()
            (report,) = reports
            if repeat == 0 and not all(torch.equal(target[k], state[k]) for k in state):
                raise SystemExit(
                    "ckpt load from S3 returned different bytes; not benchmarking a broken path"
                )
            record(
                "ckpt load read amplification",
                report.stats.read_amplification if report.stats else 1.0,
            )
            backend.close()

        for repeat in range(args.repeats):
            transfers(repeat)

            tiered = TieredBackend(
                LocalBackend(Path(tmp) / f"local-{repeat}"),
                S3Backend(server.url(f"tiered/{repeat}"), config),
            )
            t = time.perf_counter()
            ckpt.save(state, tiered, step=1)
            record("tiered save: local commit", time.perf_counter() - t)
            tiered.wait_replicated()
            record("tiered save: remote commit", time.perf_counter() - t)
            tiered.close()
            print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    print(
        f"\nS3 server: {args.server} on loopback; state {nbytes / 2**20:.0f} MiB "
        f"({len(state)} tensors); {args.repeats} interleaved repeats (which tool goes first "
        "alternates); medians\n"
    )
    print(f"{'operation':46s} {'median s':>9s} {'GB/s':>7s}")
    med = {k: statistics.median(v) for k, v in samples.items()}
    for name, seconds in med.items():
        if "amplification" in name:
            print(f"{name:46s} {seconds:9.3f}")
            continue
        print(f"{name:46s} {seconds:9.3f} {nbytes / seconds / 1e9:7.2f}")
    up = med["TransferManager upload_fileobj (memory)"] / med["ckpt save to S3 (to commit)"]
    down = med["TransferManager download_fileobj"] / med["ckpt load from S3 (verified)"]
    print("\ntargets (ratio = TransferManager time / ckpt time, per-repeat values in brackets):")
    per_up = [
        a / b
        for a, b in zip(
            samples["TransferManager upload_fileobj (memory)"],
            samples["ckpt save to S3 (to commit)"],
        )
    ]
    per_down = [
        a / b
        for a, b in zip(
            samples["TransferManager download_fileobj"], samples["ckpt load from S3 (verified)"]
        )
    ]
    print(
        f"  {'PASS' if up >= 0.9 else 'MISS'}  S3 save >= 0.9x TransferManager upload   {up:.2f}  {[round(x, 2) for x in per_up]}"
    )
    print(
        f"  {'PASS' if down >= 1.0 else 'MISS'}  S3 restore >= 1.0x its download         {down:.2f}  {[round(x, 2) for x in per_down]}"
    )


if __name__ == "__main__":
    main()

"""Multi-rank save throughput: ckpt against DCP on the same DTensor state, in one run.

    .venv/bin/python -m benchmarks.bench_distributed [--nproc 2,4] [--mib 512] [--repeats 3]
                                                     [--dir .bench] [--json OUT]

``--mib 1024 --repeats 5`` takes about 3 minutes on 2 cores; each rank needs about 2.5x
its share of the state in memory (the state, ckpt's staging buffer, DCP's staged copy,
a raw-write buffer) and the disk about 2x the state free.

For each world size it spawns that many gloo ranks (``torch.multiprocessing``, a free
loopback port, a short init timeout). Every rank builds the same global state on a
1-D device mesh, about ``--mib`` MiB of unique bytes:

- model: four large float32 parameters as ``Shard(0)`` DTensors (1/4 of the bytes),
  plus replicated DTensors (``Replicate()``; 1/4 of the bytes: two large matrices
  and 16 norm vectors, the same values on every rank);
- optimizer, FSDP2-like: per sharded parameter ``exp_avg`` and ``exp_avg_sq`` as
  ``Shard(0)`` DTensors (1/2 of the bytes) and a 0-d ``step`` tensor, plus
  ``param_groups`` with plain values; a plain ``step`` counter.

After a warm-up save of each tool that is loaded back and checked bit for bit on every
rank, each repeat runs, in an order that rotates between repeats, on the same disk:

- limit: every rank writes its 1/N share of the unique bytes to its own file in 64 MiB
  blocks and fsyncs it (the write + fsync bandwidth of those bytes with N writers, one
  thread each; ckpt writes several files per rank with 4 threads, so it can beat it);
- ckpt: ``ckpt.save`` to commit (embedded coordinator: the process group + storage);
  ``ckpt.async_save`` stall and total;
- DCP: ``torch.distributed.checkpoint.save`` with its default ``FileSystemWriter``
  (one thread per rank, fsync on), and with ``thread_count=4`` (ckpt writes with 4
  threads); ``async_save`` in its default configuration (the stall is the call) and
  with a reused ``DefaultStager`` doing async staging (the stall lasts until
  ``staging_completion`` resolves: training may not touch the tensors before).

Every timing starts and ends on a barrier of all ranks; a stall is the largest over the
ranks (training resumes in lockstep). Checkpoint folders are removed (and ``sync`` run)
after each save.
From the warm-up checkpoints it also reports the bytes each tool wrote (data files
only: ckpt's safetensors files, DCP's ``.distcp`` files) against the unique bytes, and
how they were spread over the ranks.

Medians are reported; targets are judged on the median of per-repeat ratios. The disk
and CPUs are shared with whatever else runs on the machine: only compare numbers from
the same run. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks._harness import iter_tensors, run_gloo_world

State = dict[str, Any]

COLS = 4096
LARGE = 4  # sharded parameters (each with exp_avg + exp_avg_sq)
NORMS = 16  # small replicated vectors
BLOCK_BYTES = 64 << 20
INIT_TIMEOUT_S = 120.0
_CKPT_RANK = re.compile(r"-r(\d{5})-.*\.(safetensors|zst)$")  # <generation>-r<rank>-...-<index>
_DCP_RANK = re.compile(r"__(\d+)_\d+\.distcp$")


# --------------------------------------------------------------------------- the state


def _values(name: str, rank: int, shape: tuple[int, ...], positive: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}@{rank}".encode()))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    return t.abs_() if positive else t


def build_state(rank: int, world: int, total_bytes: int) -> State:
    """The benchmark state of this rank (needs an initialised process group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    quarter = total_bytes // 4
    rows = max(world, quarter // (LARGE * COLS * 4) // world * world)  # divisible by world
    local_rows = rows // world

    def sharded(name: str, positive: bool = False) -> DTensor:
        local = _values(name, rank, (local_rows, COLS), positive)
        return DTensor.from_local(
            local,
            mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size((rows, COLS)),
            stride=(COLS, 1),
        )

    def replicated(name: str, shape: tuple[int, ...]) -> DTensor:
        return DTensor.from_local(_values(name, 0, shape), mesh, [Replicate()], run_check=False)

    fqns = [f"layers.{i}.mlp.weight" for i in range(LARGE)]
    model: State = {fqn: sharded(fqn) for fqn in fqns}
    norm_bytes = NORMS * COLS * 4
    big_rows = max(1, (quarter - norm_bytes) // (2 * COLS * 4))
    model["embed.weight"] = replicated("embed.weight", (big_rows, COLS))
    model["lm_head.weight"] = replicated("lm_head.weight", (big_rows, COLS))
    model.update({f"layers.{i}.norm.weight": replicated(f"norm{i}", (COLS,)) for i in range(NORMS)})
    optim = {
        "state": {
            fqn: {
                "step": torch.tensor(1000.0),
                "exp_avg": sharded(f"{fqn}.exp_avg"),
                "exp_avg_sq": sharded(f"{fqn}.exp_avg_sq", positive=True),
            }
            for fqn in fqns
        },
        "param_groups": [
            {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "params": fqns}
        ],
    }
    return {"model": model, "optim": optim, "step": 1000}


def unique_bytes(state: State) -> int:
    """Bytes of the global tensors, each counted once however many ranks hold it."""
    return sum(
        t.numel() * t.element_size() for _, t in iter_tensors(state)
    )  # DTensor: global numel


def local_bytes(state: State) -> int:
    from torch.distributed.tensor import DTensor

    return sum(
        (t.to_local() if isinstance(t, DTensor) else t).nbytes for _, t in iter_tensors(state)
    )


def zeros_like_state(tree: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return DTensor.from_local(
            torch.zeros_like(tree.to_local()),
            tree.device_mesh,
            tree.placements,
            run_check=False,
            shape=tree.shape,
            stride=tree.stride(),
        )
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: zeros_like_state(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [zeros_like_state(v) for v in tree]
    return tree


def same(a: State, b: State) -> bool:
    """Bit-for-bit equality of every local shard and plain value."""
    from torch.distributed.tensor import DTensor

    ta, tb = dict(iter_tensors(a)), dict(iter_tensors(b))
    if ta.keys() != tb.keys():
        return False
    for name, x in ta.items():
        y = tb[name]
        lx = x.to_local() if isinstance(x, DTensor) else x
        ly = y.to_local() if isinstance(y, DTensor) else y
        if not torch.equal(lx.reshape(-1).view(torch.uint8), ly.reshape(-1).view(torch.uint8)):
            return False
    return bool(a["step"] == b["step"] and a["optim"]["param_groups"] == b["optim"]["param_groups"])


# --------------------------------------------------------------------------- what is written


def data_files(tool: str, root: Path) -> dict[int, list[Path]]:
    """Data files of one checkpoint by writing rank (ckpt: safetensors, DCP: .distcp)."""
    pattern = _CKPT_RANK if tool == "ckpt" else _DCP_RANK
    out: dict[int, list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        match = pattern.search(path.name)
        if match:
            out.setdefault(int(match.group(1)), []).append(path)
    return out


def safetensors_header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def written(tool: str, root: Path, world: int) -> dict[str, Any]:
    files = data_files(tool, root)
    per_rank = [sum(p.stat().st_size for p in files.get(r, [])) for r in range(world)]
    headers = (
        sum(safetensors_header_bytes(p) for ps in files.values() for p in ps)
        if tool == "ckpt"
        else 0
    )
    return {
        "files": sum(len(v) for v in files.values()),
        "bytes": sum(per_rank),
        "per_rank": per_rank,
        "header_bytes": headers,
    }


# --------------------------------------------------------------------------- one rank


def write_share(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(data), BLOCK_BYTES):
            block = data[i : i + BLOCK_BYTES]
            while block:
                block = block[os.write(fd, block) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def all_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Rank:
    """One rank's side of the run: the state, the contenders and its samples."""

    def __init__(self, rank: int, world: int, root: Path, total_bytes: int) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.rank, self.world, self.root = rank, world, root
        self.state = build_state(rank, world, total_bytes)
        self.unique = unique_bytes(self.state)
        share = -(-self.unique // world)
        self.raw = torch.randint(
            0, 256, (share,), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank)
        )
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=False,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )
        self.samples: dict[str, list[float]] = {}
        self.step = 0

    def fresh(self, name: str) -> Path:
        path = self.root / name
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        dist.barrier()
        return path

    def done(self, path: Path) -> None:
        """Remove a checkpoint and let the disk settle before the next contender."""
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.sync()  # the deletion's metadata, so that it does not land in the next timing
        gc.collect()
        dist.barrier()

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        dist.barrier()
        self.samples.setdefault(key, []).append(time.perf_counter() - start)
        return out

    def note(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    # -- contenders -------------------------------------------------------------------

    def raw_write(self) -> None:
        path = self.fresh("raw")
        view = memoryview(self.raw.numpy()).cast("B")  # type: ignore[arg-type]
        self.timed("raw_write", lambda: write_share(path / f"rank{self.rank}.bin", view))
        self.done(path)

    def ckpt_save(self) -> None:
        import ckpt

        path = self.fresh("ckpt")
        self.step += 1
        result = self.timed("ckpt_save", lambda: ckpt.save(self.state, path, step=self.step))
        self.note("ckpt_save.stall", all_max(result.stall_seconds))
        self.note("ckpt_save.persist", all_max(result.persist_seconds))
        self.note("ckpt_save.commit", all_max(result.commit_seconds))
        # From the call: when the last rank's data was durable, and when every rank saw the commit.
        self.note("ckpt_save.durable", all_max(result.stall_seconds + result.persist_seconds))
        self.note("ckpt_save.committed", all_max(result.total_seconds))
        self.done(path)

    def ckpt_async(self) -> None:
        import ckpt

        path = self.fresh("ckpt")
        self.step += 1
        dist.barrier()
        start = time.perf_counter()
        pending = ckpt.async_save(self.state, path, step=self.step)
        stall = time.perf_counter() - start
        pending.result()
        total = time.perf_counter() - start
        self.note("ckpt_stall", all_max(stall))
        self.note("ckpt_total", all_max(total))
        self.done(path)

    def dcp_save(self, threads: int = 1) -> None:
        import torch.distributed.checkpoint as dcp

        path = self.fresh("dcp")
        writer = dcp.FileSystemWriter(path, thread_count=threads)
        key = "dcp_save" if threads == 1 else f"dcp_save_t{threads}"
        self.timed(key, lambda: dcp.save(self.state, storage_writer=writer))
        self.done(path)

    def _dcp_async_once(self, path: Path, reuse_stager: bool) -> tuple[float, float]:
        """One DCP async_save: (stall, total), each the largest over the ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        dist.barrier()
        start = time.perf_counter()
        if reuse_stager:
            response = dcp.async_save(self.state, checkpoint_id=path, async_stager=self.stager)
        else:
            response = dcp.async_save(self.state, checkpoint_id=path)
        if isinstance(response, AsyncSaveResponse):
            response.staging_completion.result()
            upload = response.upload_completion
        else:
            upload = response
        stall = time.perf_counter() - start
        upload.result()
        total = time.perf_counter() - start
        return all_max(stall), all_max(total)

    def dcp_async(self, reuse_stager: bool) -> None:
        path = self.fresh("dcp")
        stall, total = self._dcp_async_once(path, reuse_stager)
        suffix = "_best" if reuse_stager else ""
        self.note(f"dcp_stall{suffix}", stall)
        self.note(f"dcp_total{suffix}", total)
        self.done(path)

    def contenders(self) -> list[tuple[str, Callable[[], None]]]:
        return [
            ("raw", self.raw_write),
            ("ckpt save", self.ckpt_save),
            ("dcp save", self.dcp_save),
            ("dcp save t4", lambda: self.dcp_save(4)),
            ("ckpt async", self.ckpt_async),
            ("dcp async", lambda: self.dcp_async(False)),
            ("dcp async best", lambda: self.dcp_async(True)),
        ]

    # -- warm-up: first saves, bytes written, and a bit-for-bit check ------------------

    def warm_up(self) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        import ckpt

        out: dict[str, Any] = {}
        path = self.fresh("ckpt-warm")
        self.step += 1
        start = time.perf_counter()
        pending = ckpt.async_save(self.state, path, step=self.step)
        out["ckpt_first_stall"] = all_max(time.perf_counter() - start)
        pending.result()
        dist.barrier()
        if self.rank == 0:
            out["ckpt_written"] = written("ckpt", path, self.world)
        target = zeros_like_state(self.state)
        ckpt.load(target, path, step=self.step)
        ok_ckpt = same(self.state, target)
        self.done(path)

        path = self.fresh("dcp-warm")
        dcp.save(self.state, checkpoint_id=path)
        dist.barrier()
        if self.rank == 0:
            out["dcp_written"] = written("dcp", path, self.world)
        target = zeros_like_state(self.state)
        dcp.load(target, checkpoint_id=path)
        ok_dcp = same(self.state, target)
        self.done(path)
        path = self.fresh("dcp-warm")  # the reused stager allocates its buffers on its first save
        out["dcp_first_stall_best"] = self._dcp_async_once(path, reuse_stager=True)[0]
        self.done(path)
        flags = torch.tensor([int(not ok_ckpt), int(not ok_dcp)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        out["verified"] = {"ckpt": not flags[0].item(), "dcp": not flags[1].item()}
        return out


def run_rank(root: str, total_bytes: int, repeats: int) -> dict[str, Any]:
    """One rank of the process group: warm up, verify, then the interleaved repeats."""
    rank, world = dist.get_rank(), dist.get_world_size()
    r = Rank(rank, world, Path(root), total_bytes)
    out = r.warm_up()
    if not all(out["verified"].values()):
        return {**out, "unique": r.unique}
    order = r.contenders()
    for i in range(repeats):
        shift = i % len(order)
        for name, contender in order[shift:] + order[:shift]:
            start = time.perf_counter()
            contender()
            if rank == 0:
                print(
                    f"  [{world} ranks] repeat {i + 1}/{repeats}: {name} {time.perf_counter() - start:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        r.note("load_average", os.getloadavg()[0])
    return {**out, "unique": r.unique, "local": local_bytes(r.state), "samples": r.samples}


def run_world(world: int, root: Path, total_bytes: int, repeats: int) -> dict[str, Any]:
    """Spawn ``world`` gloo ranks; return rank 0's results."""
    return dict(
        run_gloo_world(
            world, run_rank, str(root), total_bytes, repeats, init_timeout_s=INIT_TIMEOUT_S
        )
    )


# --------------------------------------------------------------------------- report

ROWS = (
    ("raw_write", "limit  write+fsync of the unique bytes, 1 file per rank"),
    ("ckpt_save", "ckpt   save, to commit"),
    ("dcp_save", "DCP    save (FileSystemWriter default: 1 thread)"),
    ("dcp_save_t4", "DCP    save (FileSystemWriter thread_count=4)"),
    ("ckpt_stall", "ckpt   async_save stall (max over ranks)"),
    ("dcp_stall", "DCP    async_save stall (default)"),
    ("dcp_stall_best", "DCP    async_save stall (reused stager, async staging)"),
    ("ckpt_total", "ckpt   async_save total, to commit"),
    ("dcp_total", "DCP    async_save total (default)"),
    ("dcp_total_best", "DCP    async_save total (reused stager)"),
)
VERSUS = {"ckpt_save": "dcp_save", "ckpt_stall": "dcp_stall", "ckpt_total": "dcp_total"}


def per_repeat_ratio(samples: dict[str, list[float]], mine: str, reference: str) -> list[float]:
    """Reference time / ckpt time per repeat (above 1: ckpt is faster)."""
    return [ref / own for own, ref in zip(samples.get(mine, []), samples.get(reference, []))]


def format_world(world: int, res: dict[str, Any], args: argparse.Namespace) -> str:
    s: dict[str, list[float]] = res["samples"]
    unique = res["unique"]
    gb = unique / 1e9
    med = {k: statistics.median(v) for k, v in s.items() if v}
    lines = [
        f"== {world} ranks, gloo, 1-D mesh: {unique / 2**20:.0f} MiB unique (1/4 Shard(0) params, 1/2 Shard(0) "
        f"exp_avg + exp_avg_sq, 1/4 replicated); {res['local'] / 2**20:.0f} MiB held per rank; "
        f"{args.repeats} repeats; load average {', '.join(f'{v:.1f}' for v in s['load_average'])} ==",
        f"   verified bit for bit after the warm-up saves: ckpt {res['verified']['ckpt']}, "
        f"DCP {res['verified']['dcp']}; first async_save stalls: ckpt {res['ckpt_first_stall']:.3f} s, "
        f"DCP reused stager {res['dcp_first_stall_best']:.3f} s",
        f"   {'operation':<56} {'n':>2} {'median s':>9} {'spread':>7} {'GB/s':>6} {'DCP/ckpt':>9}",
    ]
    for key, label in ROWS:
        values = s.get(key)
        if not values:
            continue
        sec = med[key]
        spread = (max(values) - min(values)) / sec if len(values) > 1 else 0.0
        ratio = (
            f"{med[VERSUS[key]] / sec:9.2f}" if key in VERSUS and VERSUS[key] in med else f"{'':>9}"
        )
        lines.append(
            f"   {label:<56} {len(values):>2} {sec:>9.3f} {spread:>6.0%} {gb / sec:>6.2f} {ratio}"
        )
    lines.append(
        "   GB/s = unique bytes / median seconds (decimal). DCP/ckpt = DCP's median time / ckpt's: "
        "above 1, ckpt is faster."
    )
    if "ckpt_save.durable" in med:
        coordination = statistics.median(
            c - d for c, d in zip(s["ckpt_save.committed"], s["ckpt_save.durable"])
        )
        lines.append(
            f"   ckpt save phases (max over ranks, median): stall {med['ckpt_save.stall']:.3f} s, persist "
            f"{med['ckpt_save.persist']:.3f} s, commit {med['ckpt_save.commit']:.3f} s; last rank durable after "
            f"{med['ckpt_save.durable']:.3f} s, every rank saw the commit after {med['ckpt_save.committed']:.3f} s: "
            f"coordination after the last durable byte {coordination * 1e3:.0f} ms (median per repeat)"
        )
    cw, dw = res["ckpt_written"], res["dcp_written"]
    payload = cw["bytes"] - cw["header_bytes"]
    per_rank = cw["per_rank"]
    lines += [
        f"   written (data files): ckpt {cw['bytes']:,} B in {cw['files']} files = {cw['bytes'] / unique:.4f}x "
        f"unique (payload {payload:,} B without safetensors headers: {payload / unique:.4f}x); "
        f"DCP {dw['bytes']:,} B in {dw['files']} files = {dw['bytes'] / unique:.4f}x unique",
        f"   per rank, ckpt: {', '.join(f'{b / 2**20:.1f}' for b in per_rank)} MiB (max/mean "
        f"{max(per_rank) / statistics.fmean(per_rank):.3f}); DCP: "
        f"{', '.join(f'{b / 2**20:.1f}' for b in dw['per_rank'])} MiB (max/mean "
        f"{max(dw['per_rank']) / statistics.fmean(dw['per_rank']):.3f})",
    ]
    ratios = per_repeat_ratio(s, "ckpt_save", "dcp_save")
    value = statistics.median(ratios)
    lines.append(
        f"   {'PASS' if value >= 1.0 else 'MISS'}  save throughput >= DCP's: DCP time / ckpt time "
        f"{value:.2f} (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    lines.append(
        f"   {'PASS' if payload == unique else 'MISS'}  written bytes == unique bytes (no duplicate "
        f"replicas): payload {payload:,} vs unique {unique:,}; with headers +{cw['header_bytes']:,} B"
    )
    stall = statistics.median(per_repeat_ratio(s, "ckpt_stall", "dcp_stall"))
    best = statistics.median(per_repeat_ratio(s, "ckpt_stall", "dcp_stall_best"))
    limit = statistics.median(per_repeat_ratio(s, "ckpt_save", "raw_write"))
    lines.append(
        f"   info  async_save stall, DCP / ckpt: {stall:.2f} vs DCP default, {best:.2f} vs DCP reused "
        f"stager; ckpt save vs raw write+fsync: {1 / limit:.2f}x the raw time"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="2,4", help="world sizes, comma-separated")
    p.add_argument("--mib", type=int, default=512, help="unique bytes of the state, MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--dir", type=Path, default=Path(".bench"), help="disk to write to (a temp folder inside)"
    )
    p.add_argument("--json", type=Path, help="also write every sample here")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="dist-", dir=args.dir))
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, dir {root}, load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[int, dict[str, Any]] = {}
    try:
        for world in [int(x) for x in args.nproc.split(",") if x]:
            start = time.perf_counter()
            results[world] = run_world(world, root, args.mib << 20, args.repeats)
            if not all(results[world]["verified"].values()):
                raise SystemExit(
                    f"{world} ranks: a warm-up checkpoint did not load back bit for bit: "
                    f"{results[world]['verified']}"
                )
            print(format_world(world, results[world], args), flush=True)
            print(f"   ({world} ranks done in {time.perf_counter() - start:.0f} s)\n", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

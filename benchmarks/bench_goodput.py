"""Goodput under injected failures: a real training loop, SIGKILLed on a Poisson schedule.

A small transformer (torch.nn, FSDP2 over gloo, 2 CPU ranks under torchrun) trains on
synthetic tokens whose batch is a function of the step, so the data position is the step
and lost work is countable. torchrun (``--max-restarts``, c10d rendezvous) restarts the
job after each failure. The driver (this process) draws failure times from a seeded
exponential distribution over a fixed wall-clock budget and SIGKILLs one rank or every
worker at those times; the workers write their pids and progress to JSON lines under a
temporary directory. The same schedule runs against each contender:

- ckpt ``CheckpointManager`` with ``every_steps=5``, ``every_steps=20`` and
  ``interval="auto"`` (Young/Daly from the measured stall and the injected MTBF);
- the peer: a DCP loop (``torch.distributed.checkpoint.async_save`` with the default
  ``FileSystemWriter``, same interval, the newest checkpoint with a ``.metadata``
  restored on restart with ``dcp.load``).

It reports goodput (useful steps / steps executed), lost work (steps recomputed), the
stall C per save, the restore time R (start of restore to the first step done), the
downtime per failure (SIGKILL to the first step of the restarted job), failures and saves.
Then it projects goodput at 1k, 4k and 16k GPUs at Llama 3's interruption rate from the
measured C and R, with the Young/Daly interval; every assumption is printed.

    python -m benchmarks.bench_goodput --quick          # < 3 min on 2 cores
    python -m benchmarks.bench_goodput                  # 180 s per contender, 2 DCP runs: ~17 min
    python -m benchmarks.bench_goodput --smoke --json out.json   # CI: one failure, < 60 s

Nothing here asserts a timing; the figures are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]

# The model and data (both contenders train exactly this).
VOCAB, DIM, HEADS, LAYERS, FFN, SEQ, BATCH = 8192, 128, 4, 2, 512, 32, 4


# -- the training job (one rank, started by torchrun) -----------------------------------


class TinyLM(nn.Module):
    """A decoder-only transformer from torch.nn: token + position embeddings, pre-norm
    ``TransformerEncoderLayer`` blocks with a causal mask, a final norm and an LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                DIM, HEADS, FFN, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(LAYERS)
        )
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        out: torch.Tensor = self.head(self.norm(h))
        return out


def parameter_count() -> int:
    return sum(p.numel() for p in TinyLM().parameters())


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of ``step`` on ``rank``: the data position is the step itself."""
    g = torch.Generator().manual_seed(step * world + rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


class Events:
    """Appends one JSON object per line; one ``os.write`` each, so a SIGKILL never leaves
    half a line behind another rank's."""

    def __init__(self, path: Path, gen: int, rank: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.gen, self.rank = gen, rank

    def __call__(self, event: str, **fields: Any) -> None:
        record = {"e": event, "gen": self.gen, "rank": self.rank, "t": time.time(), **fields}
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def worker(args: argparse.Namespace) -> None:
    """One rank of the training job; runs until the driver creates the stop file."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = Events(Path(args.work, f"events-rank{rank}.jsonl"), gen, rank)
    torch.manual_seed(0)
    model = TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    stop_file = Path(args.work, "stop")

    def train_step(step: int) -> None:
        x, y = batch(step, rank, world)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).backward()
        optimizer.step()

    def stop_requested() -> bool:
        flag = torch.tensor([1 if stop_file.exists() else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    loop = _ckpt_loop if args.contender == "ckpt" else _dcp_loop
    loop(args, model, optimizer, train_step, stop_requested, log)
    dist.destroy_process_group()


def _ckpt_loop(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_step: Any,
    stop_requested: Any,
    log: Events,
) -> None:
    import ckpt

    progress = {"next_step": 1}
    state: dict[str, Any] = {"train": ckpt.ModelOptimizerState(model, optimizer), "data": progress}
    policy: dict[str, Any] = (
        {"interval": "auto", "mtbf_seconds": args.mtbf}
        if args.every == 0
        else {"every_steps": args.every}
    )
    mgr = ckpt.CheckpointManager(args.root, keep_last=3, **policy)
    t_restore = time.time()
    restored = mgr.restore(state)
    reported = 0
    step = progress["next_step"]
    first = True
    while True:
        train_step(step)
        progress["next_step"] = step + 1
        pending = mgr.maybe_save(step, state)
        log("step", step=step)
        if first:
            log("start", pid=os.getpid(), restored=restored, t_restore=t_restore)
            first = False
        if pending is not None:
            log("save", step=step, stall=pending.stall_seconds)
        reported = _log_commits(mgr.metrics.history, reported, log)
        if stop_requested():
            break
        step += 1
    mgr.close()
    _log_commits(mgr.metrics.history, reported, log)
    log("end", step=step, stall_estimate=mgr.stall_estimate, skipped=mgr.metrics.saves_skipped_busy)


def _log_commits(history: list[Any], reported: int, log: Events) -> int:
    for r in history[reported:]:
        log(
            "commit",
            step=r.step,
            bytes=r.bytes_written,
            persist=r.persist_seconds,
            commit=r.commit_seconds,
        )
    return len(history)


def _dcp_dirs(root: Path) -> Iterator[tuple[int, Path, bool]]:
    """(step, directory, complete) of every DCP checkpoint under ``root``."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.name.startswith("step-") and d.name[5:].isdigit():
            yield int(d.name[5:]), d, (d / ".metadata").is_file()


def _dcp_loop(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_step: Any,
    stop_requested: Any,
    log: Events,
) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = Path(args.root)
    rank = dist.get_rank()
    # DCP's background thread runs collectives; they get their own group so they never
    # interleave with FSDP's on the default one.
    save_group = dist.new_group(backend="gloo")
    t_restore = time.time()
    complete = [s for s, _, ok in _dcp_dirs(root) if ok]
    newest = torch.tensor([max(complete, default=0)])
    dist.all_reduce(newest, op=dist.ReduceOp.MIN)  # every rank restores the same step
    restored = int(newest.item()) or None
    if restored is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(root / f"step-{restored:08d}"))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    if rank == 0:  # saves that died before their .metadata was written
        for s, d, ok in _dcp_dirs(root):
            if not ok and s > (restored or 0):
                shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    step = (restored or 0) + 1
    in_flight: tuple[int, float, Any] | None = None
    skipped = 0
    first = True
    while True:
        train_step(step)
        log("step", step=step)
        if first:
            log("start", pid=os.getpid(), restored=restored, t_restore=t_restore)
            first = False
        if step % args.every == 0:
            busy = torch.tensor([int(in_flight is not None and not in_flight[2].done())])
            dist.all_reduce(busy, op=dist.ReduceOp.MAX)  # every rank saves, or none
            if busy.item():
                skipped += 1
            else:
                if in_flight is not None:
                    _dcp_finish(in_flight, root, log, rank)
                t0 = time.perf_counter()
                model_sd, optim_sd = get_state_dict(model, optimizer)
                future = dcp.async_save(
                    {"model": model_sd, "optim": optim_sd},
                    checkpoint_id=str(root / f"step-{step:08d}"),
                    process_group=save_group,
                )
                stall = time.perf_counter() - t0
                log("save", step=step, stall=stall)
                in_flight = (step, time.time(), future)
        if in_flight is not None and in_flight[2].done():
            _dcp_finish(in_flight, root, log, rank)
            in_flight = None
        if stop_requested():
            break
        step += 1
    if in_flight is not None:
        _dcp_finish(in_flight, root, log, rank)
    log("end", step=step, stall_estimate=None, skipped=skipped)


def _dcp_finish(in_flight: tuple[int, float, Any], root: Path, log: Events, rank: int) -> None:
    """Wait for a DCP save, log it, keep the 3 newest complete checkpoints."""
    step, started, future = in_flight
    future.result()
    log("commit", step=step, bytes=None, persist=time.time() - started, commit=None)
    if rank == 0:
        done = sorted((s, d) for s, d, ok in _dcp_dirs(root) if ok)
        for _, d in done[:-3]:
            shutil.rmtree(d, ignore_errors=True)


# -- the driver: schedule, launch, kill, collect ----------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ckpt" or "dcp"
    every: int  # save every N steps; 0 = interval="auto" (ckpt only)


@dataclass(frozen=True)
class Failure:
    at: float  # seconds after the first step of the job
    whole_job: bool  # SIGKILL every worker, else one rank
    victim: int  # the rank killed when not the whole job
    after_commit: bool = False  # also wait for a committed save (--smoke: something to restore)


def failure_schedule(seed: int, budget: float, mtbf: float, world: int) -> list[Failure]:
    """A Poisson process over ``budget`` seconds: exponential gaps of mean ``mtbf``."""
    rng = random.Random(seed)
    out: list[Failure] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf)
        if t >= budget:
            return out
        out.append(Failure(round(t, 3), rng.random() < 0.5, rng.randrange(world)))


class Tail:
    """Reads the JSON lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        return [json.loads(line) for line in lines if line]


@dataclass
class RunResult:
    contender: str
    failures: int = 0
    deferred: int = 0  # failures due while the job was still restarting, sent once it trained
    kills: list[dict[str, Any]] = field(default_factory=list)
    executed: int = 0
    useful: int = 0
    lost: int = 0
    goodput: float = 0.0
    saves: int = 0
    committed: int = 0
    skipped: int = 0
    stall_median_s: float | None = None
    stall_estimate_s: float | None = None
    restore_median_s: float | None = None
    downtime_median_s: float | None = None
    step_median_s: float = 0.0
    stalls_s: list[float] = field(default_factory=list)  # per save, the slowest rank's
    restores_s: list[float] = field(default_factory=list)  # per restart, the slowest rank's
    downtimes_s: list[float] = field(default_factory=list)  # per failure
    wall_s: float = 0.0
    time_goodput: float = 0.0
    bytes_per_rank: float | None = None
    exit_status: int = 0


class Job:
    """One torchrun job and the events its workers write."""

    def __init__(self, contender: Contender, work: Path, world: int, mtbf: float) -> None:
        self.work = work
        self.tails = [Tail(work / f"events-rank{r}.jsonl") for r in range(world)]
        self.events: list[dict[str, Any]] = []
        self.world = world
        from tests.support.ports import free_port

        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(world), "--max-restarts", "1000",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            "--rdzv-id", f"goodput-{os.getpid()}-{work.name}", "--monitor-interval", "0.2",
            "-m", "benchmarks.bench_goodput", "--worker", "--contender", contender.kind,
            "--every", str(contender.every), "--mtbf", str(mtbf),
            "--root", str(work / "ckpts"), "--work", str(work),
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.output = open(work / "torchrun.log", "wb")  # noqa: SIM115 (closed in finish)
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=self.output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def poll(self) -> None:
        for tail in self.tails:
            self.events.extend(tail.read())
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"torchrun exited with status {self.proc.returncode} before the end; see "
                f"{self.work / 'torchrun.log'}"
            )

    def started(self, gen: int) -> dict[int, dict[str, Any]] | None:
        """The start records of generation ``gen`` or later, once every rank has one."""
        starts = [e for e in self.events if e["e"] == "start" and e["gen"] >= gen]
        if not starts:
            return None
        newest = max(e["gen"] for e in starts)
        by_rank = {e["rank"]: e for e in starts if e["gen"] == newest}
        return by_rank if len(by_rank) == self.world else None

    def wait_started(self, gen: int, timeout: float) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            found = self.started(gen)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"generation {gen} did not start within {timeout:.0f} s")
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        (self.work / "stop").touch()
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            status = self.proc.wait()
        self.output.close()
        for tail in self.tails:
            self.events.extend(tail.read())
        return status


def run_contender(
    contender: Contender, schedule: list[Failure], budget: float, mtbf: float, base: Path
) -> RunResult:
    work = Path(tempfile.mkdtemp(prefix=f"{contender.name.replace(' ', '_')}-", dir=base))
    world = 2
    job = Job(contender, work, world, mtbf)
    result = RunResult(contender.name)
    try:
        current = job.wait_started(0, timeout=180)
        t0 = min(e["t"] for e in current.values())
        gen = 0
        for failure in schedule:
            while time.time() < t0 + failure.at:
                job.poll()
                time.sleep(0.02)
            while failure.after_commit and not any(e["e"] == "commit" for e in job.events):
                job.poll()
                time.sleep(0.02)
            found = job.started(gen)
            if found is None:  # still restarting after the previous failure
                result.deferred += 1
                found = job.wait_started(gen, timeout=180)
            current = found
            gen = max(e["gen"] for e in current.values())
            victims = sorted(current) if failure.whole_job else [failure.victim]
            killed_at = time.time()
            for r in victims:
                try:
                    os.kill(current[r]["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            result.kills.append({"at": round(killed_at - t0, 2), "gen": gen, "ranks": victims})
            gen += 1
        while time.time() < t0 + budget:
            job.poll()
            time.sleep(0.05)
        if schedule:
            job.wait_started(gen, timeout=180)  # the last failure was recovered from
    finally:
        result.exit_status = job.finish(timeout=120)
    result.wall_s = time.time() - t0
    summarize(result, job.events, t0)
    if not os.environ.get("GOODPUT_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return result


def summarize(result: RunResult, events: list[dict[str, Any]], t0: float) -> None:
    def of(kind: str, rank: int | None = 0) -> list[dict[str, Any]]:
        return [e for e in events if e["e"] == kind and (rank is None or e["rank"] == rank)]

    steps = of("step")
    ends = of("end")
    result.failures = len(result.kills)
    result.executed = len(steps)
    result.useful = ends[-1]["step"] if ends else max((e["step"] for e in steps), default=0)
    result.lost = result.executed - result.useful
    result.goodput = result.useful / result.executed if result.executed else 0.0
    saves = of("save", None)
    result.saves = len(of("save"))
    result.committed = len(of("commit"))
    result.skipped = sum(e["skipped"] for e in ends)
    # A save stalls the job as long as its slowest rank: the others wait at the next collective.
    per_save: dict[tuple[int, int], float] = {}
    for e in saves:
        key = (e["gen"], e["step"])
        per_save[key] = max(per_save.get(key, 0.0), e["stall"])
    result.stalls_s = list(per_save.values())
    result.stall_median_s = statistics.median(per_save.values()) if per_save else None
    result.stall_estimate_s = ends[-1]["stall_estimate"] if ends else None
    restores: dict[int, float] = {}
    for e in of("start", None):
        if e["restored"] is not None:
            key = e["gen"]
            restores[key] = max(restores.get(key, 0.0), e["t"] - e["t_restore"])
    result.restores_s = list(restores.values())
    result.restore_median_s = statistics.median(restores.values()) if restores else None
    first_step = {e["gen"]: e["t"] for e in reversed(of("start"))}
    downtimes = []
    for kill in result.kills:
        nxt = first_step.get(kill["gen"] + 1)
        if nxt is not None:
            downtimes.append(nxt - (t0 + kill["at"]))
    result.downtimes_s = downtimes
    result.downtime_median_s = statistics.median(downtimes) if downtimes else None
    gaps = [
        b["t"] - a["t"]
        for a, b in itertools.pairwise(steps)
        if b["gen"] == a["gen"] and b["step"] == a["step"] + 1
    ]
    result.step_median_s = statistics.median(gaps) if gaps else 0.0
    result.time_goodput = min(1.0, result.useful * result.step_median_s / result.wall_s)
    sizes = [e["bytes"] for e in of("commit", None) if e["bytes"] is not None]
    if sizes:
        result.bytes_per_rank = statistics.median(sizes)


def merge(runs: list[RunResult]) -> RunResult:
    """The median run: medians of the counts and rates, per-event samples pooled."""
    if len(runs) == 1:
        return runs[0]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def low(values: list[int]) -> int:
        return int(statistics.median_low(values))

    def opt(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    stalls = [s for r in runs for s in r.stalls_s]
    restores = [s for r in runs for s in r.restores_s]
    downtimes = [s for r in runs for s in r.downtimes_s]
    return RunResult(
        contender=runs[0].contender,
        failures=low([r.failures for r in runs]),
        deferred=low([r.deferred for r in runs]),
        kills=runs[0].kills,
        executed=low([r.executed for r in runs]),
        useful=low([r.useful for r in runs]),
        lost=low([r.lost for r in runs]),
        goodput=med([r.goodput for r in runs]),
        saves=low([r.saves for r in runs]),
        committed=low([r.committed for r in runs]),
        skipped=low([r.skipped for r in runs]),
        stall_median_s=med(stalls) if stalls else None,
        stall_estimate_s=opt([r.stall_estimate_s for r in runs]),
        restore_median_s=med(restores) if restores else None,
        downtime_median_s=med(downtimes) if downtimes else None,
        step_median_s=med([r.step_median_s for r in runs]),
        stalls_s=stalls,
        restores_s=restores,
        downtimes_s=downtimes,
        wall_s=med([r.wall_s for r in runs]),
        time_goodput=med([r.time_goodput for r in runs]),
        bytes_per_rank=opt([r.bytes_per_rank for r in runs]),
        exit_status=max(r.exit_status for r in runs),
    )


# -- the projection ---------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    """What the projection to 1k-16k GPUs takes as given (printed with the table)."""

    params: float = 405e9  # Llama 3 405B
    bytes_per_param: float = 14.0  # bf16 weights + fp32 master + 2 fp32 Adam moments
    stage_gbps: float = 20.0  # device -> pinned host copy per GPU (GB/s), ckpt's stall
    storage_total_gbps: float = 2000.0  # Llama 3's storage: 2 TB/s sustained (7 TB/s peak)
    restart_s: float = 120.0  # reschedule, process start, NCCL init, to the restore call
    llama3_interruptions: int = 419
    llama3_days: float = 54.0
    llama3_gpus: int = 16384


def project(
    measured: dict[str, tuple[float, float]], a: Assumptions, gpus: int
) -> list[dict[str, Any]]:
    """Goodput at ``gpus`` GPUs for each contender's measured (stall C, restore R).

    Model (first order, Young/Daly): the job saves every tau seconds of compute, each save
    stalls C; a failure loses on average tau/2 plus the save in flight (persist P, async)
    and costs the restart R. Goodput = tau/(tau + C) * (1 - (R + P + (tau + C)/2) / M),
    tau = max(sqrt(2 C M), P) (an async save must land before the next one starts).
    """
    mtbf = a.llama3_days * 86400 / a.llama3_interruptions * a.llama3_gpus / gpus
    per_gpu = a.params * a.bytes_per_param / gpus
    write_gbps = a.storage_total_gbps / gpus  # bandwidth per GPU when all write at once
    rows = []
    contenders = [(name, c, r, False) for name, (c, r) in measured.items()]
    if "ckpt" in measured:  # the peer that does not overlap: the write inside the stall
        contenders.append(("blocking save", *measured["ckpt"], True))
    for name, c_meas, r_meas, blocking in contenders:
        stall = c_meas + per_gpu / (a.stage_gbps * 1e9)  # fixed cost measured + staging copy
        persist = per_gpu / (write_gbps * 1e9)
        if blocking:
            stall, persist = stall + persist, 0.0
        restore = a.restart_s + r_meas + per_gpu / (write_gbps * 1e9)
        tau = max(math.sqrt(2 * stall * mtbf), persist)
        goodput = tau / (tau + stall) * (1 - (restore + persist + (tau + stall) / 2) / mtbf)
        # The largest restart overhead that still leaves 98%:
        budget = (1 - 0.98 * (tau + stall) / tau) * mtbf - persist - (tau + stall) / 2
        rows.append(
            {
                "gpus": gpus,
                "contender": name,
                "mtbf_h": mtbf / 3600,
                "gb_per_gpu": per_gpu / 1e9,
                "stall_s": stall,
                "persist_s": persist,
                "restore_s": restore,
                "interval_s": tau,
                "goodput": goodput,
                "max_restart_for_98_s": budget - r_meas - per_gpu / (write_gbps * 1e9),
            }
        )
    return rows


# -- printing ----------------------------------------------------------------------------


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def results_table(results: list[RunResult]) -> str:
    head = (
        "| contender | failures (deferred) | saves (committed, skipped) | steps executed | "
        "useful | lost | goodput (steps) | goodput (time) | stall C median | restore R median "
        "| downtime / failure | step |"
    )
    lines = [head, "|" + " --- |" * 12]
    for r in results:
        lines.append(
            f"| {r.contender} | {r.failures} ({r.deferred}) | {r.saves} ({r.committed}, "
            f"{r.skipped}) | {r.executed} | {r.useful} | {r.lost} | {r.goodput:.3f} | "
            f"{r.time_goodput:.3f} | {fmt(r.stall_median_s, '.1f', 1e3)} ms | "
            f"{fmt(r.restore_median_s, '.2f')} s | {fmt(r.downtime_median_s, '.1f')} s | "
            f"{r.step_median_s * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def projection_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| GPUs | job MTBF | state / GPU | contender | stall C | persist P | restore R "
        "| interval | goodput | max restart for 98% |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['gpus']} | {r['mtbf_h']:.1f} h | {r['gb_per_gpu']:.2f} GB | {r['contender']} "
            f"| {r['stall_s']:.3f} s | {r['persist_s']:.1f} s | {r['restore_s']:.0f} s | "
            f"{r['interval_s']:.0f} s | {r['goodput'] * 100:.2f}% | "
            f"{r['max_restart_for_98_s']:.0f} s |"
        )
    return "\n".join(lines)


def assumptions_text(a: Assumptions) -> str:
    mtbf16k = a.llama3_days * 24 / a.llama3_interruptions
    return "\n".join(
        [
            f"- model: {a.params / 1e9:.0f}B parameters (Llama 3 405B) at every scale, "
            f"{a.bytes_per_param:.0f} bytes/parameter (bf16 weights, fp32 master, 2 fp32 Adam "
            "moments), sharded evenly: each byte is written by one GPU",
            f"- interruptions: {a.llama3_interruptions} in {a.llama3_days:.0f} days on "
            f"{a.llama3_gpus} GPUs (Llama 3), rate per GPU constant, so the job MTBF is "
            f"{mtbf16k:.2f} h x {a.llama3_gpus} / GPUs",
            f"- stall C = the measured stall (kept as a fixed per-save cost) + state/GPU over "
            f"{a.stage_gbps:.0f} GB/s device-to-pinned-host copy",
            f"- storage: {a.storage_total_gbps / 1000:.0f} TB/s sustained in total (Llama 3's "
            "Tectonic), shared by every GPU: persist P = state/GPU over its share; the restore "
            "reads at the same rate",
            f"- restore R = {a.restart_s:.0f} s restart overhead (reschedule, process start, "
            "NCCL init; not measured here) + the measured restore-to-first-step + the read",
            "- blocking save: ckpt's C plus the write (P) inside the stall, P = 0 after it: "
            "what a synchronous save (torch.save, dcp.save) would cost",
            "- interval: Young/Daly tau = sqrt(2 C MTBF), at least P (async: a save lands "
            "before the next starts); goodput = tau/(tau+C) x (1 - (R + P + (tau+C)/2) / MTBF)",
        ]
    )


# -- main --------------------------------------------------------------------------------


def contenders(mode: str) -> list[Contender]:
    if mode == "smoke":
        return [Contender("ckpt every 5", "ckpt", 5)]
    out = [
        Contender("ckpt every 5", "ckpt", 5),
        Contender("DCP every 5", "dcp", 5),
        Contender("ckpt every 20", "ckpt", 20),
        Contender("ckpt auto", "ckpt", 0),
    ]
    if mode == "full":
        out.append(Contender("DCP every 20", "dcp", 20))
    return out


def stall_floor(world: int) -> tuple[float, int]:
    """Seconds to copy one rank's share of the state into a touched host buffer (memcpy),
    and those bytes: the physical floor of a save's stall on this machine."""
    model = TinyLM()
    params = [p.detach() for p in model.parameters()]
    state = params + [torch.randn_like(p) for p in params] * 2  # + 2 Adam moments
    nbytes = sum(t.numel() * t.element_size() for t in state) // world
    flat = torch.cat([t.reshape(-1) for t in state])[: nbytes // 4]
    dst = torch.empty_like(flat)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(flat)
        times.append(time.perf_counter() - t)
    return statistics.median(times), nbytes


def pooled(results: list[RunResult]) -> dict[str, tuple[float, float]]:
    """(median stall C, median restore R) per library, over every save and restart of all
    its runs: neither depends on the save interval."""
    out = {}
    for lib in ("ckpt", "DCP"):
        runs = [r for r in results if r.contender.startswith(lib)]
        stalls = [s for r in runs for s in r.stalls_s]
        restores = [s for r in runs for s in r.restores_s]
        if stalls:
            out[lib] = (statistics.median(stalls), statistics.median(restores or [0.0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 s per contender, 1 DCP run")
    parser.add_argument("--smoke", action="store_true", help="ckpt only, one failure (CI)")
    parser.add_argument("--budget", type=float, help="seconds of training per contender")
    parser.add_argument("--mtbf", type=float, help="mean seconds between injected failures")
    parser.add_argument(
        "--seed", type=int, default=21, help="failure schedule (21: both kinds in --quick)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved runs per contender (medians shown)"
    )
    parser.add_argument("--json", help="write the results and the projection here")
    parser.add_argument("--dir", help="parent of the temporary work directories")
    # Worker side (torchrun runs this module again with these):
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--every", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        # Skip the interpreter's teardown: gloo objects sometimes abort there, which torchrun
        # would count as a failure (ckpt.demo does the same).
        sys.stdout.flush()
        os._exit(0)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    budget = args.budget or {"smoke": 6.0, "quick": 20.0, "full": 180.0}[mode]
    mtbf = args.mtbf or {"smoke": 20.0, "quick": 20.0, "full": 45.0}[mode]
    if mode == "smoke":
        schedule = [Failure(2.0, whole_job=False, victim=1, after_commit=True)]
    else:
        schedule = failure_schedule(args.seed, budget, mtbf, 2)
    floor_s, floor_bytes = stall_floor(2)
    print(
        f"goodput benchmark ({mode}): TinyLM {parameter_count() / 1e6:.2f}M params, FSDP2 on 2 "
        f"gloo ranks (CPU), torchrun c10d restarts; {budget:.0f} s of training per contender"
    )
    print(
        f"failure schedule (seed {args.seed}, MTBF {mtbf:.0f} s): "
        + ", ".join(f"{f.at:.1f}s {'job' if f.whole_job else f'rank{f.victim}'}" for f in schedule)
    )
    print(
        f"stall floor: memcpy of one rank's state ({floor_bytes / 1e6:.1f} MB) = "
        f"{floor_s * 1e3:.1f} ms; goodput limit = 1.0 (no failure, free saves)"
    )
    print(
        f"noisy: 2 shared cores, other jobs running; {args.repeats} run(s) per contender, "
        "medians across runs"
    )
    base = Path(tempfile.mkdtemp(prefix="goodput-", dir=args.dir))
    runs: dict[str, list[RunResult]] = {c.name: [] for c in contenders(mode)}
    try:
        for repeat in range(args.repeats):  # contenders interleaved, repeat after repeat
            for contender in contenders(mode):
                result = run_contender(contender, schedule, budget, mtbf, base)
                runs[contender.name].append(result)
                print(
                    f"  [{repeat + 1}/{args.repeats}] {contender.name}: goodput "
                    f"{result.goodput:.3f}, {result.failures} failures, downtimes "
                    + ", ".join(f"{d:.1f}" for d in result.downtimes_s)
                    + f" s, exit {result.exit_status}",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results = [merge(rs) for rs in runs.values()]
    print()
    print(results_table(results))
    a = Assumptions()
    measured = pooled(results)
    rows = [row for gpus in (1024, 4096, 16384) for row in project(measured, a, gpus)]
    print()
    print("projection (assumptions):")
    print(assumptions_text(a))
    print()
    print(projection_table(rows))
    met = [r for r in rows if r["gpus"] == 16384]
    for r in met:
        verdict = "met" if r["goodput"] >= 0.98 else "NOT met"
        print(
            f"target >= 98% at a {r['mtbf_h']:.1f} h job MTBF ({r['contender']}): {verdict} "
            f"({r['goodput'] * 100:.2f}%; holds while the restart overhead stays under "
            f"{r['max_restart_for_98_s']:.0f} s)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "mode": mode,
                    "budget_s": budget,
                    "mtbf_s": mtbf,
                    "schedule": [asdict(f) for f in schedule],
                    "stall_floor_s": floor_s,
                    "results": [asdict(r) for r in results],
                    "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
                    "assumptions": asdict(a),
                    "projection": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

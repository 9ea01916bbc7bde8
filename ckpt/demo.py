"""``ckpt demo``: train, crash for real, restore (optionally on another world size),
finish, and check the result bit for bit against a run that had no failure.

Each training run is a real child process (``torchrun`` for several ranks, FSDP2 over
gloo). The crash is a SIGKILL of one training process at a random step. The restarted
job restores the newest committed checkpoint and continues. The reference run saves
at the same step the crashed run restored from and continues from there on the same
world size as the resumed run, so even a resharded resume must match it bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckpt.errors import CheckpointError

__all__ = ["DemoResult", "run_demo", "worker"]

WIDTH = 1024
LAYERS = 4
ROWS_PER_RANK = 8


def _build(world: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Dropout(0.1)]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    return model, optimizer, scheduler


def _samples(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``first .. first+count-1`` of the synthetic data set.

    Each sample is a function of its index only.
    """
    xs, ys = [], []
    for index in range(first, first + count):
        g = torch.Generator().manual_seed(10_000 + index)
        xs.append(torch.randn(WIDTH, generator=g))
        ys.append(torch.randint(0, 10, (), generator=g))
    return torch.stack(xs), torch.stack(ys)


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd_typed = get_state_dict(model, optimizer, options=opts)
    optim_sd: Any = optim_sd_typed
    out = {f"model.{k}": v.clone() for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    for fqn, per_param in optim_sd.get("state", {}).items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{fqn}.{name}"] = value.clone()
    return out


def worker(args: argparse.Namespace) -> None:
    """One training process (one rank); torchrun sets RANK and WORLD_SIZE for several."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from ckpt._manager import CheckpointManager
    from ckpt._stateful import ModelOptimizerState

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from datetime import timedelta

        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank() if world > 1 else 0
    model, optimizer, scheduler = _build(world)
    torch.manual_seed(1 + rank)
    data = {"next_sample": 0, "next_step": 1}
    state: dict[str, Any] = {
        "train": ModelOptimizerState(model, optimizer),
        "scheduler": scheduler,
        "data": data,
    }
    mgr = CheckpointManager(
        args.root,
        every_steps=args.every,
        keep_last=3,
        include_rng=True,
        if_busy="wait",
        coordinator=args.coordinator,
    )
    restored = mgr.restore(state)
    if rank == 0:
        _say(f"restored {restored}")
    reported = 0
    for step in range(data["next_step"], args.stop_at + 1):
        x, y = _samples(data["next_sample"] + rank * ROWS_PER_RANK, ROWS_PER_RANK)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        data["next_sample"] += world * ROWS_PER_RANK
        data["next_step"] = step + 1
        if args.save and mgr.maybe_save(step, state) is not None:
            _say(f"rank {rank} pid {os.getpid()} saving {step}")
        _say(f"rank {rank} pid {os.getpid()} step {step}")
        if rank == 0:
            reported = _append_results(mgr, args.report, reported)
    if args.save and args.stop_at % args.every:
        mgr.save(args.stop_at, state)
    mgr.close()
    if rank == 0:
        _append_results(mgr, args.report, reported)
    final = _full_state(model, optimizer)
    if rank == 0:
        save_file(final, args.out)
    if world > 1:
        dist.destroy_process_group()


def _say(line: str) -> None:
    # One write per line: ranks share the pipe, and print() writes the newline separately.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _append_results(mgr: Any, report: str, reported: int) -> int:
    history = mgr.metrics.history
    if len(history) > reported:
        with open(report, "a") as f:
            for r in history[reported:]:
                f.write(
                    json.dumps(
                        {
                            "step": r.step,
                            "stall": r.stall_seconds,
                            "persist": r.persist_seconds,
                            "commit": r.commit_seconds,
                            "bytes": r.bytes_written,
                        }
                    )
                    + "\n"
                )
    return len(history)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DemoResult:
    nproc: int
    resume_nproc: int
    crash_step: int
    restored_step: int | None
    identical: bool
    saves: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Launcher:
    def __init__(self, workdir: Path, steps: int, every: int, coordinator: str | None) -> None:
        self.workdir = workdir
        self.steps = steps
        self.every = every
        self.coordinator = coordinator
        self.report = workdir / "saves.jsonl"

    def command(
        self,
        nproc: int,
        root: Path,
        out: Path,
        *,
        stop_at: int,
        save: bool = True,
        max_restarts: int = 0,
    ) -> list[str]:
        worker_args = [
            "-m",
            "ckpt.demo",
            "--root",
            str(root),
            "--every",
            str(self.every),
            "--stop-at",
            str(stop_at),
            "--out",
            str(out),
            "--report",
            str(self.report),
        ]
        if self.coordinator:
            worker_args += ["--coordinator", self.coordinator]
        if not save:
            worker_args.append("--no-save")
        if nproc == 1:
            return [sys.executable, *worker_args]
        # The c10d rendezvous, not the static one (--master-addr/--master-port): with the
        # static one, about half of the restarts (--max-restarts) time out in gloo's connect.
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{_free_port()}",
            "--rdzv-id",
            f"ckpt-demo-{os.getpid()}",
            "--max-restarts",
            str(max_restarts),
            *worker_args,
        ]

    def run(self, cmd: list[str]) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        if done.returncode != 0:
            raise RuntimeError(f"training run failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        return done.stdout


def _env() -> dict[str, str]:
    # Without it, torchrun restarts reuse stale gloo addresses from the shared rendezvous store.
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def _run_and_kill(
    cmd: list[str], victim_rank: int, event: str, at_step: int, *, keep_reading: bool
) -> tuple[int, list[str]]:
    """Run ``cmd``; SIGKILL ``victim_rank`` when it reports ``event`` ("step" or "saving") at
    ``at_step``. Returns the exit status and the lines printed after the kill (when
    ``keep_reading``, e.g. by workers that torchrun restarted)."""
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    assert child.stdout is not None
    after: list[str] = []
    killed = False
    for line in child.stdout:
        if killed:
            after.append(line.rstrip("\n"))
            continue
        parts = line.split()
        if (
            len(parts) == 6
            and parts[0] == "rank"
            and int(parts[1]) == victim_rank
            and parts[4] == event
            and int(parts[5]) == at_step
        ):
            os.kill(int(parts[3]), signal.SIGKILL)
            killed = True
            if not keep_reading:
                break
    child.stdout.close()
    try:
        child.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    if not killed:
        raise RuntimeError(
            f"rank {victim_rank} never reported {event} {at_step}; nothing was killed"
        )
    return child.returncode, after


_DEMO_MARK = ".ckpt-demo"


def _fresh_workdir(base: Path) -> Path:
    """Empty ``base`` for a new demo run; only a directory an earlier demo created (it holds
    the demo's mark) or an empty one is ever emptied."""
    if base.is_symlink() or (base.exists() and not base.is_dir()):
        raise CheckpointError(
            f"demo directory {base} is not a directory; give a new or empty directory"
        )
    if base.exists() and any(base.iterdir()):
        if not (base / _DEMO_MARK).is_file():
            raise CheckpointError(
                f"refusing to use {base} for the demo: it is not empty and was not created by "
                "`ckpt demo` (its files would be deleted); give a new or empty directory"
            )
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    (base / _DEMO_MARK).write_text("created by `ckpt demo`; the next demo run empties this\n")
    return base


def run_demo(
    workdir: str,
    *,
    steps: int = 40,
    every: int = 5,
    nproc: int = 1,
    resume_nproc: int | None = None,
    coordinator: str | None = None,
    seed: int | None = None,
    kill_during: str = "step",
    torchrun_restarts: bool = False,
    echo: Any = print,
) -> DemoResult:
    """Run the whole demo and return what happened; ``echo`` prints progress lines.

    Args:
        kill_during: "step" kills the victim right after a training step; "save" kills it
            while a checkpoint it started is being written.
        torchrun_restarts: let torchrun (``--max-restarts 1``) restart the job on the same
            world size instead of relaunching it.
    """
    from safetensors.torch import load_file

    from ckpt.format import scan_steps
    from storage_backends import LocalBackend

    t0 = time.perf_counter()
    resume_nproc = resume_nproc or nproc
    rng = random.Random(seed)
    if kill_during == "save":
        crash_step = every * rng.randint(2, max(2, (steps - 2) // every))
    else:
        crash_step = rng.randint(2 * every + 1, steps - 2)
    if torchrun_restarts and (nproc == 1 or resume_nproc not in (None, nproc)):
        raise ValueError(
            "torchrun restarts need --nproc > 1 and the same world size after the crash"
        )
    base = _fresh_workdir(Path(workdir))
    launcher = _Launcher(base, steps, every, coordinator)
    root = base / "ckpts"

    echo(
        f"[1/4] training {steps} steps on {nproc} rank(s), async checkpoint every {every} steps -> "
        f"{root}"
    )
    victim_rank = nproc - 1
    event = "saving" if kill_during == "save" else "step"
    if torchrun_restarts:
        cmd = launcher.command(
            nproc, root, base / "final.safetensors", stop_at=steps, max_restarts=1
        )
        status, after = _run_and_kill(cmd, victim_rank, event, crash_step, keep_reading=True)
        echo(
            f"[2/4] SIGKILLed rank {victim_rank} at {event} {crash_step}; torchrun restarted the "
            "job"
        )
        if status != 0:
            raise RuntimeError(f"the job restarted by torchrun failed (exit status {status})")
        out = "\n".join(after)
        committed_before = None
    else:
        cmd = launcher.command(nproc, root, base / "unused.safetensors", stop_at=steps)
        status, _ = _run_and_kill(cmd, victim_rank, event, crash_step, keep_reading=False)
        echo(
            f"[2/4] SIGKILLed rank {victim_rank} at {event} {crash_step}; the job died (exit "
            f"status {status})"
        )
        committed = scan_steps(LocalBackend(root)).committed
        committed_before = committed[-1] if committed else None
        out = launcher.run(
            launcher.command(resume_nproc, root, base / "final.safetensors", stop_at=steps)
        )
    restored_line = next(
        (ln for ln in out.splitlines() if ln.startswith("restored")), "restored None"
    )
    restored = None if restored_line.split()[1] == "None" else int(restored_line.split()[1])
    how = "restarted by torchrun" if torchrun_restarts else "relaunched"
    echo(
        f"[3/4] {how} on {resume_nproc} rank(s): restored step {restored}, trained to step {steps}"
    )

    # The reference never fails. On one world size it is a single run; when the resume
    # reshards, it reaches the restored step on the original world size, saves there and
    # continues on the resumed world size, as the recovered job did.
    ref_root = base / "reference"
    saves_seen = launcher.report.read_text() if launcher.report.exists() else ""
    if restored is not None and resume_nproc != nproc:
        launcher.run(
            launcher.command(nproc, ref_root, base / "ref-mid.safetensors", stop_at=restored)
        )
        launcher.run(
            launcher.command(
                resume_nproc, ref_root, base / "reference.safetensors", stop_at=steps, save=False
            )
        )
    else:
        launcher.run(
            launcher.command(
                resume_nproc, ref_root, base / "reference.safetensors", stop_at=steps, save=False
            )
        )
    launcher.report.write_text(saves_seen)
    expected = load_file(str(base / "reference.safetensors"))
    got = load_file(str(base / "final.safetensors"))
    identical = expected.keys() == got.keys() and all(
        torch.equal(expected[k], got[k]) for k in expected
    )
    echo(
        "[4/4] compared with a run without failure: "
        f"{'bit-identical' if identical else 'DIFFERENT'}"
    )
    if committed_before is not None and restored != committed_before:
        echo(f"      note: newest committed step was {committed_before}, restore chose {restored}")
    saves = [json.loads(line) for line in saves_seen.splitlines() if line]
    return DemoResult(
        nproc, resume_nproc, crash_step, restored, identical, saves, time.perf_counter() - t0
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description="ckpt demo training worker (run by `ckpt demo`)")
    parser.add_argument("--root", required=True)
    parser.add_argument("--every", type=int, required=True)
    parser.add_argument("--stop-at", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--no-save", dest="save", action="store_false")
    worker(parser.parse_args())
    # Everything is written and the process group destroyed. Skip the interpreter's
    # teardown: torch's gloo objects sometimes abort there ("terminate called without an
    # active exception", about 1 run in 10 here), which torchrun would report as a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _main()

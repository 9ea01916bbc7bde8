"""``ckpt demo``: train, crash for real, restore, finish, and check against a clean run.

The parent process runs an uninterrupted reference in-process, then starts the same
training in a child process with asynchronous checkpoints, SIGKILLs the child at a
random step, starts it again (it restores the newest committed checkpoint and
continues), and compares the final parameters and optimizer state bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

WIDTH = 1024
LAYERS = 4
BATCH = 32


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Dropout(0.1)]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1000)
    return model, optimizer, scheduler


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of one step, a function of the step only (the data-loader position)."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> float:
    x, y = batch(step)
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def final_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, per_param in optimizer.state_dict()["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{index}.{name}"] = value.clone()
    return out


def reference(steps: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model, optimizer, scheduler = build()
    torch.manual_seed(1)
    for step in range(1, steps + 1):
        train_step(model, optimizer, scheduler, step)
    return final_tensors(model, optimizer)


def worker(root: str, steps: int, every: int, out: str, report: str) -> None:
    """The training job: restore, train with async checkpoints, write the final tensors."""
    from safetensors.torch import save_file

    from ckpt._manager import CheckpointManager

    torch.set_num_threads(1)
    model, optimizer, scheduler = build()
    torch.manual_seed(1)
    data = {"next_step": 1}
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": data}
    with CheckpointManager(root, every_steps=every, keep_last=2, include_rng=True, if_busy="wait") as mgr:
        restored = mgr.restore(state)
        print(f"restored {restored}", flush=True)
        start = data["next_step"]
        reported = 0
        for step in range(start, steps + 1):
            train_step(model, optimizer, scheduler, step)
            data["next_step"] = step + 1
            mgr.maybe_save(step, state)
            print(f"step {step}", flush=True)
            reported = _append_results(mgr, report, reported)
        mgr.wait()
        _append_results(mgr, report, reported)
    save_file(final_tensors(model, optimizer), out)


def _append_results(mgr: Any, report: str, reported: int) -> int:
    history = mgr.metrics.history
    if len(history) > reported:
        with open(report, "a") as f:
            for r in history[reported:]:
                f.write(json.dumps({
                    "step": r.step, "stall": r.stall_seconds, "persist": r.persist_seconds,
                    "commit": r.commit_seconds, "bytes": r.bytes_written,
                }) + "\n")
    return len(history)


@dataclass
class DemoResult:
    crash_step: int
    restored_step: int | None
    identical: bool
    saves: list[dict[str, Any]]
    seconds: float


def run_demo(root: str, *, steps: int = 60, every: int = 5, seed: int | None = None,
             keep: bool = False, echo: Any = print) -> DemoResult:
    """Run the whole demo and return what happened; ``echo`` prints progress lines."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    rng = random.Random(seed)
    crash_step = rng.randint(2 * every + 1, steps - 2)
    root_path = Path(root)
    if root_path.exists() and not keep:
        shutil.rmtree(root_path)
    root_path.mkdir(parents=True, exist_ok=True)
    out = root_path / "final.safetensors"
    report = root_path / "saves.jsonl"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ckpt._demo", str(root_path / "ckpts"), str(steps), str(every), str(out), str(report)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    echo(f"[1/4] training {steps} steps in a child process, async checkpoint every {every} steps")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == f"step {crash_step}":
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=120)
    echo(f"[2/4] SIGKILLed the child at step {crash_step} (exit status {child.returncode})")

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if rerun.returncode != 0:
        raise RuntimeError(f"the restarted training failed:\n{rerun.stderr}")
    restored_line = next((ln for ln in rerun.stdout.splitlines() if ln.startswith("restored")), "restored None")
    restored = None if restored_line.split()[1] == "None" else int(restored_line.split()[1])
    echo(f"[3/4] restarted: restored step {restored}, trained to step {steps}")

    expected = reference(steps)
    got = load_file(str(out))
    identical = expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    echo(f"[4/4] compared with an uninterrupted run: {'bit-identical' if identical else 'DIFFERENT'}")
    saves = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return DemoResult(crash_step, restored, identical, saves, time.perf_counter() - t0)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

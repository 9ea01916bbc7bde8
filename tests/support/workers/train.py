"""A small deterministic training program for crash/resume tests.

Run from the repository root::

    python -m tests.support.workers.train --root DIR --steps N --every K --out OUT.safetensors

It trains an MLP with dropout under AdamW and a step LR schedule on synthetic data
derived from the step index, checkpoints asynchronously with ``CheckpointManager``
(``include_rng=True``, ``if_busy="wait"``), resumes from the newest committed step on
start and, once done, writes the final parameters, buffers, optimizer state, LR and a
few draws of every RNG to OUT with safetensors, so that two runs compare bit for bit.

Every event is one line on stdout, flushed at once, for a test to act on:

* ``restored S skipped=K`` or ``restored none`` at start,
* ``saving S`` when a save of step S was staged and its write started in the background,
* ``committed S`` when the manifest of step S was published,
* ``hang data S`` / ``hang commit S`` when ``--hang-step S`` froze that save on purpose,
* ``step S`` after step S trained (and its save, if due, started),
* ``done`` once OUT is written.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ckpt import CheckpointManager, SaveOptions
from ckpt.format import MANIFEST_NAME, parse_step_prefix
from storage_backends import BlobStream, BytesLike, LocalBackend

IN_FEATURES = 16
HIDDEN = 64
OUT_FEATURES = 4
BATCH = 32
SEED = 1234

_print_lock = threading.Lock()


def emit(line: str) -> None:
    """Write one whole line to stdout and flush (safe from background threads)."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _step_of(path: str) -> int | None:
    return parse_step_prefix(path.split("/", 1)[0])


def _block_forever(marker: str) -> None:
    emit(marker)
    threading.Event().wait()


class _SlowStream:
    """A blob stream that sleeps before every write, and may freeze after its first one."""

    def __init__(self, inner: BlobStream, delay: float, hang: str | None) -> None:
        self._inner = inner
        self._delay = delay
        self._hang = hang

    def write(self, data: BytesLike) -> None:
        time.sleep(self._delay)
        self._inner.write(data)
        if self._hang is not None:
            _block_forever(self._hang)  # bytes are on disk, the file is not committed

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


class SlowBackend:
    """``LocalBackend`` with slower writes and commit markers, to kill a process mid-save.

    Args:
        root: the checkpoint directory.
        delay_ms: sleep before every data write, in milliseconds.
        hang_step: freeze the save of this step forever (until the process is killed).
        hang_phase: ``"data"`` freezes after the first data bytes are written;
            ``"commit"`` freezes once every data file is durable, before the manifest.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        delay_ms: float = 0.0,
        hang_step: int | None = None,
        hang_phase: str = "data",
    ) -> None:
        self._inner = LocalBackend(root)
        self._delay = delay_ms / 1000.0
        self._hang_step = hang_step
        self._hang_phase = hang_phase

    @property
    def url(self) -> str:
        return self._inner.url

    def open_stream(self, path: str) -> BlobStream:
        stream = self._inner.open_stream(path)
        hang = None
        if (
            self._hang_phase == "data"
            and self._hang_step is not None
            and _step_of(path) == self._hang_step
        ):
            hang = f"hang data {self._hang_step}"
        return _SlowStream(stream, self._delay, hang)

    def write(self, path: str, data: BytesLike) -> None:
        time.sleep(self._delay)
        self._inner.write(path, data)

    def put_if_absent(self, path: str, data: BytesLike) -> bool:
        step = _step_of(path)
        is_manifest = path.endswith("/" + MANIFEST_NAME)
        if is_manifest and self._hang_phase == "commit" and step == self._hang_step:
            _block_forever(f"hang commit {step}")
        created = self._inner.put_if_absent(path, data)
        if created and is_manifest:
            emit(f"committed {step}")
        return created

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._inner.read(path, offset, length)

    def read_into(self, path: str, offset: int, out: BytesLike) -> None:
        self._inner.read_into(path, offset, out)

    def size(self, path: str) -> int:
        return self._inner.size(path)

    def exists(self, path: str) -> bool:
        return self._inner.exists(path)

    def list_objects(self, prefix: str = "") -> list[str]:
        return self._inner.list_objects(prefix)

    def list_prefixes(self, prefix: str = "") -> list[str]:
        return self._inner.list_prefixes(prefix)

    def delete(self, paths: Iterable[str]) -> None:
        self._inner.delete(paths)

    def delete_prefix(self, prefix: str) -> None:
        self._inner.delete_prefix(prefix)

    def abort_unfinished(self, prefix: str, older_than_seconds: float = 0.0) -> int:
        return self._inner.abort_unfinished(prefix, older_than_seconds)

    def close(self) -> None:
        self._inner.close()

    def last_modified(self, prefix: str) -> float | None:
        return self._inner.last_modified(prefix)


class Net(nn.Module):
    """An MLP with dropout (so the RNG state matters) and a bulky buffer (so saves take time)."""

    bulk: torch.Tensor

    def __init__(self, extra_floats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(HIDDEN, OUT_FEATURES),
        )
        self.register_buffer("bulk", torch.zeros(extra_floats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def build_state(extra_mb: float) -> dict[str, Any]:
    """Fresh model, optimizer and scheduler, identical in every process."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    model = Net(extra_floats=max(1, int(extra_mb * (1 << 20)) // 4))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=4, gamma=0.8)
    return {"model": model, "optim": optim, "sched": sched}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of ``step``: a pure function of the step index (the exact data position)."""
    gen = torch.Generator().manual_seed(SEED * 1000 + step)
    x = torch.randn(BATCH, IN_FEATURES, generator=gen)
    w = torch.linspace(-1.0, 1.0, IN_FEATURES * OUT_FEATURES).view(IN_FEATURES, OUT_FEATURES)
    y = torch.tanh(x @ w)
    return x, y


def train_step(state: dict[str, Any], step: int) -> None:
    """One optimizer step; draws from the torch, NumPy and Python RNGs."""
    model: Net = state["model"]
    optim: torch.optim.Optimizer = state["optim"]
    x, y = batch(step)
    # Augmentation noise from the global NumPy and Python RNGs, dropout from torch's.
    noise = torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
    x = x + 0.05 * random.random() * noise
    model.train()
    optim.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    state["sched"].step()
    with torch.no_grad():
        model.bulk.mul_(0.5).add_(loss.detach())


def final_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Everything two runs must agree on, as named tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state["model"].state_dict().items():
        out[f"model.{name}"] = value.detach().clone().contiguous()
    for pid, per_param in state["optim"].state_dict()["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{pid}.{key}"] = value.detach().clone().contiguous()
    out["sched.last_lr"] = torch.tensor(state["sched"].get_last_lr(), dtype=torch.float64)
    out["sched.last_epoch"] = torch.tensor([state["sched"].last_epoch], dtype=torch.int64)
    # The next draws of every RNG: equal only when the RNG states were restored exactly.
    out["rng.torch"] = torch.rand(8)
    out["rng.numpy"] = torch.from_numpy(np.random.standard_normal(8))
    out["rng.python"] = torch.tensor([random.random() for _ in range(8)], dtype=torch.float64)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", required=True, help="checkpoint directory")
    parser.add_argument("--steps", type=int, required=True, help="train steps 1..N")
    parser.add_argument("--every", type=int, required=True, help="checkpoint every K steps")
    parser.add_argument("--out", required=True, help="where to write the final tensors")
    parser.add_argument("--extra-mb", type=float, default=4.0, help="size of the bulk buffer")
    parser.add_argument("--slow-save-ms", type=float, default=0.0, help="sleep per storage write")
    parser.add_argument("--keep-last", type=int, default=3, help="retention window")
    parser.add_argument("--hang-step", type=int, default=None, help="freeze the save of this step")
    parser.add_argument("--hang-phase", choices=("data", "commit"), default="data")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    state = build_state(args.extra_mb)
    backend = SlowBackend(
        args.root, delay_ms=args.slow_save_ms, hang_step=args.hang_step, hang_phase=args.hang_phase
    )
    # Small files and write blocks: several files and writes per save, more moments to die in.
    options = SaveOptions(file_bytes=1 << 20, write_block_bytes=1 << 20, io_threads=2)
    mgr = CheckpointManager(
        backend,
        every_steps=args.every,
        keep_last=args.keep_last,
        include_rng=True,
        if_busy="wait",
        save_options=options,
    )
    restored = mgr.restore(state)
    if restored is None:
        emit("restored none")
    else:
        skipped = len(mgr.last_restore.skipped) if mgr.last_restore else 0
        emit(f"restored {restored} skipped={skipped}")
    for step in range((restored or 0) + 1, args.steps + 1):
        train_step(state, step)
        if mgr.maybe_save(step, state) is not None:
            emit(f"saving {step}")
        emit(f"step {step}")
    mgr.close()
    save_file(final_tensors(state), args.out)
    emit("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A plain single-process training loop under ``ckpt.CheckpointManager``.

Run it, interrupt it (Ctrl-C, ``kill``, a node failure), run it again: it resumes from the
newest committed checkpoint, RNG and data position included, and finishes with the same
weights an uninterrupted run has.

    python examples/plain_loop.py --root /tmp/plain-run --steps 200
    python examples/plain_loop.py --root /tmp/plain-run --steps 200 --stop-at 120  # "crash"
    python examples/plain_loop.py --root /tmp/plain-run --steps 200               # resumes

``--smoke`` runs the whole story in a few seconds: an interrupted run, a resumed one and an
uninterrupted reference, and checks that the resumed weights equal the reference bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

import ckpt


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.5)
    return model, optimizer, scheduler


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of a synthetic data set: the same on every run."""
    g = torch.Generator().manual_seed(index)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)


def train(root: str, steps: int, stop_at: int | None = None, every: int = 25) -> nn.Module:
    model, optimizer, scheduler = build()
    progress = {"next_step": 1}
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": progress}
    with ckpt.CheckpointManager(root, every_steps=every, keep_last=2, include_rng=True) as mgr:
        restored = mgr.restore(state)  # None (logged) on a fresh root
        print(f"restored step {restored}" if restored else "starting from scratch")
        for step in range(progress["next_step"], steps + 1):
            x, y = batch(step)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            progress["next_step"] = step + 1
            mgr.maybe_save(step, state)  # async: blocks only while copying to host memory
            if stop_at is not None and step == stop_at:
                print(f"stopping at step {step} as if the job died")
                return model
        mgr.save(steps, state)  # the final state, whatever the policy
    return model


def smoke() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resumed_root, reference_root = str(Path(tmp, "resumed")), str(Path(tmp, "reference"))
        train(resumed_root, steps=60, stop_at=37, every=10)  # dies after committing step 30
        resumed = train(resumed_root, steps=60, every=10)
        reference = train(reference_root, steps=60, every=10)
        for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
            if not torch.equal(a, b):
                raise SystemExit(f"resumed weights differ from the reference in {name}")
        print("smoke: resumed run matches the uninterrupted one bit for bit")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="checkpoint root (path or s3://bucket/prefix)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stop-at", type=int, help="stop early, as if the job died here")
    parser.add_argument("--smoke", action="store_true", help="run the short self-check")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    elif args.root is None:
        parser.error("--root is required (or --smoke)")
    else:
        train(args.root, args.steps, args.stop_at)


if __name__ == "__main__":
    main()

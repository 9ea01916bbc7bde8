"""A Lightning ``LightningModule`` whose checkpoints go through ckpt (``CkptCheckpointIO``).

Every checkpoint ``ModelCheckpoint`` writes is a ckpt root: written asynchronously,
checksummed, committed atomically, on local disk or ``s3://``; ``ckpt_path=...`` resumes.

    python examples/lightning_module.py --dir /tmp/pl-run --steps 60 --stop-at 25   # "crash"
    python examples/lightning_module.py --dir /tmp/pl-run --steps 60 --resume       # resumes

``--smoke`` runs an interrupted fit, its resumption from the last checkpoint and an
uninterrupted reference, and checks that the resumed weights equal the reference bit for bit.
It stops at an epoch boundary, where a plain DataLoader's position is fully known; a
mid-epoch resume is exact only with a data loader whose state Lightning can restore.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckpt.integrations.lightning import CkptCheckpointIO


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def fit(dirpath: str, steps: int, *, stop_at: int | None = None, resume: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Regressor()
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=4,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=True,
    )
    trainer = pl.Trainer(
        max_steps=stop_at or steps,
        plugins=[CkptCheckpointIO()],
        callbacks=[checkpoints],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data(), ckpt_path="last" if resume else None)
    return model


def smoke() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fit(str(Path(tmp, "run")), 40, stop_at=16)  # checkpoints at 4, 8, 12, 16; "dies"
        resumed = fit(str(Path(tmp, "run")), 40, resume=True)
        reference = fit(str(Path(tmp, "reference")), 40)
        for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
            if not torch.equal(a, b):
                raise SystemExit(f"resumed weights differ from the reference in {name}")
        print("smoke: the resumed Lightning fit matches the uninterrupted one bit for bit")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where ModelCheckpoint writes (path or s3://...)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stop-at", type=int, help="stop early, as if the job died here")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    parser.add_argument("--smoke", action="store_true", help="run the short self-check")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    elif args.dir is None:
        parser.error("--dir is required (or --smoke)")
    else:
        fit(args.dir, args.steps, stop_at=args.stop_at, resume=args.resume)


if __name__ == "__main__":
    main()

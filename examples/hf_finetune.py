"""A Hugging Face ``Trainer`` fine-tune that checkpoints through ckpt and resumes exactly.

``CkptCallback`` saves the model, optimizer, scheduler, TrainerState and RNG states
asynchronously (local disk or ``s3://``) and ``resume_checkpoint`` hands the Trainer what
it needs to continue from the newest committed step, data position included.

    python examples/hf_finetune.py --root /tmp/hf-run --steps 60 --stop-at 25   # "crash"
    python examples/hf_finetune.py --root /tmp/hf-run --steps 60                # resumes

The model is a tiny BERT built from a config (no download); use your own model and data.
``--smoke`` runs an interrupted run, its resumption and an uninterrupted reference, and
checks that the resumed weights equal the reference bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ckpt.integrations.transformers import CkptCallback


class Sentences(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """A synthetic classification set: the same on every run."""

    def __len__(self) -> int:
        return 96

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        ids = torch.randint(5, 100, (16,), generator=g)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(16, dtype=torch.long),
            "labels": ids[0] % 2,
        }


class StopAt(TrainerCallback):
    """Ends training at ``step`` as if the job died there (after the save due at it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


def train(
    root: str, steps: int, workdir: str, stop_at: int | None = None, every: int = 10
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=workdir,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="no",  # ckpt saves; the Trainer writes no checkpoints of its own
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    callback = CkptCallback(root, every_steps=every, keep_last=2)
    callbacks: list[TrainerCallback] = [callback]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    trainer = Trainer(model=model, args=args, train_dataset=Sentences(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint(trainer))
    callback.close()
    return model


def smoke() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resumed_root, reference_root = str(Path(tmp, "resumed")), str(Path(tmp, "reference"))
        train(resumed_root, 30, str(Path(tmp, "out1")), stop_at=17)  # committed step 10
        resumed = train(resumed_root, 30, str(Path(tmp, "out2")))
        reference = train(reference_root, 30, str(Path(tmp, "out3")))
        for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
            if not torch.equal(a, b):
                raise SystemExit(f"resumed weights differ from the reference in {name}")
        print("smoke: the resumed fine-tune matches the uninterrupted one bit for bit")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="checkpoint root (path or s3://bucket/prefix)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stop-at", type=int, help="stop early, as if the job died here")
    parser.add_argument("--smoke", action="store_true", help="run the short self-check")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    elif args.root is None:
        parser.error("--root is required (or --smoke)")
    else:
        with tempfile.TemporaryDirectory() as workdir:
            train(args.root, args.steps, workdir, args.stop_at)


if __name__ == "__main__":
    main()

"""``ckpt.integrations.transformers``: a real Hugging Face Trainer saving through ckpt.

Every run here is a real ``transformers.Trainer`` on CPU with a tiny model built from a
config (no downloads). The central check: a run stopped part-way and resumed from its
ckpt checkpoint ends with the same weights, bit for bit, as a run that was never stopped,
with dropout on (so the RNG states matter) and shuffled data (so the data position does).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import ckpt
from ckpt.format import read_manifest, scan_steps
from ckpt.integrations.transformers import CkptCallback
from recovery import verify_checkpoint
from storage_backends import LocalBackend
from tests.support.checks import assert_all_bit_identical
from tests.support.faulty import FaultyBackend
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3

__all__ = ["aws_test_env", "moto_s3"]  # fixtures used here

ROOT = Path(__file__).resolve().parents[2]
SAMPLES, BATCH, EPOCHS = 24, 4, 2  # 6 batches per epoch, 12 steps without accumulation


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token sequences with binary labels, the same on every construction."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (SAMPLES, 8), generator=g)
        self.labels = torch.randint(0, 2, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def bert_config() -> BertConfig:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    config.num_labels = 2
    return config


class ClsHead(nn.Module):
    """A BERT fine-tune through the CLS token's hidden state: the pooler gets no gradient,
    so AdamW holds no state for its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = BertModel(bert_config())  # with its pooler, as a pretrained BERT has
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = self.bert(input_ids=input_ids).last_hidden_state[:, 0]
        logits = self.head(cls)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "cls-head":
        return ClsHead()
    return BertForSequenceClassification(bert_config())


class StopAt(TrainerCallback):
    """Ends training after ``step``, as a crash right after it would (the save of that
    step, if one is due, is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def training_arguments(tmp: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": EPOCHS,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 3,
        **overrides,
    }
    return TrainingArguments(
        output_dir=str(tmp / "hf-output"),
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **settings,
    )


def train(
    tmp: Path,
    kind: str = "bert",
    *,
    callback: CkptCallback | None = None,
    stop_at: int | None = None,
    resume: bool = False,
    **overrides: Any,
) -> Trainer:
    args = training_arguments(tmp, **overrides)
    callbacks: list[TrainerCallback] = [c for c in (callback,) if c is not None]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    trainer = Trainer(
        model=make_model(kind), args=args, train_dataset=Tokens(), callbacks=callbacks
    )
    checkpoint = callback.resume_checkpoint(trainer) if resume and callback else None
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def losses(trainer: Trainer) -> list[tuple[int, float]]:
    return [(int(e["step"]), e["loss"]) for e in trainer.state.log_history if "loss" in e]


def model_of(trainer: Trainer) -> nn.Module:
    assert trainer.model is not None
    return trainer.model


def pooler_has_optimizer_state(trainer: Trainer) -> bool:
    model = model_of(trainer)
    assert isinstance(model, ClsHead) and model.bert.pooler is not None
    assert trainer.optimizer is not None
    pooler = {id(p) for p in model.bert.pooler.parameters()}
    assert pooler
    return any(id(p) in pooler for p in trainer.optimizer.state)


def assert_same_run(resumed: Trainer, reference: Trainer) -> None:
    assert_all_bit_identical(model_of(resumed).state_dict(), model_of(reference).state_dict())
    assert resumed.state.global_step == reference.state.global_step
    assert resumed.state.epoch == reference.state.epoch
    assert losses(resumed) == losses(reference)
    assert resumed.lr_scheduler is not None and reference.lr_scheduler is not None
    assert resumed.lr_scheduler.get_last_lr() == reference.lr_scheduler.get_last_lr()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trainer]:
    """Uninterrupted runs without any checkpointing, one per model kind."""
    torch.set_num_threads(1)  # as conftest's autouse fixture, which runs after this one
    tmp = tmp_path_factory.mktemp("reference")
    return {
        "bert": train(tmp / "bert"),
        "cls-head": train(tmp / "cls", "cls-head", gradient_accumulation_steps=2),
    }


@pytest.mark.parametrize(
    ("stop_at", "every_steps"),
    [(8, 4), (6, 3)],
    ids=["mid-epoch", "epoch-boundary"],
)
def test_a_resumed_run_reaches_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, reference: dict[str, Trainer], stop_at: int, every_steps: int
) -> None:
    root = str(tmp_path / "ckpt")
    first = train(tmp_path, callback=CkptCallback(root, every_steps=every_steps), stop_at=stop_at)
    assert first.state.global_step == stop_at
    assert max(scan_steps(LocalBackend(root)).committed) == stop_at

    callback = CkptCallback(root, every_steps=every_steps)
    resumed = train(tmp_path, callback=callback, resume=True)

    assert callback.resumed_step == stop_at
    assert_same_run(resumed, reference["bert"])


def test_a_cls_head_whose_pooler_gets_no_gradient_saves_and_resumes(
    tmp_path: Path, reference: dict[str, Trainer]
) -> None:
    """AdamW holds no state for the pooler's parameters; with gradient accumulation."""
    root = str(tmp_path / "ckpt")
    first = train(
        tmp_path,
        "cls-head",
        callback=CkptCallback(root, every_steps=2),
        stop_at=4,
        gradient_accumulation_steps=2,
    )
    assert not pooler_has_optimizer_state(first)

    callback = CkptCallback(root, every_steps=2)
    resumed = train(
        tmp_path, "cls-head", callback=callback, resume=True, gradient_accumulation_steps=2
    )

    assert callback.resumed_step == 4
    assert not pooler_has_optimizer_state(resumed)
    assert_same_run(resumed, reference["cls-head"])


def test_the_saves_are_ckpt_checkpoints_with_retention(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    options = ckpt.SaveOptions(compression=ckpt.Compression(min_bytes=0), chunk_bytes=4096)
    callback = CkptCallback(str(root), every_steps=3, keep_last=2, options=options)
    trainer = train(tmp_path, callback=callback)

    backend = LocalBackend(root)
    assert scan_steps(backend).committed == (9, 12)
    for step in (9, 12):
        manifest = read_manifest(backend, step)
        verify_checkpoint(backend, manifest)
        codecs = {p.codec for entry in manifest.tensors.values() for p in entry.pieces}
        assert codecs == {"zstd"}
    model = make_model("bert")
    state: dict[str, Any] = {"model": model, "trainer_state": {}}
    assert ckpt.load(state, str(root), strict=False) == 12
    assert_all_bit_identical(model.state_dict(), model_of(trainer).state_dict())
    assert state["trainer_state"]["global_step"] == 12
    assert state["trainer_state"]["log_history"] == trainer.state.log_history[:-1]


def test_an_s3_root_following_the_trainers_save_steps(
    tmp_path: Path, moto_s3: S3Server, reference: dict[str, Trainer]
) -> None:
    """``every_steps=None``: the callback saves when the Trainer does (``on_save``)."""
    root = moto_s3.url()

    def callback() -> CkptCallback:
        return CkptCallback(moto_s3.backend(root))

    train(tmp_path, callback=callback(), stop_at=9, save_strategy="steps", save_steps=4)
    resumed_callback = callback()
    resumed = train(
        tmp_path, callback=resumed_callback, resume=True, save_strategy="steps", save_steps=4
    )

    assert resumed_callback.resumed_step == 8
    assert_same_run(resumed, reference["bert"])
    assert scan_steps(moto_s3.backend(root)).committed == (4, 8, 12)


def test_a_start_with_nothing_to_resume_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path / "ckpt")
    callback = CkptCallback(root, every_steps=6)
    with caplog.at_level(logging.INFO, logger="ckpt"):
        trainer = train(tmp_path, callback=callback, resume=True, num_train_epochs=1)
    assert callback.resumed_step is None
    assert trainer.state.global_step == 6
    assert any("starting from scratch" in r.getMessage() for r in caplog.records)


def test_training_from_scratch_over_existing_checkpoints_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path / "ckpt")
    train(tmp_path, callback=CkptCallback(root, every_steps=3), stop_at=3)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        train(tmp_path, callback=CkptCallback(root, every_steps=4), stop_at=1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("resume_from_checkpoint=callback.resume_checkpoint" in m for m in warned)


@pytest.mark.parametrize("last", [False, True], ids=["at-a-later-save", "at-train-end"])
def test_a_failed_background_save_stops_training(tmp_path: Path, last: bool) -> None:
    """The manifest commit of the first save fails in the background: the error is raised
    at a later save (the next one, or the one after when the next one began before the
    failure), or by on_train_end when no save follows."""
    faulty = FaultyBackend(LocalBackend(tmp_path / "ckpt"), fail_put_at=1)
    callback = CkptCallback(faulty, every_steps=6 if last else 2)
    with pytest.raises(ckpt.CheckpointError, match="injected fault"):
        train(tmp_path, callback=callback, num_train_epochs=1)
    assert faulty.failures
    assert 2 not in scan_steps(faulty.inner).committed


def test_importing_ckpt_does_not_import_transformers() -> None:
    script = (
        "import sys, ckpt, ckpt.integrations\n"
        "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_without_transformers_the_integration_says_what_to_install() -> None:
    script = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "try:\n"
        "    import ckpt.integrations.transformers\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "pip install transformers" in run.stdout


def _data_parallel_runs(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """On each gloo rank: an uninterrupted run, a run stopped after step 4, its resume."""
    import hashlib
    import os

    os.environ["LOCAL_RANK"] = str(rank)  # as torchrun sets it; accelerate reads it

    def digest(trainer: Trainer) -> str:
        tensors = model_of(trainer).state_dict().values()
        return hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()

    base = Path(tmp)
    reference = train(base / "reference")
    root = str(base / "ckpt")
    stopped = train(base / "run", callback=CkptCallback(root, every_steps=2), stop_at=4)
    callback = CkptCallback(root, every_steps=2)
    resumed = train(base / "run", callback=callback, resume=True)
    return {
        "world_size": resumed.args.world_size,
        "stopped": stopped.state.global_step,
        "resumed_from": callback.resumed_step,
        "steps": [reference.state.global_step, resumed.state.global_step],
        "weights": [digest(reference), digest(resumed)],
        "losses": [losses(reference), losses(resumed)],
    }


@pytest.mark.slow
def test_data_parallel_on_two_gloo_ranks_resumes_exactly(tmp_path: Path) -> None:
    """DDP through accelerate on CPU (gloo): 3 steps per epoch, stopped mid-epoch."""
    from tests.support.gloo import run_ranks

    results = run_ranks(_data_parallel_runs, 2, str(tmp_path), timeout_s=240.0)

    for result in results:
        assert result["world_size"] == 2
        assert result["stopped"] == 4 and result["resumed_from"] == 4
        assert result["steps"] == [6, 6]
        assert result["weights"][0] == result["weights"][1]
        assert result["losses"][0] == result["losses"][1]
    assert results[0]["weights"] == results[1]["weights"]
    assert read_manifest(LocalBackend(tmp_path / "ckpt"), 6).world_size == 2


def test_a_restore_not_passed_to_train_is_refused(tmp_path: Path) -> None:
    """Resuming the weights without the Trainer's data position would silently train on
    the wrong batches; train() must be given the directory resume_checkpoint returned."""
    root = str(tmp_path / "ckpt")
    train(tmp_path, callback=CkptCallback(root, every_steps=3), stop_at=3)
    callback = CkptCallback(root, every_steps=3)
    trainer = Trainer(
        model=make_model("bert"),
        args=training_arguments(tmp_path),
        train_dataset=Tokens(),
        callbacks=[callback],
    )
    assert callback.resume_checkpoint(trainer) is not None
    with pytest.raises(ckpt.CheckpointError, match="not at the restored step 3"):
        trainer.train()


class SigtermAt(TrainerCallback):
    """Sends this process SIGTERM at the end of ``step``, as a preempting scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_the_current_step_exits_and_resumes_exactly(
    tmp_path: Path, reference: dict[str, Trainer]
) -> None:
    root = str(tmp_path / "ckpt")
    callback = CkptCallback(root, every_steps=4)
    previous = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(
        model=make_model("bert"),
        args=training_arguments(tmp_path),
        train_dataset=Tokens(),
        callbacks=[callback, SigtermAt(5)],
    )
    with pytest.raises(SystemExit) as exited:
        trainer.train()
    assert exited.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous
    assert scan_steps(LocalBackend(root)).committed == (4, 5)

    callback = CkptCallback(root, every_steps=4)
    resumed = train(tmp_path, callback=callback, resume=True)
    assert callback.resumed_step == 5
    assert_same_run(resumed, reference["bert"])


def test_the_sigterm_grace_reaches_the_manager(tmp_path: Path) -> None:
    """The watchdog's grace is the callback's (None: no watchdog)."""
    for grace in (5.0, None):
        callback = CkptCallback(str(tmp_path / "ckpt"), sigterm_grace_seconds=grace)
        try:
            assert callback._get_manager().sigterm_grace_seconds == grace
        finally:
            callback.close()


class WhileHeld(TrainerCallback):
    """At the end of ``step``, records whether the save of an earlier step is still held in
    the background (its writes wait on the gate), then lets it finish."""

    def __init__(self, faulty: FaultyBackend, step: int) -> None:
        self.faulty, self.step = faulty, step
        self.seen: tuple[bool, tuple[int, ...]] | None = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.global_step == self.step:
            held = self.faulty.held.wait(30)
            self.seen = (held, scan_steps(self.faulty.inner).committed)
            self.faulty.release()


def test_training_goes_on_while_a_save_is_written(tmp_path: Path) -> None:
    """The save of step 2 is held in the background; steps 3 and 4 train meanwhile."""
    import threading

    with FaultyBackend(LocalBackend(tmp_path / "ckpt"), gate=threading.Event()) as faulty:
        probe = WhileHeld(faulty, 4)
        trainer = Trainer(
            model=make_model("bert"),
            args=training_arguments(tmp_path, max_steps=5),
            train_dataset=Tokens(),
            callbacks=[CkptCallback(faulty, every_steps=2), probe],
        )
        trainer.train()
    assert probe.seen == (True, ())
    assert scan_steps(faulty.inner).committed == (2, 4)


def test_a_gpt2_with_tied_weights_resumes_tied_and_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The weights handed to the Trainer hold every name of a tied pair, so it reports no
    missing key, and the resumed model keeps the tie."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    class Text(Tokens):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def run(tmp: Path, *callbacks: TrainerCallback, resume: CkptCallback | None = None) -> Trainer:
        torch.manual_seed(1)
        config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
        config.bos_token_id = config.eos_token_id = 0
        trainer = Trainer(
            model=GPT2LMHeadModel(config),
            args=training_arguments(tmp, max_steps=6),
            train_dataset=Text(),
            callbacks=list(callbacks),
        )
        trainer.train(resume_from_checkpoint=resume.resume_checkpoint(trainer) if resume else None)
        return trainer

    reference = run(tmp_path / "reference")
    root = str(tmp_path / "ckpt")
    run(tmp_path, CkptCallback(root, every_steps=3), StopAt(3))
    callback = CkptCallback(root, every_steps=3)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            resumed = run(tmp_path, callback, resume=callback)
    finally:
        hf_logging.disable_propagation()

    assert callback.resumed_step == 3
    model = model_of(resumed)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    assert resumed.state.global_step == 6
    assert_all_bit_identical(model.state_dict(), model_of(reference).state_dict())

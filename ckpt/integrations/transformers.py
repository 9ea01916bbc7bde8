"""Hugging Face ``transformers.Trainer`` checkpoints through ckpt: async, sharded, any storage.

``CkptCallback`` saves the model, the optimizer, the learning-rate scheduler, the
``TrainerState`` (as JSON) and every RNG state as ckpt checkpoints, one per step, and
resumes a run from the newest committed one::

    callback = CkptCallback("s3://bucket/run1", every_steps=500, keep_last=3)
    trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume_checkpoint(trainer))

How the resume works. The Trainer skips the batches a run has already seen only on its
own ``resume_from_checkpoint`` path, and computes how many before any callback runs; so
``resume_checkpoint`` restores the newest committed step that verifies (model, optimizer
and TrainerState; falling back to older steps as ``CheckpointManager.restore`` does) and
returns a local directory for that argument, holding the restored ``TrainerState`` as
``trainer_state.json`` and the restored weights as ``model.safetensors`` (the Trainer
insists on loading weights from that directory before it wraps the model, so the weights
pass once through local disk and host memory; the directory holds no optimizer, so the
Trainer's own optimizer loading is a no-op, and it is removed once training begins).
The Trainer then fast-forwards the data exactly as for its own checkpoints. The callback
loads the scheduler in ``on_train_begin`` (the Trainer makes the scheduler only then) and
the RNG states where the Trainer would load its own: before the epoch's data order is
drawn when the step closed an epoch, else once the skipped batches are behind.

``resume_checkpoint`` creates the optimizer early with ``trainer.create_optimizer()``,
the Trainer's own method, as when an optimizer is passed to ``Trainer(optimizers=...)``.

Saves are asynchronous: training waits only while the tensors are copied to host
memory. A save that fails in the background raises (ending ``train``) at the first save
that starts after the failure, or at the end of training, where ``on_train_end`` waits
for the save in flight; a failed step is never left looking committed. On SIGTERM the callback
saves the current step, waits for its commit and exits with status 143.

Supported (and tested): one process, and data-parallel runs (DDP through accelerate,
e.g. ``torchrun`` or ``accelerate launch``; the replicated model and optimizer are written
once, the RNG states per rank, and every rank resumes the same step). Not supported:
FSDP and DeepSpeed (they shard the model and own its loading), ``model_init`` (the model
is re-created inside ``train``) and fp16 loss-scaling state (bf16 and fp32 need none).
Untested: datasets without a length (the data is fast-forwarded as the Trainer does). With
``every_steps`` the saved ``TrainerState.stateful_callbacks`` (e.g. early stopping's
patience counter) are those of the Trainer's last own save: a callback sees no other
callbacks. ``transformers`` is imported only by this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpt.integrations.transformers needs the Hugging Face transformers package "
        f"({exc}); install it with `pip install transformers accelerate`"
    ) from exc

import safetensors.torch
import torch
from torch import nn

from ckpt import CheckpointManager, RNGState, SaveOptions
from ckpt._manager import DEFAULT_SIGTERM_GRACE_S
from ckpt.coordination import Coordinator
from ckpt.errors import CheckpointError, CheckpointNotFoundError, StateMismatchError
from storage_backends import StorageBackend

log = logging.getLogger(__name__)

__all__ = ["CkptCallback"]

TRAINER_STATE_FILE = "trainer_state.json"  # the names Trainer.train reads a checkpoint by
WEIGHTS_FILE = "model.safetensors"


class _DeferredRNG:
    """Loads the saved RNG states now and applies them when ``apply`` is called."""

    def __init__(self) -> None:
        self._rng = RNGState()
        self._saved: dict[str, Any] | None = None

    def checkpoint_load_hint(self, stored_shape: Callable[[str], tuple[int, ...] | None]) -> None:
        self._rng.checkpoint_load_hint(stored_shape)

    def state_dict(self) -> dict[str, Any]:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = state

    def apply(self) -> None:
        if self._saved is not None:
            self._rng.load_state_dict(self._saved)
            self._saved = None


class _Held:
    """Takes the saved state of an object that does not exist yet (the LR scheduler)."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state


class CkptCallback(TrainerCallback):
    """Saves a ``transformers.Trainer`` run through ckpt and resumes it exactly.

    Args:
        url: checkpoint root: a local path, ``file://`` or ``s3://`` URL, or a backend.
        every_steps: save every this many optimizer steps (set
            ``TrainingArguments(save_strategy="no")`` to stop the Trainer writing its own
            checkpoints as well). None saves whenever the Trainer saves (``on_save``,
            following ``save_strategy``/``save_steps``), next to its own checkpoint.
        options: layout of the saves (compression, file sizes).
        keep_last: committed checkpoints to keep (the newest is always kept).
        coordinator: None for the embedded coordinator (the job's process group), a
            ``Coordinator``, or a ``redis://`` URL.
        save_on_sigterm: on SIGTERM, save the current step and exit with status 143.
        sigterm_grace_seconds: with ``save_on_sigterm``, the longest the process lives
            after the first SIGTERM before a watchdog ends it with status 143 (see
            ``CheckpointManager``); keep it under the launcher's own grace. None: no
            watchdog.

    A save made at step N lands after the Trainer's logging, evaluation and own saving
    for step N (before the next step begins, or at the end of the epoch or of training),
    so the saved ``log_history`` holds step N's entries.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | StorageBackend,
        *,
        every_steps: int | None = None,
        options: SaveOptions | None = None,
        keep_last: int | None = 3,
        coordinator: Coordinator | str | None = None,
        save_on_sigterm: bool = True,
        sigterm_grace_seconds: float | None = DEFAULT_SIGTERM_GRACE_S,
    ) -> None:
        if every_steps is not None and every_steps < 1:
            raise ValueError("every_steps must be a positive number of steps")
        self.url = url
        self.every_steps = every_steps
        self.options = options
        self.keep_last = keep_last
        self.coordinator = coordinator
        self.save_on_sigterm = save_on_sigterm
        self.sigterm_grace_seconds = sigterm_grace_seconds
        self.resumed_step: int | None = None
        """The step ``resume_checkpoint`` restored, or None."""
        self._manager: CheckpointManager | None = None
        self._due: int | None = None
        self._resume_dir: str | None = None
        self._rng: _DeferredRNG | None = None
        self._scheduler: _Held | None = None
        self._rng_at_epoch_begin = False
        self._groups: list[dict[str, Any]] | None = None

    # -- resume ------------------------------------------------------------------------

    def resume_checkpoint(self, trainer: Trainer) -> str | None:
        """Restore the newest committed step into ``trainer``; pass the result to ``train``.

        Loads the model and the optimizer (created here with ``trainer.create_optimizer``)
        in place; the scheduler and the RNG states follow during ``train``.

        Returns:
            A local directory for ``trainer.train(resume_from_checkpoint=...)``, removed
            once training begins; None (logged) when there is no checkpoint yet.

        Raises:
            CheckpointError: the checkpoints cannot be read or do not fit this trainer.
        """
        if trainer.model_init is not None:
            raise CheckpointError(
                "CkptCallback cannot resume a Trainer built with model_init: train() makes a "
                "new model after the restore; pass the model to Trainer(model=...) instead"
            )
        if trainer.optimizer is None:
            trainer.create_optimizer()
        rng, scheduler = _DeferredRNG(), _Held()
        state: dict[str, Any] = {
            "model": trainer.model,
            "optimizer": trainer.optimizer,
            "lr_scheduler": scheduler,
            "trainer_state": {},
            "rng": rng,
        }
        step = self._get_manager().restore(state)
        if step is None:
            return None  # the manager logged that there is nothing to resume
        saved = state["trainer_state"]
        if not isinstance(saved, Mapping) or saved.get("global_step") != step:
            raise StateMismatchError(
                f"step {step} under {self._get_manager().backend.url} holds no TrainerState "
                "for that step: it was not written by CkptCallback; resume it with ckpt.load"
            )
        directory = tempfile.mkdtemp(prefix=f"ckpt-resume-{step}-")
        with open(os.path.join(directory, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(saved, f)
        _write_weights(trainer.model, os.path.join(directory, WEIGHTS_FILE))
        self._resume_dir, self._rng, self._scheduler = directory, rng, scheduler
        # Making the scheduler in train() sets the learning rates of its first step.
        self._groups = [
            {k: v for k, v in group.items() if k != "params"}
            for group in trainer.optimizer.param_groups
        ]
        self.resumed_step = step
        log.info(
            "resuming from step %d of %s (epoch %.2f)",
            step,
            self._get_manager().backend.url,
            float(saved.get("epoch") or 0.0),
        )
        return directory

    # -- Trainer events ----------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Load the scheduler's saved state; decide where the RNG states are applied."""
        self._get_manager()
        if self._resume_dir is not None:
            shutil.rmtree(self._resume_dir, ignore_errors=True)
            self._resume_dir = None
        if self._rng is not None and state.global_step != self.resumed_step:
            self.close()
            raise CheckpointError(
                f"train() began at step {state.global_step}, not at the restored step "
                f"{self.resumed_step}: pass resume_from_checkpoint="
                "callback.resume_checkpoint(trainer) to train()"
            )
        if self._scheduler is not None:
            scheduler = kwargs.get("lr_scheduler")
            if self._scheduler.saved and scheduler is not None:
                scheduler.load_state_dict(self._scheduler.saved)
            optimizer = kwargs.get("optimizer")
            if optimizer is not None and self._groups is not None:
                for group, saved in zip(optimizer.param_groups, self._groups):
                    group.update(saved)
            self._scheduler = self._groups = None
        if self._rng is not None:
            per_epoch = _update_steps_per_epoch(args, state, kwargs.get("train_dataloader"))
            # The Trainer applies its own RNG states before drawing an epoch's data order
            # when it resumes at an epoch boundary (or skips no data), else after skipping.
            self._rng_at_epoch_begin = args.ignore_data_skip or state.global_step % per_epoch == 0
        elif state.global_step == 0 and state.is_world_process_zero:
            self._warn_if_checkpoints_exist()

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Apply the restored RNG states when the run resumed at an epoch boundary."""
        if self._rng is not None and self._rng_at_epoch_begin:
            self._rng.apply()
            self._rng = None

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Apply the restored RNG states (mid-epoch resume); write a save that is due."""
        if self._rng is not None:
            self._rng.apply()
            self._rng = None
        self._flush(state, kwargs)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Mark a save due every ``every_steps`` (written once the step's logs are in)."""
        if self.every_steps is not None and state.global_step % self.every_steps == 0:
            self._due = state.global_step

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Save with the Trainer when ``every_steps`` is None."""
        if self.every_steps is None:
            self._due = state.global_step
            self._flush(state, kwargs)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write a save that is due before the next epoch draws its data order."""
        self._flush(state, kwargs)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Write a save that is due and wait for it; raise a background save's error."""
        if self._manager is None:
            return
        try:
            self._flush(state, kwargs)
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the save in flight and release the manager (``on_train_end`` does this;
        call it when ``train`` ended by an exception that you handle)."""
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.close()

    # -- internals ---------------------------------------------------------------------

    def _get_manager(self) -> CheckpointManager:
        if self._manager is None:
            self._manager = CheckpointManager(
                self.url,
                manual=True,
                keep_last=self.keep_last,
                coordinator=self.coordinator,
                save_on_sigterm=self.save_on_sigterm,
                sigterm_grace_seconds=self.sigterm_grace_seconds,
                save_options=self.options,
            )
        return self._manager

    def _flush(self, state: TrainerState, kwargs: Mapping[str, Any]) -> None:
        """Save the step that is due; else let the manager act on a SIGTERM."""
        manager = self._get_manager()
        step = state.global_step
        try:
            if self._due is not None and self._due == step:
                self._due = None
                manager.save(step, self._state(state, kwargs))
            elif manager.preempted or manager.coordinator.world_size > 1:
                # With several ranks every rank calls, so that all agree on a SIGTERM.
                manager.maybe_save(step, self._state(state, kwargs))
        except CheckpointError:
            # The error ends train(): no on_train_end will release the manager.
            self._manager = None
            with contextlib.suppress(CheckpointError):
                manager.close()
            raise

    def _state(self, state: TrainerState, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise CheckpointError(
                "CkptCallback got no model or optimizer from the Trainer: attach it with "
                "Trainer(callbacks=[...]) or trainer.add_callback"
            )
        saved: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "trainer_state": json.loads(json.dumps(dataclasses.asdict(state))),
            "rng": RNGState(),
        }
        scheduler = kwargs.get("lr_scheduler")
        saved["lr_scheduler"] = scheduler if scheduler is not None else _Held()
        return saved

    def _warn_if_checkpoints_exist(self) -> None:
        from recovery import committed_steps

        try:
            steps = committed_steps(self._get_manager().backend)
        except CheckpointNotFoundError:  # the root does not exist yet: nothing to warn about
            return
        if steps:
            log.warning(
                "train() starts from scratch although %s holds committed step(s) up to %d: "
                "to continue from them, call trainer.train(resume_from_checkpoint="
                "callback.resume_checkpoint(trainer))",
                self._get_manager().backend.url,
                max(steps),
            )


def _write_weights(model: nn.Module, path: str) -> None:
    """Every entry of ``model.state_dict()`` as one safetensors file. Tied weights are
    written under each name (the Trainer reports a name missing from the file)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(storage)
        tensors[name] = tensor
    safetensors.torch.save_file(tensors, path)


def _update_steps_per_epoch(args: TrainingArguments, state: TrainerState, loader: Any) -> int:
    """Optimizer steps per epoch, as the Trainer counts them to skip seen batches."""
    try:
        batches = len(loader)
    except TypeError:  # no length: the Trainer runs max_steps as one epoch
        return max(state.max_steps, 1)
    accumulation = args.gradient_accumulation_steps
    return max(math.ceil(batches / accumulation), 1)

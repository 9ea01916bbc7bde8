"""CkptCheckpointIO with the real Lightning Trainer on the CPU.

One fit per module (``fitted``) writes checkpoints through ModelCheckpoint; the tests then
read them back with ckpt, resume from them with new Trainers and compare against the
uninterrupted run. The model draws its batch from the global step, so a resumed run sees
the same data as the uninterrupted one wherever the data loader restarts.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset

import ckpt
from ckpt.format import read_manifest, scan_steps
from ckpt.integrations.lightning import CkptCheckpointIO
from recovery import validate_files, verify_checkpoint
from storage_backends import LocalBackend, StorageBackend, open_backend
from tests.support.faulty import FaultyBackend
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3  # noqa: F401

LIGHTNING_VERSION = version("lightning")
MAX_STEPS = 6
EVERY = 2


class TinyModule(pl.LightningModule):
    """A linear layer trained with Adam and a step LR schedule on batches drawn from the step."""

    def __init__(self, lr: float = 0.05, extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + self.global_step)
        x = torch.randn(8, 4, generator=g)
        y = torch.randn(8, 3, generator=g)
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def new_model(**hparams: Any) -> TinyModule:
    torch.manual_seed(0)
    return TinyModule(**hparams)


def loader() -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=1)  # 3 steps per epoch


def trainer(tmp: Path, plugin: CkptCheckpointIO, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", bool(kwargs.get("callbacks")))
    kwargs.setdefault("max_steps", MAX_STEPS)
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        accelerator="cpu",
        plugins=[plugin],
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        **kwargs,
    )


@dataclass
class Final:
    """The state an uninterrupted run ends with."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]

    @classmethod
    def of(cls, t: pl.Trainer) -> Final:
        return cls(
            copy.deepcopy(t.lightning_module.state_dict()),
            copy.deepcopy(t.optimizers[0].state_dict()),
            copy.deepcopy(t.lr_scheduler_configs[0].scheduler.state_dict()),
        )

    def assert_reached_by(self, t: pl.Trainer) -> None:
        assert t.global_step == MAX_STEPS
        torch.testing.assert_close(t.lightning_module.state_dict(), self.weights, rtol=0, atol=0)
        torch.testing.assert_close(t.optimizers[0].state_dict(), self.optimizer, rtol=0, atol=0)
        assert t.lr_scheduler_configs[0].scheduler.state_dict() == self.scheduler


@dataclass
class Fitted:
    dirpath: Path
    final: Final
    best_k: set[str]
    last: str


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """One uninterrupted fit of MAX_STEPS steps, saving every EVERY steps, keeping the
    newest two (top-k on the step) and ``last.ckpt``."""
    tmp = tmp_path_factory.mktemp("fit")
    dirpath = tmp / "checkpoints"
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=EVERY,
        save_top_k=2,
        monitor="step",
        mode="max",
        save_last=True,
    )
    t = trainer(tmp, CkptCheckpointIO(), callbacks=[checkpoints])
    t.fit(new_model(), loader())
    return Fitted(dirpath, Final.of(t), set(checkpoints.best_k_models), checkpoints.last_model_path)


def test_each_checkpoint_is_a_ckpt_root_that_verifies(fitted: Fitted) -> None:
    names = sorted(p.name for p in fitted.dirpath.iterdir())
    assert names == ["epoch=1-step=4.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    assert fitted.best_k == {str(fitted.dirpath / n) for n in names[:2]}
    for name, step in [("epoch=1-step=4.ckpt", 4), ("epoch=1-step=6.ckpt", 6), ("last.ckpt", 6)]:
        backend = LocalBackend(fitted.dirpath / name)
        assert scan_steps(backend).committed == (step,)
        manifest = read_manifest(backend, step)
        validate_files(backend, manifest)
        verify_checkpoint(backend, manifest)  # reads every byte and checks its checksum
        saved = ckpt.read(fitted.dirpath / name)
        assert saved["global_step"] == step
        assert set(saved) >= {"state_dict", "optimizer_states", "lr_schedulers", "loops"}


def test_load_checkpoint_returns_the_dict_lightning_saved(fitted: Fitted) -> None:
    loaded = CkptCheckpointIO().load_checkpoint(fitted.dirpath / "last.ckpt")
    assert loaded["global_step"] == MAX_STEPS
    assert loaded["hyper_parameters"] == {"lr": 0.05, "extra": None}
    assert loaded["pytorch-lightning_version"] == LIGHTNING_VERSION
    torch.testing.assert_close(loaded["state_dict"], fitted.final.weights, rtol=0, atol=0)
    torch.testing.assert_close(
        loaded["optimizer_states"][0], fitted.final.optimizer, rtol=0, atol=0
    )
    assert loaded["lr_schedulers"][0] == fitted.final.scheduler
    moved = CkptCheckpointIO().load_checkpoint(
        fitted.dirpath / "last.ckpt", map_location={"cpu": "meta"}
    )
    assert moved["state_dict"]["layer.weight"].device.type == "meta"


def test_resume_from_a_checkpoint_reaches_the_uninterrupted_state(
    fitted: Fitted, tmp_path: Path
) -> None:
    t = trainer(tmp_path, CkptCheckpointIO())
    t.fit(new_model(), loader(), ckpt_path=fitted.dirpath / "epoch=1-step=4.ckpt")
    fitted.final.assert_reached_by(t)


def test_resume_last_finds_the_last_checkpoint(fitted: Fitted, tmp_path: Path) -> None:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=fitted.dirpath, save_top_k=0)
    t = trainer(tmp_path, CkptCheckpointIO(), callbacks=[checkpoints], max_steps=MAX_STEPS)
    t.fit(new_model(), loader(), ckpt_path="last")
    assert t.ckpt_path == fitted.last
    fitted.final.assert_reached_by(t)


def lightning_dict(step: int, **extra: Any) -> dict[str, Any]:
    """The shape of a Lightning checkpoint, small, for tests that need no Trainer."""
    return {
        "epoch": 0,
        "global_step": step,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": {"w": torch.full((3,), float(step))},
        "loops": {},
        **extra,
    }


def test_remove_deletes_that_checkpoint_and_nothing_else(tmp_path: Path) -> None:
    plugin = CkptCheckpointIO(async_save=False)
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    plugin.save_checkpoint(lightning_dict(1), a)
    plugin.save_checkpoint(lightning_dict(2), b)
    (tmp_path / "a.ckpt.notes").write_text("beside the root")
    plugin.remove_checkpoint(a)
    assert not a.exists()
    assert (tmp_path / "a.ckpt.notes").read_text() == "beside the root"
    torch.testing.assert_close(plugin.load_checkpoint(b)["state_dict"]["w"], torch.full((3,), 2.0))
    # A file ckpt did not write inside a root stays, and so does the directory holding it.
    plugin.save_checkpoint(lightning_dict(3), a)
    (a / "README").write_text("mine")
    plugin.remove_checkpoint(a)
    assert sorted(p.name for p in a.iterdir()) == ["README"]
    (tmp_path / "link.ckpt").symlink_to(b)  # ModelCheckpoint(save_last="link")
    assert plugin.load_checkpoint(tmp_path / "link.ckpt")["global_step"] == 2
    plugin.remove_checkpoint(tmp_path / "link.ckpt")
    assert not (tmp_path / "link.ckpt").exists()
    assert plugin.load_checkpoint(b)["global_step"] == 2
    plugin.remove_checkpoint(tmp_path / "never-written.ckpt")  # nothing there: no error
    assert not (tmp_path / "never-written.ckpt").exists()


def test_saving_a_path_again_replaces_its_checkpoint(tmp_path: Path) -> None:
    plugin = CkptCheckpointIO()
    path = tmp_path / "last.ckpt"
    for step in (4, 2, 2):  # a resumed run may write an older step, or the same one again
        plugin.save_checkpoint(lightning_dict(step, note=f"saved at {step}"), path)
    plugin.teardown()
    assert scan_steps(LocalBackend(path)).committed == (2,)
    assert plugin.load_checkpoint(path)["global_step"] == 2
    # Until the replaced step is deleted, the one committed last is the path's checkpoint.
    other = tmp_path / "other.ckpt"
    ckpt.save(lightning_dict(4), other, step=4)
    ckpt.save(lightning_dict(3), other, step=3)
    assert CkptCheckpointIO().load_checkpoint(other)["global_step"] == 3


def failing_roots(fail_write_at: int = 1) -> Any:
    """An ``open_root`` whose roots fail their ``fail_write_at``-th write."""

    def open_root(url: str) -> StorageBackend:
        return FaultyBackend(LocalBackend(url), fail_write_at=fail_write_at)

    return open_root


def test_a_background_failure_surfaces_at_the_next_save_and_at_teardown(tmp_path: Path) -> None:
    plugin = CkptCheckpointIO(open_root=failing_roots())
    plugin.save_checkpoint(lightning_dict(1), tmp_path / "one.ckpt")  # returns; fails behind
    with pytest.raises(ckpt.StorageError, match="injected"):
        plugin.save_checkpoint(lightning_dict(2), tmp_path / "two.ckpt")  # raised, not started
    assert not (tmp_path / "two.ckpt").exists()
    plugin.save_checkpoint(lightning_dict(2), tmp_path / "two.ckpt")  # fails behind too
    with pytest.raises(ckpt.StorageError, match="injected"):
        plugin.teardown()
    plugin.teardown()  # each failure is raised once
    for name in ("one.ckpt", "two.ckpt"):
        assert scan_steps(LocalBackend(tmp_path / name)).committed == ()


def test_a_failing_background_save_fails_the_fit(tmp_path: Path) -> None:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=EVERY)
    t = trainer(tmp_path, CkptCheckpointIO(open_root=failing_roots()), callbacks=[checkpoints])
    with pytest.raises(ckpt.StorageError, match="injected"):
        t.fit(new_model(), loader())


class Opaque:
    def __repr__(self) -> str:
        return "Opaque()"


def test_hyper_parameters_ckpt_cannot_store_are_refused_or_stored_as_text(tmp_path: Path) -> None:
    state = lightning_dict(1, hyper_parameters={"lr": 0.1, "loss": Opaque()})
    with pytest.raises(
        ckpt.InvalidStateError, match=r"hyper_parameters\['loss'\].*ignore=\['loss'\]"
    ):
        CkptCheckpointIO().save_checkpoint(state, tmp_path / "a.ckpt")
    plugin = CkptCheckpointIO(hparams="repr")
    plugin.save_checkpoint({**state, "hparams_type": dict}, tmp_path / "b.ckpt")
    loaded = plugin.load_checkpoint(tmp_path / "b.ckpt")
    assert loaded["hyper_parameters"] == {"lr": 0.1, "loss": "Opaque()"}
    assert loaded["hparams_type"] == "builtins.dict"
    plugin.teardown()


def test_loading_what_is_no_ckpt_root_says_so(tmp_path: Path) -> None:
    (tmp_path / "old.ckpt").write_bytes(b"torch.save bytes")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="is a file"):
        CkptCheckpointIO().load_checkpoint(tmp_path / "old.ckpt")
    with pytest.raises(ckpt.CheckpointNotFoundError, match="does not exist"):
        CkptCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")
    assert not (tmp_path / "missing.ckpt").exists()


def test_s3_paths_save_resume_and_remove(
    moto_s3: S3Server,  # noqa: F811
    fitted: Fitted,
    tmp_path: Path,
) -> None:
    config = moto_s3.config()
    url = moto_s3.url() + "/epoch=1-step=4.ckpt"
    plugin = CkptCheckpointIO(s3_config=config)
    first = trainer(tmp_path, plugin, max_steps=4)
    first.fit(new_model(), loader())
    first.save_checkpoint(url)
    plugin.teardown()
    resumed = trainer(tmp_path, CkptCheckpointIO(s3_config=config))
    resumed.fit(new_model(), loader(), ckpt_path=url)
    fitted.final.assert_reached_by(resumed)
    s3 = open_backend(url, s3_config=config)
    assert s3.list_objects("")
    CkptCheckpointIO(s3_config=config).remove_checkpoint(url)
    assert s3.list_objects("") == []
    s3.close()


def test_lightning_stays_optional() -> None:
    """``import ckpt`` and ``ckpt.integrations`` never import Lightning; without Lightning
    the plugin's module says what to install (one interpreter: starting one costs seconds)."""
    code = (
        "import sys, ckpt, ckpt.integrations\n"
        "ckpt.CheckpointManager, ckpt.read\n"
        "assert 'lightning' not in sys.modules, 'lightning imported'\n"
        "sys.modules['lightning'] = None\n"
        "try:\n    import ckpt.integrations.lightning\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "pip install 'lightning>=2.2'" in out.stdout


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_remove_waits_for_the_save_of_that_path(tmp_path: Path, gate: threading.Event) -> None:
    held: list[FaultyBackend] = []

    def open_root(url: str) -> StorageBackend:
        held.append(FaultyBackend(LocalBackend(url), gate=gate))
        return held[-1]

    plugin = CkptCheckpointIO(open_root=open_root)
    path = tmp_path / "x.ckpt"
    plugin.save_checkpoint(lightning_dict(5), path)
    assert held[0].held.wait(10)  # the write is in flight
    remover = threading.Thread(target=plugin.remove_checkpoint, args=(path,))
    remover.start()
    gate.set()
    remover.join(30)
    assert not remover.is_alive()
    assert not path.exists()
    plugin.teardown()


@pytest.mark.slow
def test_ddp_on_two_processes_saves_once_and_resumes(fitted: Fitted, tmp_path: Path) -> None:
    """DDP over gloo on 2 CPU processes: rank 0 writes each checkpoint, both ranks resume.

    Both ranks draw the same batch, so DDP's averaged gradient is the single-process one and
    the run must match the uninterrupted single-process run bit for bit.
    """
    dirpath = tmp_path / "ddp"
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=dirpath, every_n_train_steps=EVERY, save_top_k=-1
    )
    ddp = {"strategy": "ddp_spawn", "devices": 2}
    first = trainer(tmp_path, CkptCheckpointIO(), callbacks=[checkpoints], **ddp)
    first.fit(new_model(), loader())
    # DistributedSampler gives each rank 2 of the 3 samples: epochs of 2 steps here.
    names = sorted(p.name for p in dirpath.iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=2-step=6.ckpt"]
    saved = CkptCheckpointIO().load_checkpoint(dirpath / "epoch=2-step=6.ckpt")
    torch.testing.assert_close(saved["state_dict"], fitted.final.weights, rtol=0, atol=0)
    torch.testing.assert_close(saved["optimizer_states"][0], fitted.final.optimizer, rtol=0, atol=0)
    # The spawn launcher hands rank 0's final weights to this process through the plugin.
    torch.testing.assert_close(first.lightning_module.state_dict(), fitted.final.weights)

    resumed_dir = tmp_path / "resumed"
    again = pl.callbacks.ModelCheckpoint(dirpath=resumed_dir, every_n_train_steps=EVERY)
    resumed = trainer(tmp_path, CkptCheckpointIO(), callbacks=[again], **ddp)
    resumed.fit(new_model(), loader(), ckpt_path=dirpath / "epoch=1-step=4.ckpt")
    final = CkptCheckpointIO().load_checkpoint(resumed_dir / "epoch=2-step=6.ckpt")
    torch.testing.assert_close(final["state_dict"], fitted.final.weights, rtol=0, atol=0)
    torch.testing.assert_close(final["optimizer_states"][0], fitted.final.optimizer, rtol=0, atol=0)

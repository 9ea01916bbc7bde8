"""A Lightning ``CheckpointIO`` plugin that saves and loads through ckpt.

Use it as any checkpoint plugin::

    import lightning.pytorch as pl
    from ckpt.integrations.lightning import CkptCheckpointIO

    trainer = pl.Trainer(plugins=[CkptCheckpointIO()],
                         callbacks=[pl.callbacks.ModelCheckpoint(every_n_train_steps=100)])
    trainer.fit(model)                        # checkpoints are written in the background
    trainer.fit(model, ckpt_path="last")      # or any path ModelCheckpoint wrote

How Lightning's paths map onto ckpt:

* **Each path Lightning hands over is a ckpt root.** ``dirpath/epoch=0-step=10.ckpt`` becomes
  a directory (or, for ``s3://`` paths, a prefix) holding one committed checkpoint whose step
  is the checkpoint's ``global_step``: ``ckpt ls``, ``ckpt verify`` and ``ckpt.read`` work on
  it as on any root. ModelCheckpoint's bookkeeping (names, version suffixes, ``"last"``,
  top-k) keeps working, because it only asks whether a path exists and when it changed.
* **Saving to a path again replaces what it held**, as with ``torch.save``: the new step is
  committed first, then the root's other steps are deleted (once a later call of this plugin
  has waited for the new one to commit). Saving the same step to the same path
  again (``last.ckpt`` after resuming from it) un-commits the old copy first, so that path
  briefly holds no checkpoint, as a file being overwritten briefly holds half of one.
* **remove_checkpoint(path)** waits for a save to that path still in flight, then deletes the
  step prefixes and index of that root and the root directory once empty; files ckpt did not
  write are left where they are (logged), and nothing outside the root is touched. A symbolic
  link (``ModelCheckpoint(save_last="link")``) is removed itself, never what it points to.
* **load_checkpoint(path)** reads the root's checkpoint without a template (``ckpt.read``):
  its newest committed step that verifies or, while a replaced one is still there, the step
  committed last, and returns the dict Lightning saved, tensors on the CPU unless
  ``map_location`` says otherwise.

What a Lightning checkpoint may hold: tensors, numbers, strings, bytes, ``None``, dtypes,
numpy arrays and lists, tuples and dicts of them (ckpt stores no pickle). Everything Lightning
itself puts there qualifies. Hyper-parameters are user values and often do not: by default a
value ckpt cannot store is refused with an ``InvalidStateError`` naming it and the fix;
``hparams="repr"`` stores the text of its ``repr()`` instead (logged once per key), which
``LightningModule.load_from_checkpoint`` then receives as a string. Resuming a fit never reads
hyper-parameters. The hyper-parameter type of OmegaConf containers (a class) is stored as its
qualified name, which Lightning reads back as an ``AttributeDict``.

Asynchronous saves (the default) hold training only while tensors are copied to host memory.
A background save that fails raises its error at the next ``save_checkpoint`` (which first
waits for the previous save: ckpt stages one at a time anyway), or at ``teardown``, which
waits for every save in flight; ``remove_checkpoint`` and ``load_checkpoint`` wait for a
save to their own path and raise its failure. No failure is dropped.

Strategies: with a single device and with DDP, Lightning calls ``save_checkpoint`` and
``remove_checkpoint`` on global rank 0 only, so each checkpoint is written by that one
process with ckpt's single-process coordinator; every rank loads. FSDP's
``state_dict_type="sharded"`` writes through torch.distributed.checkpoint and never calls a
``CheckpointIO``; FSDP with ``state_dict_type="full"`` refuses directory paths, so ckpt
roots cannot be used there; use ``CheckpointManager`` inside the ``LightningModule`` for
sharded saves instead.

Limits: ``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` and never
asks a ``CheckpointIO``; load weights with
``model.load_state_dict(ckpt.read(path, keys=["state_dict"])["state_dict"])``, or use
``trainer.validate/test/predict(ckpt_path=path)``, which do. With an ``s3://`` dirpath,
ModelCheckpoint needs s3fs for its own bookkeeping, and ``ckpt_path="last"`` asks fsspec
for the modification time of a prefix, which S3 does not keep: pass the path itself there.
Do not wrap this plugin in Lightning's ``AsyncCheckpointIO``: it is asynchronous already.

Lightning is imported only when this module is; ``import ckpt`` and ``import
ckpt.integrations`` never import it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import torch

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "ckpt.integrations.lightning needs Lightning 2.2 or newer: pip install 'lightning>=2.2'"
    ) from exc

import ckpt
from ckpt.coordination import LocalCoordinator
from ckpt.engine import PendingSave, SaveOptions, flatten
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidStateError,
    StorageError,
    storage_errors,
)
from ckpt.format import INDEX_DIR, parse_step_prefix, read_manifest, scan_steps, step_prefix
from ckpt.retention import retire_step
from storage_backends import S3Config, StorageBackend, StorageBackendError, open_backend

__all__ = ["CkptCheckpointIO"]

log = logging.getLogger(__name__)

# The hyper-parameter entries of a Lightning checkpoint (LightningModule's and
# LightningDataModule's CHECKPOINT_HYPER_PARAMS_KEY), and where the type of an OmegaConf
# container goes (CHECKPOINT_HYPER_PARAMS_TYPE).
_HPARAMS_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")
_HPARAMS_TYPE_KEYS = ("hparams_type", "datamodule_hparams_type")

MapLocation = (
    str | torch.device | Mapping[str, str] | Callable[[torch.Tensor, str], torch.Tensor] | None
)


@dataclass(frozen=True)
class _InFlight:
    """A background save of ``step`` into the root at ``url``."""

    url: str
    step: int
    pending: PendingSave


class CkptCheckpointIO(CheckpointIO):
    """Save Lightning checkpoints as ckpt checkpoints (async, checksummed, local or S3).

    Every path Lightning passes is a ckpt root holding that one checkpoint (see the module
    docstring for the mapping, what may be stored and the strategies supported).

    Args:
        options: the layout of every save, e.g. ``SaveOptions(compression=Compression())``.
        async_save: write in the background and return once tensors are copied to host
            memory (the default); False returns only once each checkpoint is committed.
        hparams: what to do with a hyper-parameter value ckpt cannot store without pickle:
            ``"refuse"`` raises ``InvalidStateError`` naming it; ``"repr"`` stores its
            ``repr()`` text instead and logs a warning.
        s3_config: settings for ``s3://`` paths (default: boto3's environment).
        open_root: opens the storage of each root, given its path or URL, in place of
            ``open_backend(url, s3_config=s3_config)``: e.g. a tiered backend (local disk
            first, then S3) per root. The plugin closes what it returns.
    """

    def __init__(
        self,
        *,
        options: SaveOptions | None = None,
        async_save: bool = True,
        hparams: Literal["refuse", "repr"] = "refuse",
        s3_config: S3Config | None = None,
        open_root: Callable[[str], StorageBackend] | None = None,
    ) -> None:
        if hparams not in ("refuse", "repr"):
            raise ValueError(f"hparams must be 'refuse' or 'repr', got {hparams!r}")
        self.options = options
        self.async_save = async_save
        self.hparams = hparams
        self.s3_config = s3_config
        self.open_root = open_root
        self._in_flight: list[_InFlight] = []
        self._backends: dict[str, StorageBackend] = {}
        self._warned: set[str] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Save ``checkpoint`` as the one checkpoint of the root ``path``.

        Args:
            checkpoint: the dict Lightning built; its ``global_step`` is the ckpt step
                (without one, as from Fabric, the step after the root's newest).
            path: the root: a local path or an ``s3://`` URL.
            storage_options: a ``SaveOptions`` for this save only, or None.

        Raises:
            InvalidStateError: a value cannot be stored (named, with the fix).
            CheckpointError: an earlier background save failed, or this one did (when
                saving synchronously).
            TypeError: ``storage_options`` is not a ``SaveOptions``.
        """
        if storage_options is not None and not isinstance(storage_options, SaveOptions):
            raise TypeError(
                "CkptCheckpointIO.save_checkpoint takes a ckpt SaveOptions as storage_options, "
                f"got {type(storage_options).__name__}"
            )
        url = self._url(path)
        # The engine stages one save at a time, so the previous one is as good as finished:
        # waiting for it costs nothing and raises its failure here, at the next save.
        self._settle(lambda save: True)
        backend = self._backend(url)
        state = self._storable(checkpoint)
        step = self._step_of(checkpoint, backend)
        with storage_errors(f"listing {url}"):
            committed = scan_steps(backend).committed
        if step in committed:
            log.info("%s: replacing its step %d", url, step)
            retire_step(backend, step)
        options = storage_options or self.options
        metadata = {"written_by": __name__}
        if self.async_save:
            pending = ckpt.async_save(
                state,
                backend,
                step=step,
                user_metadata=metadata,
                coordinator=LocalCoordinator(),
                options=options,
            )
            self._in_flight.append(_InFlight(url, step, pending))
        else:
            ckpt.save(
                state,
                backend,
                step=step,
                user_metadata=metadata,
                coordinator=LocalCoordinator(),
                options=options,
            )
            self._keep_only(url, step)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: MapLocation = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path`` (its newest committed step that verifies).

        Args:
            path: a root this plugin wrote (local path or ``s3://`` URL).
            map_location: None keeps tensors on the CPU; a device (or its name) moves every
                tensor there; a dict maps device names (``"cuda:1"``) to others; a callable
                gets each tensor and its device name and returns the tensor to use.
            weights_only: accepted for Lightning's interface; ckpt never unpickles, so every
                load is as safe as ``weights_only=True``.

        Raises:
            CheckpointNotFoundError: ``path`` holds no committed checkpoint.
            CorruptCheckpointError: every committed step there fails verification.
        """
        url = self._url(path)
        self._settle(lambda save: save.url == url or save.pending.done())
        local = _local_path(url)
        if local is not None and not local.is_dir():
            found = "is a file" if local.exists() else "does not exist"
            hint = " (a torch.save file loads with TorchCheckpointIO)" if local.exists() else ""
            raise CheckpointNotFoundError(
                f"{url} {found}: no checkpoint CkptCheckpointIO wrote (each is a directory)"
                f"{hint}; pass a path that ModelCheckpoint wrote with this plugin"
            )
        backend = self._backends.get(url) or self._open(url, create=False)
        newest = _newest_written(backend)
        try:
            loaded = ckpt.read(backend, step=newest)
        except CorruptCheckpointError:
            if newest is None:
                raise
            log.warning("%s: step %d fails verification; reading an older one", url, newest)
            loaded = ckpt.read(backend)
        return {key: _mapped(value, map_location) for key, value in loaded.items()}

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete the checkpoint root ``path`` (after its save in flight, if any, ends).

        Only what ckpt writes in a root is deleted: its step prefixes and its index; any
        other file is left (and logged), and so is the directory that holds it.

        Raises:
            CheckpointError: a background save failed (this one's or an earlier one's), or
                the storage refused the deletion.
        """
        url = self._url(path)
        self._settle(lambda save: save.url == url or save.pending.done())
        local = _local_path(url)
        if local is not None and local.is_symlink():
            local.unlink()  # ModelCheckpoint(save_last="link"): the link, never its target
            return
        if local is not None and not local.is_dir():
            if local.exists():
                log.warning("not removing %s: a file, not a checkpoint this plugin wrote", url)
            return
        backend = self._backends.pop(url, None) or self._open(url, create=False)
        try:
            _delete_root(backend, local)
        finally:
            backend.close()

    def teardown(self) -> None:
        """Wait for every save in flight; raise the first failure once all have ended."""
        try:
            self._settle(lambda save: True)
        finally:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()

    def _url(self, path: str | os.PathLike[str]) -> str:
        return os.fspath(path)

    def _open(self, url: str, *, create: bool = True) -> StorageBackend:
        if self.open_root is not None:
            return self.open_root(url)
        try:
            return open_backend(url, s3_config=self.s3_config, create=create)
        except StorageBackendError as exc:
            raise StorageError(
                f"cannot open the checkpoint root {url}: {exc}", retryable=exc.retryable
            ) from exc

    def _backend(self, url: str) -> StorageBackend:
        if url not in self._backends:
            self._backends[url] = self._open(url)
        return self._backends[url]

    def _settle(self, wait_for: Callable[[_InFlight], bool]) -> None:
        """Wait for the saves ``wait_for`` picks, tidy the roots of those that committed,
        and raise the first failure among them once all have ended."""
        chosen: list[_InFlight] = []
        others: list[_InFlight] = []
        for save in self._in_flight:  # one pass: a save may finish while this runs
            (chosen if wait_for(save) else others).append(save)
        self._in_flight = others
        failure: BaseException | None = None
        for save in chosen:
            try:
                save.pending.result()
                self._keep_only(save.url, save.step)
            except BaseException as exc:  # every save is waited for before raising
                if failure is None:
                    failure = exc
        if failure is not None:
            raise failure

    def _keep_only(self, url: str, step: int) -> None:
        """Delete every step of the root ``url`` but ``step``, which has just committed."""
        backend = self._backend(url)
        with storage_errors(f"listing {url}"):
            listing = scan_steps(backend)
        for old in (*listing.committed, *listing.uncommitted):
            if old == step:
                continue
            if old in listing.committed:
                retire_step(backend, old)
            with storage_errors(f"deleting step {old} under {url}"):
                backend.delete_prefix(step_prefix(old))

    def _step_of(self, checkpoint: Mapping[str, Any], backend: StorageBackend) -> int:
        step = checkpoint.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
        with storage_errors(f"listing {backend.url}"):
            committed = scan_steps(backend).committed
        return committed[-1] + 1 if committed else 0

    def _storable(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """``checkpoint`` with its hyper-parameters made storable (or refused)."""
        state = dict(checkpoint)
        for key in _HPARAMS_TYPE_KEYS:
            if isinstance(state.get(key), type):
                kind = state[key]
                state[key] = f"{kind.__module__}.{kind.__qualname__}"
        for key in _HPARAMS_KEYS:
            if isinstance(state.get(key), Mapping):
                state[key] = {name: self._hparam(key, name, v) for name, v in state[key].items()}
        return state

    def _hparam(self, key: str, name: Any, value: Any) -> Any:
        try:
            flatten({"value": value})
        except InvalidStateError as exc:
            where = f"{key}[{name!r}]"
            if self.hparams == "refuse":
                raise InvalidStateError(
                    f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, "
                    "which ckpt cannot store without pickle: leave it out with "
                    f"save_hyperparameters(ignore=[{name!r}]), make it a number, string, "
                    "list or dict, or create CkptCheckpointIO(hparams='repr') to store its "
                    "repr() text"
                ) from exc
            if where not in self._warned:
                self._warned.add(where)
                log.warning("%s cannot be stored without pickle; storing its repr()", where)
            return repr(value)
        return value


def _mapped(tree: Any, map_location: MapLocation) -> Any:
    """``tree`` with every tensor placed as ``map_location`` says (torch.load's meanings)."""
    if map_location is None:
        return tree

    def place(tensor: torch.Tensor) -> torch.Tensor:
        where = str(tensor.device)
        if callable(map_location):
            return map_location(tensor, where)
        if isinstance(map_location, Mapping):
            return tensor.to(map_location.get(where, where))
        return tensor.to(map_location)

    return _walk(tree, place)


def _walk(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _walk(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_walk(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_walk(v, fn) for v in tree)
    return tree


def _newest_written(backend: StorageBackend) -> int | None:
    """The step committed last under a root that holds several (a save replaced the path's
    checkpoint and the older one is not deleted yet), whatever its number: after resuming
    from an earlier checkpoint, ``last.ckpt`` gets a smaller step than the one it held.
    None, for ``ckpt.read``'s newest-that-verifies, when there is one step or the
    manifests cannot tell."""
    with storage_errors(f"listing {backend.url}"):
        committed = scan_steps(backend).committed
    if len(committed) < 2:
        return None
    try:
        written = {
            step: read_manifest(backend, step, pieces=False).created_unix for step in committed
        }
    except CheckpointError as exc:
        log.warning("%s holds steps %s; reading the newest: %s", backend.url, committed, exc)
        return None
    return max(committed, key=lambda step: (written[step], step))


def _local_path(url: str) -> Path | None:
    """The directory of a local root (a plain path or ``file://`` URL); None for a remote one."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(url)
    return None


def _delete_root(backend: StorageBackend, local: Path | None) -> None:
    """Delete what ckpt wrote under ``backend``'s root: committed steps manifest first, then
    every step prefix and the index; then the local root directory itself once empty."""
    url = backend.url
    with storage_errors(f"listing {url}"):
        listing = scan_steps(backend)
        prefixes = backend.list_prefixes("")
    for step in listing.committed:
        retire_step(backend, step)
    for name in prefixes:
        if parse_step_prefix(name) is not None or name == INDEX_DIR:
            with storage_errors(f"deleting {name} under {url}"):
                backend.delete_prefix(name)
    with storage_errors(f"listing {url}"):
        left = backend.list_objects("")
    if left:
        log.warning(
            "removed the checkpoint at %s but left %d files ckpt did not write there: %s",
            url,
            len(left),
            ", ".join(left[:5]),
        )
        return
    if local is not None:
        try:
            local.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("removed the checkpoint at %s but not its directory: %s", url, exc)

"""Prometheus metrics of saves, restores and retries (``ckpt.metrics`` is the public face).

One process-wide set of metrics, made when the public face loads (so that importing
``prometheus_client`` is no part of the first save's stall) when ``prometheus_client``
can be imported, and exported on the default registry at the first save or restore
through ``ckpt.save``/``async_save``/``load``/``restore`` or a ``CheckpointManager``,
unless ``register`` chose a registry before. Without ``prometheus_client`` nothing is
made, nothing is recorded, and saves and restores run as they always did.

Where the values come from: the public face wraps each save it starts
(``record_save``: the stall when staging returns, the time to commit and the bytes
written when the background part ends, a failure at either point) and each restore
(``record_restore``). Retries come from ``storage_backends``' retry observers (the S3
client and the Redis coordinator report each one) and from restore's own retry of a
step whose read failed transiently (``record_retry("restore")``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ckpt.engine import PendingSave, SaveResult
from ckpt.errors import CheckpointError
from storage_backends import StorageBackend, add_retry_observer, as_tiered

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

# Checkpoint stalls are milliseconds to a minute; saves and restores up to half an hour.
STALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip

INSTALL_HINT = "pip install 'torch-ckpt[metrics]' (or pip install prometheus_client)"


class _Metrics:
    """The metric objects, made unregistered, and the registries they are exported on."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.save_stall: Histogram = Histogram(
            "ckpt_save_stall_seconds",
            "Time a save blocked the caller (flatten, plan, device-to-host copy).",
            ["backend", "kind"],
            buckets=STALL_BUCKETS,
            registry=None,
        )
        self.save_seconds: Histogram = Histogram(
            "ckpt_save_seconds",
            "Time from the save call to its commit, for committed saves.",
            ["backend", "kind"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.saved_bytes: Counter = Counter(
            "ckpt_saved_bytes",
            "Bytes this process wrote in committed saves (data files, headers included).",
            ["backend"],
            registry=None,
        )
        self.save_failures: Counter = Counter(
            "ckpt_save_failures",
            "Saves that failed, by the ckpt error class that ended them.",
            ["backend", "kind", "error"],
            registry=None,
        )
        self.restore_seconds: Histogram = Histogram(
            "ckpt_restore_seconds",
            "Time of a successful restore, fallbacks over damaged steps included.",
            ["backend"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.restore_fallbacks: Counter = Counter(
            "ckpt_restore_fallbacks",
            "Committed steps (or copies of a step on one tier) that restore skipped as "
            "corrupt or unreadable before loading an older one.",
            ["backend"],
            registry=None,
        )
        self.retries: Counter = Counter(
            "ckpt_retries",
            "Retries of remote calls (s3, redis) and of restore reads (restore).",
            ["service"],
            registry=None,
        )
        self.all = (
            self.save_stall,
            self.save_seconds,
            self.saved_bytes,
            self.save_failures,
            self.restore_seconds,
            self.restore_fallbacks,
            self.retries,
        )
        self.collector = _collector(self.all)
        self.registries: list[CollectorRegistry] = []
        self.chosen = False  # register() was called: no automatic default registry


def _collector(metrics: tuple[Counter | Histogram, ...]) -> Any:
    """One collector exporting all of ``metrics``, so that they join or leave a registry
    together (and a clash leaves none of them half registered)."""
    from prometheus_client.registry import Collector

    class CkptCollector(Collector):
        def collect(self) -> Iterator[Metric]:
            for metric in metrics:
                yield from metric.collect()

        def describe(self) -> Iterator[Metric]:
            for metric in metrics:
                yield from metric.describe()

    return CkptCollector()


_lock = threading.Lock()
_made = False
_metrics: _Metrics | None = None


def _get() -> _Metrics | None:
    """The metrics, made on the first call (at import); None without ``prometheus_client``."""
    global _made, _metrics
    if _made:
        return _metrics
    with _lock:
        if not _made:
            try:
                _metrics = _Metrics()
            except ImportError:
                _metrics = None
            else:
                add_retry_observer(_on_retry)
            _made = True
    return _metrics


def _active() -> _Metrics | None:
    """The metrics for recording; on the first use, exported on the default registry unless
    ``register`` chose where."""
    metrics = _get()
    if metrics is None or metrics.chosen:
        return metrics
    with _lock:
        if not metrics.chosen:
            metrics.chosen = True
            from prometheus_client import REGISTRY

            try:
                REGISTRY.register(metrics.collector)
            except ValueError as exc:
                log.warning(
                    "ckpt's metrics are not exported on prometheus_client's default registry: "
                    "%s; call ckpt.metrics.register(registry) to export them on another one",
                    exc,
                )
            else:
                metrics.registries.append(REGISTRY)
    return metrics


def available() -> bool:
    """Whether ``prometheus_client`` can be imported (and metrics are recorded)."""
    return _get() is not None


def register(registry: CollectorRegistry | None = None) -> None:
    """Export ckpt's metrics on ``registry`` (default: ``prometheus_client.REGISTRY``).

    Calling it again for the same registry does nothing. Once ``register`` was called,
    ckpt no longer exports its metrics on the default registry by itself: call it before
    the first save or restore to keep them off the default registry.

    Raises:
        CheckpointError: ``prometheus_client`` is not installed, or ``registry`` already
            holds other metrics with ckpt's names.
    """
    metrics = _get()
    if metrics is None:
        raise CheckpointError(
            f"ckpt.metrics.register: prometheus_client is missing; {INSTALL_HINT}"
        )
    from prometheus_client import REGISTRY

    target = REGISTRY if registry is None else registry
    with _lock:
        metrics.chosen = True
        if any(r is target for r in metrics.registries):
            return
        try:
            target.register(metrics.collector)
        except ValueError as exc:
            raise CheckpointError(
                f"ckpt.metrics.register: the registry already holds metrics named like "
                f"ckpt's ({exc}); unregister those or pass another registry"
            ) from exc
        metrics.registries.append(target)


def unregister(registry: CollectorRegistry | None = None) -> None:
    """Stop exporting ckpt's metrics on ``registry`` (default: the default registry).

    Values keep counting; ``register`` exports them again. Unknown registries are ignored,
    and so is the call without ``prometheus_client``.
    """
    metrics = _get()
    if metrics is None:
        return
    from prometheus_client import REGISTRY

    target = REGISTRY if registry is None else registry
    with _lock:
        metrics.chosen = True
        if any(r is target for r in metrics.registries):
            target.unregister(metrics.collector)
            metrics.registries = [r for r in metrics.registries if r is not target]


# -- recording (the public face calls these) --------------------------------------------


def backend_label(backend: StorageBackend) -> str:
    """``local``, ``s3``, ``tiered`` or ``other``: the low-cardinality name of a backend."""
    if len(as_tiered(backend).tiers) > 1:
        return "tiered"
    return {"file": "local", "s3": "s3"}.get(urlsplit(backend.url).scheme, "other")


def error_label(exc: BaseException) -> str:
    """The class name of ``exc``'s nearest base in ``ckpt.errors`` (a fixed set), or
    ``other``."""
    for cls in type(exc).__mro__:
        if cls.__module__ == CheckpointError.__module__:
            return cls.__name__
    return "other"


def record_save(
    backend: StorageBackend, *, blocking: bool, start: Callable[[], PendingSave]
) -> PendingSave:
    """Run ``start`` (which starts a save and returns after staging) and record the save.

    The caller raises an earlier background failure before, so that it is not counted
    twice (it was counted when that save ended).
    """
    metrics = _active()
    if metrics is None:
        return start()
    kind = "sync" if blocking else "async"
    where = backend_label(backend)
    began = time.perf_counter()
    try:
        pending = start()
    except BaseException as exc:
        metrics.save_failures.labels(where, kind, error_label(exc)).inc()
        raise
    metrics.save_stall.labels(where, kind).observe(pending.stall_seconds)

    def ended(future: Future[SaveResult]) -> None:
        error = future.exception()
        if error is not None:
            metrics.save_failures.labels(where, kind, error_label(error)).inc()
            return
        metrics.save_seconds.labels(where, kind).observe(time.perf_counter() - began)
        metrics.saved_bytes.labels(where).inc(future.result().bytes_written)

    pending.add_done_callback(ended)
    return pending


def record_restore(backend: StorageBackend, seconds: float, fallbacks: int) -> None:
    """A restore from ``backend`` succeeded in ``seconds``, skipping ``fallbacks`` steps
    or copies."""
    metrics = _active()
    if metrics is None:
        return
    where = backend_label(backend)
    metrics.restore_seconds.labels(where).observe(seconds)
    metrics.restore_fallbacks.labels(where).inc(
        fallbacks
    )  # 0 too: the series exists from the start


def record_retry(service: str) -> None:
    """``service`` (``restore``) tries a call again."""
    metrics = _active()
    if metrics is not None:
        metrics.retries.labels(service).inc()


def _on_retry(service: str, what: str) -> None:
    record_retry(service)


# prometheus_client is imported with the public face, not in the first save's stall.
_get()

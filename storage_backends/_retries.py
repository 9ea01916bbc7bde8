"""Retry observers: a process-wide hook told about each retry of a remote call.

Who calls what: a client that retries calls (the S3 client here; ckpt's Redis
coordinator too) calls ``report_retry(service, what)`` from the thread making the
call, once before each new attempt (never for the first one), so the number of
reports is exactly the number of retries. Whoever wants to count or log them (ckpt's
Prometheus metrics) adds an observer once with ``add_retry_observer``.

Observers run in the retrying thread, before the new attempt: they must be quick and
must not block. An observer that raises is logged and otherwise ignored; the call
goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

RetryObserver = Callable[[str, str], None]
"""Called as ``observer(service, what)``: ``service`` is a short fixed name (``"s3"``,
``"redis"``), ``what`` the call retried, for messages (it may name an object)."""

_lock = threading.Lock()
_observers: tuple[RetryObserver, ...] = ()


def add_retry_observer(observer: RetryObserver) -> None:
    """Tell ``observer`` about every retry from now on (adding it twice adds it once)."""
    global _observers
    with _lock:
        if observer not in _observers:
            _observers = (*_observers, observer)


def remove_retry_observer(observer: RetryObserver) -> None:
    """Stop telling ``observer`` (one that was never added is ignored)."""
    global _observers
    with _lock:
        _observers = tuple(o for o in _observers if o != observer)


def report_retry(service: str, what: str) -> None:
    """Tell every observer that ``service`` is about to try ``what`` again."""
    for observer in _observers:
        try:
            observer(service, what)
        except Exception:  # counting a retry must never fail the call being retried
            log.exception("retry observer %r failed on a retry of %s (%s)", observer, what, service)

"""What a user passes as ``coordinator=``, turned into a coordinator."""

from __future__ import annotations

from ckpt.coordination._embedded import default_coordinator
from ckpt.coordination._protocol import Coordinator
from ckpt.coordination._redis_url import RedisURL, job_from_url


def resolve_coordinator(coordinator: Coordinator | str | None, root_url: str) -> Coordinator:
    """The coordinator for a job whose checkpoints live under ``root_url``.

    Args:
        coordinator: None for the embedded coordinator that fits this process (see
            ``default_coordinator``); a ``redis://``, ``rediss://``, ``unix://`` or
            ``redis[s]+sentinel://`` URL for a ``RedisCoordinator`` whose job is the URL's
            ``?job=`` or else one derived from ``root_url`` (two roots never share one); or a
            coordinator, returned as is.
        root_url: the checkpoint root's URL.

    Returns:
        A coordinator; one made here is the caller's to close.

    Raises:
        CoordinationError: the URL is not a Redis URL, or Redis cannot be reached.
    """
    if coordinator is None:
        return default_coordinator()
    if isinstance(coordinator, str):
        from ckpt.coordination._redis import RedisCoordinator  # imports redis-py

        return RedisCoordinator(
            coordinator, job=RedisURL.parse(coordinator).job or job_from_url(root_url)
        )
    return coordinator

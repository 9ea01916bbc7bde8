"""What a Redis coordinator URL says: where the server is (for redis-py) and which job.

``redis://[:password@]host:port/db``, ``rediss://`` (TLS) or ``unix://``; ``?job=NAME`` is
ckpt's own option (the namespace of the job's keys), every other query option
(``ssl_ca_certs``, ``ssl_cert_reqs``, ...) is redis-py's. Needs no redis-py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import parse_qs, parse_qsl, urlencode, urlparse, urlunparse

from ckpt.errors import CoordinationError

SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisURL:
    """A parsed coordinator URL.

    Attributes:
        client_url: the URL for redis-py, without ckpt's own options.
        job: the ``job`` query option; None when absent.
    """

    client_url: str
    job: str | None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Split ``url`` into redis-py's URL and ckpt's ``job``.

        Raises:
            CoordinationError: not a ``redis://``, ``rediss://`` or ``unix://`` URL.
        """
        parsed = urlparse(url)
        if parsed.scheme not in SCHEMES:
            raise CoordinationError(
                f"coordinator URL {url!r} must start with redis://, rediss:// or unix://"
            )
        job = parse_qs(parsed.query).get("job", [None])[0]
        client_query = urlencode([(k, v) for k, v in parse_qsl(parsed.query) if k != "job"])
        return cls(urlunparse(parsed._replace(query=client_query)), job)


def job_from_url(url: str) -> str:
    """A stable job namespace for a checkpoint root (two roots never share one)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]

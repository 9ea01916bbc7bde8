"""What a Redis coordinator URL says: where the server is (for redis-py) and which job.

``redis://[[user]:password@]host:port/db``, ``rediss://`` (TLS) or ``unix:///path``;
``?job=NAME`` is ckpt's own option (the namespace of the job's keys), every other query
option (``ssl_ca_certs``, ``ssl_cert_reqs``, ...) is redis-py's and is passed on as
written. The URL is parsed with ``urllib.parse``: ``job`` is a query parameter, never
text found somewhere in the URL, so a password that contains ``job=``, ``&`` or ``%``
cannot change the namespace. A password with ``/``, ``?``, ``#`` or ``@`` must be
percent-encoded (``urllib.parse.quote(password, safe="")``), as in any URL.

Messages name the server by ``RedisURL.where`` (scheme, host, port, db), never with the
password. Needs no redis-py.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ckpt.errors import CoordinationError

SCHEMES = ("redis", "rediss", "unix")
JOB_OPTION = "job"
# A job names a key prefix (``ckpt:<job>:``): no ``:`` (it would reach into another
# job's keys), no glob characters, nothing a log line would hide.
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def check_job(job: str) -> str:
    """``job`` when it is a valid namespace.

    Raises:
        CoordinationError: empty, longer than 128 characters, or with characters other
            than letters, digits, ``.``, ``_``, ``/`` and ``-``.
    """
    if not _JOB_NAME.fullmatch(job):
        raise CoordinationError(
            f"Redis coordinator job name {job!r} is not valid: use 1-128 letters, digits, "
            "'.', '_', '/' or '-', starting with a letter or digit"
        )
    return job


@dataclass(frozen=True)
class RedisURL:
    """A parsed coordinator URL.

    Attributes:
        client_url: the URL for redis-py, without ckpt's own options.
        job: the ``job`` query option; None when absent.
        where: the server for messages (``redis://host:port/db``), without credentials.
        password: the password as redis-py will send it (to keep it out of messages);
            None when the URL has none.
    """

    client_url: str
    job: str | None
    where: str
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Split ``url`` into redis-py's URL and ckpt's ``job``.

        Raises:
            CoordinationError: not a ``redis://``, ``rediss://`` or ``unix://`` URL, no
                host, a bad port, a fragment (an unencoded ``#`` in the password), or
                ``job`` given empty, twice or with characters a namespace cannot hold.
        """
        try:
            parts = urlsplit(url)
            scheme = parts.scheme
            host, port = parts.hostname, parts.port
        except ValueError:
            # Not chained: urllib's message quotes the text around the port, the password.
            raise CoordinationError(
                f"coordinator URL {_redacted(url)} is not a valid URL (host or port); "
                "percent-encode any '/', '?', '#' or '@' in the password "
                "(urllib.parse.quote(password, safe=''))"
            ) from None
        if scheme not in SCHEMES:
            raise CoordinationError(
                f"coordinator URL {_redacted(url)} must start with redis://, rediss:// or unix://"
            )
        where = f"unix://{parts.path}" if scheme == "unix" else f"{scheme}://{host}:{port or 6379}"
        if scheme != "unix":
            where += parts.path or "/0"
        if parts.fragment or (scheme != "unix" and not host):
            raise CoordinationError(
                f"coordinator URL {_redacted(url)} names no server host (or has a '#'): "
                "percent-encode any '/', '?', '#' or '@' in the password "
                "(urllib.parse.quote(password, safe=''))"
            )
        jobs: list[str] = []
        kept: list[str] = []
        for pair in parts.query.split("&") if parts.query else []:
            key = unquote(pair.partition("=")[0])
            if key == JOB_OPTION:
                jobs += [value for _, value in parse_qsl(pair, keep_blank_values=True)]
            else:
                kept.append(pair)  # redis-py's option, passed on exactly as written
        if len(jobs) > 1:
            raise CoordinationError(
                f"coordinator URL for {where} gives ?job= {len(jobs)} times; give it once"
            )
        job = check_job(jobs[0]) if jobs else None
        client_url = urlunsplit(parts._replace(query="&".join(kept)))
        password = unquote(parts.password) if parts.password else None
        return cls(client_url, job, where, password)


def _redacted(url: str) -> str:
    """``url`` with everything between ``://`` and the last ``@`` hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return repr(url)
    return repr(f"{scheme}://***@{rest.rpartition('@')[2]}")


def job_from_url(url: str) -> str:
    """A stable job namespace for a checkpoint root (two roots never share one)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]

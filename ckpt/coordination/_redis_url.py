"""What a Redis coordinator URL says: where the server is (for redis-py) and which job.

``redis://[[user]:password@]host:port/db``, ``rediss://`` (TLS) or ``unix:///path``; or,
for a master that Redis Sentinel fails over,
``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/db]`` (the
sentinels' addresses, port 26379 by default; the user and password are the master's) and
``rediss+sentinel://`` (TLS to the sentinels and the master, with the same ``ssl_*``
options). ``?job=NAME`` is ckpt's own option (the namespace of the job's keys), every other query
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

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
SENTINEL_PORT = 26379
JOB_OPTION = "job"
# A Sentinel service (master group) name: what ``sentinel monitor NAME ...`` accepts and
# a URL path segment can hold unencoded.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
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
        sentinels: for a Sentinel URL, the sentinels' (host, port); else empty.
        service: for a Sentinel URL, the name of the master group the sentinels monitor.
        master_url: for a Sentinel URL, a ``redis://`` (``rediss://``) URL with the
            master's credentials, db and options, whose host is a placeholder: what
            redis-py's URL parser reads for the connection options to the master.
    """

    client_url: str
    job: str | None
    where: str
    password: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    master_url: str = ""

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """Split ``url`` into redis-py's URL and ckpt's ``job``.

        Raises:
            CoordinationError: not a ``redis://``, ``rediss://``, ``unix://`` or
                ``redis[s]+sentinel://`` URL, no host, a bad port, a fragment (an
                unencoded ``#`` in the password), a Sentinel URL without a service name
                or with a bad db, or ``job`` given empty, twice or with characters a
                namespace cannot hold.
        """
        if url.partition("://")[0] in SENTINEL_SCHEMES:
            return cls._parse_sentinel(url)
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
                f"coordinator URL {_redacted(url)} must start with redis://, rediss://, "
                "unix://, redis+sentinel:// or rediss+sentinel://"
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
        job, kept = _split_query(parts.query, where)
        client_url = urlunsplit(parts._replace(query=kept))
        password = unquote(parts.password) if parts.password else None
        return cls(client_url, job, where, password)

    @classmethod
    def _parse_sentinel(cls, url: str) -> RedisURL:
        """``redis[s]+sentinel://[userinfo@]host[:port][,host[:port]...]/SERVICE[/db]``."""
        scheme, _, rest = url.partition("://")
        if "#" in rest:
            raise CoordinationError(
                f"coordinator URL {_redacted(url)} has a '#': percent-encode any '/', '?', "
                "'#' or '@' in the password (urllib.parse.quote(password, safe=''))"
            )
        netloc, _, path_query = rest.partition("/")
        path, _, query = path_query.partition("?")
        if "?" in netloc:  # no path: ``host:26379?job=x``
            netloc, _, query = netloc.partition("?")
        userinfo, at, hosts = netloc.rpartition("@")
        sentinels = tuple(_sentinel_address(item, url) for item in hosts.split(","))
        service, _, db = path.partition("/")
        if not _SERVICE_NAME.fullmatch(service) or not (db == "" or db.isdigit()):
            raise CoordinationError(
                f"coordinator URL {_redacted(url)} must name the master's service (and "
                "optionally a db) after the sentinels: "
                f"{scheme}://host:26379[,host:26379...]/SERVICE[/db]"
            )
        addresses = ",".join(f"{_bracketed(h)}:{p}" for h, p in sentinels)
        where = f"{scheme}://{addresses}/{service}/{db or 0}"
        job, kept = _split_query(query, where)
        client_url = f"{scheme}://{netloc}/{path}" + (f"?{kept}" if kept else "")
        plain = "rediss" if scheme.startswith("rediss") else "redis"
        master_url = f"{plain}://{userinfo}{at}{service}/{db or 0}" + (f"?{kept}" if kept else "")
        password = None
        if at and ":" in userinfo:
            password = unquote(userinfo.partition(":")[2]) or None
        return cls(client_url, job, where, password, sentinels, service, master_url)


def _split_query(query: str, where: str) -> tuple[str | None, str]:
    """ckpt's ``job`` (checked; None when absent) and the rest of the query as written."""
    jobs: list[str] = []
    kept: list[str] = []
    for pair in query.split("&") if query else []:
        key = unquote(pair.partition("=")[0])
        if key == JOB_OPTION:
            jobs += [value for _, value in parse_qsl(pair, keep_blank_values=True)]
        else:
            kept.append(pair)  # redis-py's option, passed on exactly as written
    if len(jobs) > 1:
        raise CoordinationError(
            f"coordinator URL for {where} gives ?job= {len(jobs)} times; give it once"
        )
    return (check_job(jobs[0]) if jobs else None), "&".join(kept)


def _sentinel_address(item: str, url: str) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port``) of one sentinel; the port defaults to 26379."""
    try:
        parts = urlsplit(f"//{item}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host:
        raise CoordinationError(
            f"coordinator URL {_redacted(url)} has a sentinel address that is not "
            "host[:port]; list the sentinels as host:26379,host:26379 (percent-encode any "
            "'/', '?', '#' or '@' in the password)"
        ) from None
    return host, port or SENTINEL_PORT


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _redacted(url: str) -> str:
    """``url`` with everything between ``://`` and the last ``@`` hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return repr(url)
    return repr(f"{scheme}://***@{rest.rpartition('@')[2]}")


def job_from_url(url: str) -> str:
    """A stable job namespace for a checkpoint root (two roots never share one)."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]

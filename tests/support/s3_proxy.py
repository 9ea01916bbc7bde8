"""A small threaded loopback HTTP proxy in front of an S3 server, with switchable faults.

The client (boto3) talks plain HTTP/1.1 to the proxy as if it were the server. Each
connection carries one request: the proxy answers ``100 Continue`` itself, reads the
whole request, forwards it with ``Connection: close``, reads the whole response and
sends it back with ``Connection: close`` (so a client never reuses a connection that
the proxy is about to close). Before or after forwarding, a rule may inject a fault:

=================  ==========================================================================
``reset``          TCP reset before forwarding: the server never sees the request
``reset_after``    forward, then reset without answering: the server did it, the client
                   does not know (a retry must be idempotent)
``reset_body``     send the headers and half of the body, then reset
``short_body``     send the headers and half of the body, then close cleanly (a body that
                   ends early); responses without a body get ``reset_after`` instead
``stall``          hold the request ``delay_s`` (or until the proxy stops), then reset:
                   the server never answers (a client read timeout)
``delay``          wait ``delay_s``, then forward normally (a slow server)
``hold``           wait until ``release()`` (at most ``delay_s``), then forward normally:
                   keeps requests in flight for exactly as long as a test wants
``slowdown``       answer ``503 SlowDown`` (throttling)
``internal``       answer ``500 InternalError``
``access_denied``  answer ``403 AccessDenied``
``no_such_bucket`` answer ``404 NoSuchBucket``
``no_such_upload`` answer ``404 NoSuchUpload``
=================  ==========================================================================

Rules (``FaultRule``) pick requests by method and a substring of the request target, hit
a ``fraction`` of them (seeded RNG) and stop after ``count`` faults; the first rule that
matches and fires wins. ``records`` logs every request with the fault it got, so tests
count attempts. Every socket operation has a timeout and every wait ends when the proxy
stops: nothing here can hang a test.
"""

from __future__ import annotations

import random
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SOCKET_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 << 10
MAX_DELAY_S = 60.0

# Canned S3 error answers: kind -> (HTTP status, reason, S3 error code, message).
CANNED: dict[str, tuple[int, str, str, str]] = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "access_denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "no_such_bucket": (404, "Not Found", "NoSuchBucket", "The specified bucket does not exist"),
    "no_such_upload": (404, "Not Found", "NoSuchUpload", "The specified upload does not exist."),
}
CONNECTION_FAULTS = ("reset", "reset_after", "reset_body", "short_body", "stall")
TRANSIENT_FAULTS = ("reset", "reset_after", "reset_body", "short_body", "slowdown", "internal")
FAULT_KINDS = (*CONNECTION_FAULTS, "delay", "hold", *CANNED)


@dataclass
class FaultRule:
    """Which requests get which fault.

    Args:
        kinds: the fault, or several to pick from at random for each hit.
        fraction: the share of matching requests hit (1.0: every one).
        count: stop after this many faults (None: no limit).
        method: only requests with this HTTP method.
        target: only requests whose target (path and query) contains this.
        delay_s: for ``delay`` and ``stall``.
    """

    kinds: str | Sequence[str]
    fraction: float = 1.0
    count: int | None = None
    method: str | None = None
    target: str | None = None
    delay_s: float = 0.0
    fired: int = 0

    def __post_init__(self) -> None:
        names = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        unknown = [k for k in names if k not in FAULT_KINDS]
        if not names or unknown:
            raise ValueError(f"unknown fault kinds {unknown or names!r}; known: {FAULT_KINDS}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError("fraction must lie in [0, 1]")
        if not 0.0 <= self.delay_s <= MAX_DELAY_S:
            raise ValueError(f"delay_s must lie in [0, {MAX_DELAY_S}]")
        self.kinds = names

    def matches(self, method: str, target: str) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        if self.method is not None and method != self.method:
            return False
        return self.target is None or self.target in target


@dataclass(frozen=True)
class Record:
    """One request the proxy saw, and the fault it got ("" when forwarded untouched).

    ``headers`` are the request's headers as the client sent them, names in lower case.
    """

    method: str
    target: str
    fault: str
    headers: dict[str, str]


@dataclass
class _Response:
    status_line: bytes
    headers: list[tuple[str, str]]
    body: bytes = b""
    head_only: bool = False  # no body may follow (HEAD, 1xx, 204, 304): keep Content-Length


class _Closed(Exception):
    """The peer closed the connection before a whole message arrived."""


class _Conn:
    """Buffered reads of HTTP/1.1 messages from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise _Closed()
        self.buf += data

    def read_head(self) -> tuple[bytes, list[tuple[str, str]]]:
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD_BYTES:
                raise _Closed()
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        first, *lines = head.split(b"\r\n")
        headers = []
        for line in lines:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        return first, headers

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.read_line().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.read_line():  # trailers end with an empty line
                    pass
                return bytes(body)
            body += self.read_exact(size)
            self.read_exact(2)

    def read_to_eof(self) -> bytes:
        try:
            while True:
                self._fill()
        except _Closed:
            pass
        data, self.buf = self.buf, b""
        return data

    def read_body(self, headers: list[tuple[str, str]], *, until_eof: bool) -> bytes:
        if "chunked" in _get(headers, "transfer-encoding").lower():
            return self.read_chunked()
        length = _get(headers, "content-length")
        if length:
            return self.read_exact(int(length))
        return self.read_to_eof() if until_eof else b""


def _get(headers: list[tuple[str, str]], name: str) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value
    return ""


def _without(headers: list[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in names]


def _encode(first: bytes, headers: list[tuple[str, str]]) -> bytes:
    lines = [first, *(f"{k}: {v}".encode("latin-1") for k, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class S3FaultProxy:
    """A loopback proxy to ``upstream`` (``http://127.0.0.1:PORT``) with fault rules.

    Args:
        upstream: the real server's endpoint URL.
        seed: seed of the RNG that decides fractions and kinds.
        strip_headers: request headers (lower case) dropped before forwarding, to play a
            server that ignores them (e.g. ``if-none-match``).

    Attributes:
        max_in_flight: the most requests that were being served at the same time.
    """

    def __init__(self, upstream: str, *, seed: int = 0, strip_headers: Sequence[str] = ()) -> None:
        host_port = upstream.split("://", 1)[-1].rstrip("/")
        host, _, port = host_port.rpartition(":")
        self.upstream = (host, int(port))
        self.rng = random.Random(seed)
        self.rules: list[FaultRule] = []
        self.records: list[Record] = []
        self.strip_headers = tuple(h.lower() for h in strip_headers)
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._seen = threading.Condition(self._lock)
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            block_on_close = False
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="s3-fault-proxy",
            daemon=True,
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self.port}"

    # -- rules ---------------------------------------------------------------------------

    def add(self, kinds: str | Sequence[str], **options: Any) -> FaultRule:
        """Add a ``FaultRule(kinds, **options)`` after the existing ones; return it."""
        rule = FaultRule(kinds, **options)
        with self._lock:
            self.rules.append(rule)
        return rule

    def fail_next(self, kind: str, count: int = 1, **options: Any) -> FaultRule:
        """The next ``count`` matching requests get ``kind``."""
        return self.add(kind, count=count, **options)

    def release(self) -> None:
        """Let every held request (and every later one) go on."""
        self._released.set()

    def clear(self) -> None:
        """Remove every rule (requests in flight keep the fault they already got)."""
        with self._lock:
            self.rules = []

    def _decide(
        self, method: str, target: str, headers: list[tuple[str, str]]
    ) -> tuple[str, float]:
        with self._lock:
            fault, delay = "", 0.0
            for rule in self.rules:
                if rule.matches(method, target) and self.rng.random() < rule.fraction:
                    rule.fired += 1
                    fault, delay = self.rng.choice(list(rule.kinds)), rule.delay_s
                    break
            self.records.append(Record(method, target, fault, {k.lower(): v for k, v in headers}))
            self._seen.notify_all()
            return fault, delay

    # -- what happened -------------------------------------------------------------------

    def requests(self, method: str | None = None, target: str | None = None) -> list[Record]:
        """The requests seen so far, optionally only those of ``method`` / containing ``target``."""
        with self._lock:
            return [
                r
                for r in self.records
                if (method is None or r.method == method) and (target is None or target in r.target)
            ]

    def faults(self) -> list[Record]:
        """The requests that got a fault."""
        with self._lock:
            return [r for r in self.records if r.fault]

    def wait_in_flight(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` requests are being served at once (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.in_flight < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._seen.wait(min(left, 0.5))
            return True

    def wait_for(self, predicate: Callable[[Record], bool], timeout: float) -> bool:
        """Wait until a request satisfying ``predicate`` has been seen (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not any(predicate(r) for r in self.records):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._seen.wait(min(left, 0.5))
            return True

    # -- one connection ------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(SOCKET_TIMEOUT_S)
        conn = _Conn(client)
        try:
            first, headers = conn.read_head()
            method, target = [*first.decode("latin-1").split(" "), "", ""][:2]
            if "100-continue" in _get(headers, "expect").lower():
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = conn.read_body(headers, until_eof=False)
        except (OSError, _Closed, ValueError):
            client.close()
            return
        fault, delay = self._decide(method, target, headers)
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._seen.notify_all()
        try:
            self._serve(client, method, target, first, headers, body, fault, delay)
        except (OSError, _Closed, ValueError):
            _reset(client)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _serve(
        self,
        client: socket.socket,
        method: str,
        target: str,
        first: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: str,
        delay: float,
    ) -> None:
        if fault == "reset":
            _reset(client)
            return
        if fault == "stall":
            self._stopping.wait(delay)
            _reset(client)
            return
        if fault in CANNED:
            client.sendall(self._canned(fault, method, target))
            client.close()
            return
        if fault == "delay":
            self._stopping.wait(delay)
        if fault == "hold":
            deadline = time.monotonic() + delay
            while (
                not self._released.is_set()
                and not self._stopping.is_set()
                and time.monotonic() < deadline
            ):
                self._released.wait(0.05)
        response = self._forward(first, headers, body, method)
        if fault == "reset_after" or (
            fault in ("reset_body", "short_body") and len(response.body) < 2
        ):
            _reset(client)
            return
        out_headers = _without(response.headers, "connection", "keep-alive", "transfer-encoding")
        if not response.head_only:
            out_headers = [
                *_without(out_headers, "content-length"),
                ("Content-Length", str(len(response.body))),
            ]
        out_headers.append(("Connection", "close"))
        head = _encode(response.status_line, out_headers)
        if fault in ("reset_body", "short_body"):
            client.sendall(head + response.body[: len(response.body) // 2])
            if fault == "reset_body":
                _reset(client)
            else:
                client.shutdown(socket.SHUT_WR)
                client.close()
            return
        client.sendall(head + response.body)
        client.close()

    def _forward(
        self, first: bytes, headers: list[tuple[str, str]], body: bytes, method: str
    ) -> _Response:
        out = _without(
            headers,
            "connection",
            "keep-alive",
            "expect",
            "proxy-connection",
            "transfer-encoding",
            *self.strip_headers,
        )
        if (
            body
            or _get(headers, "content-length")
            or "chunked" in _get(headers, "transfer-encoding").lower()
        ):
            out = [*_without(out, "content-length"), ("Content-Length", str(len(body)))]
        out.append(("Connection", "close"))
        with socket.create_connection(self.upstream, timeout=SOCKET_TIMEOUT_S) as upstream:
            upstream.sendall(_encode(first, out) + body)
            conn = _Conn(upstream)
            while True:
                status_line, response_headers = conn.read_head()
                status = int(status_line.split(b" ")[1])
                if status >= 200:
                    break
            head_only = method == "HEAD" or status in (204, 304)
            data = b"" if head_only else conn.read_body(response_headers, until_eof=True)
        return _Response(status_line, response_headers, data, head_only)

    @staticmethod
    def _canned(fault: str, method: str, target: str) -> bytes:
        status, reason, code, message = CANNED[fault]
        resource = target.split("?", 1)[0]
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>ckpt-fault-proxy</RequestId></Error>"
        ).encode()
        headers = [
            ("Content-Type", "application/xml"),
            ("Content-Length", str(len(xml))),
            ("x-amz-request-id", "ckpt-fault-proxy"),
            ("Connection", "close"),
        ]
        first = f"HTTP/1.1 {status} {reason}".encode()
        return _encode(first, headers) + (b"" if method == "HEAD" else xml)

    # -- life cycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, end every held request, and release the port."""
        self._stopping.set()
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT_S)

    def __enter__(self) -> S3FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

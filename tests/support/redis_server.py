"""Real ``redis-server`` processes for tests, each on a free loopback port.

``RedisServer`` starts ``redis-server --port P --save "" --appendonly yes|no --dir D
--bind 127.0.0.1`` (optionally with ``requirepass`` or TLS), waits until it answers PING,
and can be SIGKILLed and restarted on the same port and directory, with AOF switched on
or off: a restart with AOF replays what was acknowledged (``appendfsync always``), a
restart without it comes back empty, like a server that lost its state.

Use it as a context manager, or call ``stop()``; a test never leaves one running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.ports import free_port

# Every wait here gives up after this long, so that a broken server fails a test
# instead of hanging it.
START_TIMEOUT_S = 20.0


def redis_server_binary() -> str | None:
    """The ``redis-server`` on PATH, or None."""
    return shutil.which("redis-server")


def tls_supported() -> bool:
    """Whether this ``redis-server`` was built with TLS (it knows ``--tls-port``)."""
    binary = redis_server_binary()
    if binary is None:
        return False
    try:
        # --port 0 and no TLS port: a TLS build exits at once ("not listen anywhere"),
        # a build without TLS rejects the directive.
        out = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--save", ""],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Bad directive" not in out.stdout + out.stderr


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, made with ``openssl``.

    Returns:
        Paths under the keys ``ca``, ``cert`` and ``key``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ckpt-test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return {"ca": ca, "cert": cert, "key": key}


class RedisServer:
    """One ``redis-server`` process on a free port, restartable on the same port and dir.

    Args:
        directory: its working directory (AOF files live here).
        appendonly: start with AOF persistence (``appendfsync always``).
        password: ``requirepass`` when given.
        tls: ``make_tls_files`` output; the server then listens with TLS only.
        extra_args: more ``redis-server`` arguments (``--maxclients``, ``--slowlog-*`` ...).
        preexec_fn: run in the server's process before it starts (e.g. die with the parent).
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        password: str | None = None,
        tls: dict[str, Path] | None = None,
        extra_args: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.preexec_fn = preexec_fn
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.directory / "redis.log"
        self.start(appendonly=appendonly)

    # -- addresses ---------------------------------------------------------------------

    def url(self, *, password: str | None = None, db: int = 0) -> str:
        """``redis://[:password@]127.0.0.1:port/db`` (``rediss://`` with TLS)."""
        secret = self.password if password is None else password
        auth = f":{quote(secret, safe='')}@" if secret else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{db}"

    def client(self) -> Any:
        """A redis-py client for poking at the server (test side only)."""
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=10,
            ssl=bool(self.tls),
            ssl_ca_certs=str(self.tls["ca"]) if self.tls else None,
        )

    # -- life cycle --------------------------------------------------------------------

    def _argv(self) -> list[str]:
        port_args = ["--port", str(self.port)]
        if self.tls:
            port_args = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls["cert"]),
                "--tls-key-file",
                str(self.tls["key"]),
                "--tls-ca-cert-file",
                str(self.tls["ca"]),
                "--tls-auth-clients",
                "no",
            ]
        argv = [
            self.binary,
            *port_args,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self._log),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    def start(self, *, appendonly: bool | None = None) -> None:
        """Start (or start again) on the same port and directory; wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server is already running")
        if appendonly is not None:
            self.appendonly = appendonly
        self.proc = subprocess.Popen(
            self._argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=self.preexec_fn,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; log:\n{self.log_tail()}")
            client = self.client()
            try:
                if client.ping():
                    # A restarted server answers PING before it has replayed its AOF
                    # (it replies LOADING to everything else); wait for the data too.
                    info = client.info("persistence")
                    if not info.get("loading", 0):
                        return
            except redis.RedisError as exc:
                last = exc
            finally:
                client.close()
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S} s: {last!r}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no save) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=START_TIMEOUT_S)

    def restart(self, *, appendonly: bool | None = None) -> None:
        """SIGKILL, then start on the same port and directory (AOF on/off as asked)."""
        self.kill()
        self.start(appendonly=appendonly)

    def stop(self) -> None:
        """Terminate the server (SIGKILL if it does not stop in time)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

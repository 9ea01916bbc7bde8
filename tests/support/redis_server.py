"""Real ``redis-server`` processes for tests, each on a free loopback port.

``SentinelGroup`` adds a master with replicas and ``redis-server --sentinel`` processes
watching it, whose master can be SIGKILLed to make them fail over; ``ClusterGroup`` a
Redis Cluster of a few masters (made with ``redis-cli --cluster create``).

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
        config_file: a config file given first (a sentinel rewrites its own).
        sentinel: run ``redis-server CONFIG --sentinel`` (needs ``config_file``).
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
        config_file: Path | None = None,
        sentinel: bool = False,
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
        self.config_file = config_file
        self.sentinel = sentinel
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
                "--tls-replication",  # replicas and sentinels reach their master over TLS
                "yes",
            ]
        if self.sentinel:
            return [
                self.binary,
                str(self.config_file),
                "--sentinel",
                *port_args,
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self._log),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                *self.extra_args,
            ]
        argv = [
            self.binary,
            *([str(self.config_file)] if self.config_file else []),
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


class SentinelGroup:
    """A master, its replicas and ``redis-server --sentinel`` processes watching it, each
    on a free loopback port: a Redis that fails over when its master dies.

    Short timeouts (``down_after_ms``, ``failover_timeout_ms``) make a failover take about
    a second or two. With one sentinel the quorum is 1 (it alone decides and leads).

    Args:
        directory: one folder per process is made under it.
        service: the master group's name (``sentinel monitor SERVICE ...``).
        replicas: how many replicas follow the master.
        sentinels: how many sentinels watch it (quorum: a majority of them).
        down_after_ms: a master silent this long is down.
        failover_timeout_ms: sentinel's ``failover-timeout``.
        tls: ``make_tls_files`` output: every process then speaks TLS only (clients,
            replication and the sentinels' own connections).
    """

    def __init__(
        self,
        directory: Path,
        *,
        service: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 1,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.service = service
        self.tls = tls
        self.directory = directory
        self.servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []
        try:
            # A replica's first sync starts at once, not after the default 5 s delay.
            quick = ["--repl-diskless-sync-delay", "0"]
            master = RedisServer(directory / "master", extra_args=quick, tls=tls)
            self.servers.append(master)
            for i in range(replicas):
                replica = RedisServer(
                    directory / f"replica-{i}",
                    extra_args=[*quick, "--replicaof", "127.0.0.1", str(master.port)],
                    tls=tls,
                )
                self.servers.append(replica)
            quorum = sentinels // 2 + 1
            for i in range(sentinels):
                conf = directory / f"sentinel-{i}" / "sentinel.conf"
                conf.parent.mkdir(parents=True, exist_ok=True)
                conf.write_text(
                    f"sentinel monitor {service} 127.0.0.1 {master.port} {quorum}\n"
                    f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                    f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {service} 1\n"
                )
                self.sentinels.append(
                    RedisServer(conf.parent, config_file=conf, sentinel=True, tls=tls)
                )
            self.wait_replicated()
        except BaseException:
            self.stop()
            raise

    # -- addresses ---------------------------------------------------------------------

    def url(self, *, db: int = 0, query: str = "") -> str:
        """``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2/SERVICE/db[?query]``
        (``rediss+sentinel://...?ssl_ca_certs=CA`` with TLS)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        options = [f"ssl_ca_certs={quote(str(self.tls['ca']), safe='/')}"] if self.tls else []
        options += [query] if query else []
        return f"{scheme}://{hosts}/{self.service}/{db}" + (
            f"?{'&'.join(options)}" if options else ""
        )

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers sees it."""
        import redis

        for s in self.sentinels:
            client = s.client()
            try:
                _, port = client.sentinel_get_master_addr_by_name(self.service)
                return int(port)
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError("no sentinel answers")

    def master(self) -> RedisServer:
        """The server the sentinels call master now."""
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    # -- life cycle --------------------------------------------------------------------

    def wait_replicated(self) -> None:
        """Wait until every running replica is in sync with the master and every sentinel
        knows them (a failover needs a replica the sentinels know)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        master = self.master()
        replicas = [s for s in self.servers if s is not master and s.running]
        while True:
            ready = all(
                _ask(s, lambda c: c.info("replication").get("master_link_status") == "up")
                for s in replicas
            ) and all(
                _ask(s, lambda c: len(c.sentinel_slaves(self.service)) >= len(replicas))
                for s in self.sentinels
            )
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not sync (or the sentinels do not see them)")
            time.sleep(0.05)

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master; the killed server."""
        master = self.master()
        master.kill()
        return master

    def wait_failover(self, old_port: int, timeout: float = START_TIMEOUT_S) -> RedisServer:
        """Wait until the sentinels name another master and it takes writes; that server."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_port()
            except RuntimeError:
                port = old_port
            if port != old_port:
                server = next(s for s in self.servers if s.port == port)
                client = server.client()
                try:
                    if client.info("replication").get("role") == "master":
                        return server
                except redis.RedisError:
                    pass
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError(f"no failover within {timeout:.0f} s")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def __enter__(self) -> SentinelGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ClusterGroup:
    """``nodes`` cluster-enabled ``redis-server`` masters on free ports sharing the 16384
    slots (no replicas), joined with ``redis-cli --cluster create``.

    Args:
        directory: one folder per node is made under it.
        nodes: how many masters (3 at least).
    """

    def __init__(self, directory: Path, *, nodes: int = 3) -> None:
        self.servers: list[RedisServer] = []
        try:
            for i in range(nodes):
                folder = directory / f"node-{i}"
                self.servers.append(
                    RedisServer(
                        folder,
                        extra_args=[
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            str(folder / "nodes.conf"),
                            # The bus port defaults to port + 10000: a free port may be too high.
                            "--cluster-port",
                            str(free_port()),
                        ],
                    )
                )
            addresses = [f"127.0.0.1:{s.port}" for s in self.servers]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT_S,
            )
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    def url(self, query: str = "") -> str:
        """``redis://127.0.0.1:P/0`` of the first node (a cluster client finds the rest)."""
        return f"redis://127.0.0.1:{self.servers[0].port}/0" + (f"?{query}" if query else "")

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(
            _ask(s, lambda c: c.execute_command("CLUSTER INFO").get("cluster_state") == "ok")
            for s in self.servers
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> ClusterGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ask(server: RedisServer, question: Callable[[Any], bool]) -> bool:
    """``question(client)`` on a fresh client of ``server``; False when it does not answer."""
    import redis

    client = server.client()
    try:
        return question(client)
    except redis.RedisError:
        return False
    finally:
        client.close()

"""Redis helpers shared by the coordinator tests and ``benchmarks/bench_coordinator``: a
redis-py client that logs every round trip it makes (and so counts the save protocol's),
a ``client_factory`` that keeps the clients it built, and a listing of a job's keys.

``RedisCoordinator(url, client_factory=ClientLog())`` builds its client through the log;
``log.clients[i].round_trips`` is then what the i-th coordinator built spent.
``KillSwitch`` is such a factory that SIGKILLs the redis-server just before, or just after,
a chosen protocol step (Redis killed at each step of a save).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, cast

import redis
from redis.commands.core import Script

from ckpt.coordination import redis_client

Sent = tuple[str, int, int]  # what a round trip was, its start ns, its reply ns

SCRIPT_HEADER = "-- ckpt "  # the first line of each of ckpt's scripts names it

# Round trips that are not the save protocol's: heartbeats (their own thread, once per
# interval) and script loading (once per server: redis-py's EVALSHA is answered NOSCRIPT,
# it loads the script and sends EVALSHA again).
NOT_PROTOCOL = frozenset({"EVALSHA:BEAT", "NOSCRIPT", "SCRIPT LOAD"})


def now_ns() -> int:
    """A system-wide monotonic clock: comparable between processes of this machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class LoggingPipeline(redis.client.Pipeline):
    """A pipeline that logs itself as one round trip."""

    def __init__(self, owner: LoggingRedis, transaction: bool) -> None:
        super().__init__(owner.connection_pool, owner.response_callbacks, transaction, None)
        self.owner = owner

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        name = "+".join(self.owner.command_name(args) for args, _ in self.command_stack)
        self.owner.before_send(name)
        start = now_ns()
        try:
            replies = list(super().execute(raise_on_error))
        finally:
            self.owner.commands.append((name, start, now_ns()))
        self.owner.on_replies(name, replies)
        self.owner.after_reply(name)
        return replies


class LoggingRedis(redis.Redis):
    """A redis-py client that logs every command and pipeline it sends, in ``commands``.

    ckpt's scripts are named by the first line of their text (``EVALSHA:REPORT``); a
    pipeline is one entry, its commands joined by ``+``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[Sent] = []
        self.script_names: dict[str, str] = {}  # SHA -> name
        self.scripts: dict[str, Script] = {}  # name -> script

    def register_script(self, script: Any) -> Script:
        registered = super().register_script(script)
        text = script.decode() if isinstance(script, bytes) else str(script)
        first = text.split("\n", 1)[0]
        if first.startswith(SCRIPT_HEADER):
            name = first.removeprefix(SCRIPT_HEADER)
            self.script_names[registered.sha] = name
            self.scripts[name] = registered
        return registered

    def command_name(self, args: tuple[Any, ...]) -> str:
        """``EVALSHA:<script>`` for ckpt's scripts, else the command's name."""
        name = str(args[0]).upper()
        if name == "EVALSHA":
            sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
            return f"EVALSHA:{self.script_names.get(sha, 'other')}"
        return name

    def execute_command(self, *args: Any, **options: Any) -> Any:
        name = self.command_name(args)
        self.before_send(name)
        start = now_ns()
        try:
            reply = super().execute_command(*args, **options)
        except redis.exceptions.NoScriptError:
            name = "NOSCRIPT"  # redis-py loads the script and sends it again
            raise
        finally:
            self.commands.append((name, start, now_ns()))
        self.after_reply(name)
        return reply

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> LoggingPipeline:
        return LoggingPipeline(self, transaction)

    def on_replies(self, name: str, replies: list[Any]) -> None:
        """Called with every pipeline's replies (a subclass may look at them)."""

    def before_send(self, name: str) -> None:
        """Called before each command or pipeline is sent (a subclass may act on it)."""

    def after_reply(self, name: str) -> None:
        """Called once each command or pipeline was answered (a subclass may act on it)."""

    @property
    def round_trips(self) -> int:
        """Round trips of the save protocol so far: every command and pipeline sent, less
        heartbeats and script loading."""
        return sum(1 for name, _, _ in self.commands if name not in NOT_PROTOCOL)


class ClientLog:
    """A ``client_factory`` for ``RedisCoordinator`` that builds ``LoggingRedis`` clients
    and keeps them in the order built."""

    def __init__(self) -> None:
        self.clients: list[LoggingRedis] = []

    def __call__(self, url: str, **options: Any) -> LoggingRedis:
        client = cast(LoggingRedis, redis_client(url, redis_class=LoggingRedis, **options))
        self.clients.append(client)
        return client


def job_key(job: str, *parts: object) -> str:
    """The name of one of ``job``'s keys: ``ckpt:{<job>}:<parts>`` (its hash tag)."""
    return f"ckpt:{{{job}}}:" + ":".join(str(p) for p in parts)


def describe_state(client: Any, job: str) -> dict[str, str]:
    """The job's keys and their types."""
    return {key.decode(): client.type(key).decode() for key in client.scan_iter(job_key(job, "*"))}


class KillSwitch(ClientLog):
    """A ``client_factory`` whose clients SIGKILL the redis-server ``pid`` once, just before
    (``when="before"``) or just after (``"after"``) the first command or pipeline that
    includes ``command`` (``EVALSHA:CLAIM``, ``BLPOP``, ``ZREM`` ...) once ``arm()`` was
    called. ``fired`` says whether it did. Build it in the process that runs the ranks.
    """

    def __init__(self, pid: int, command: str, when: str) -> None:
        super().__init__()
        self.pid = pid
        self.command = command
        self.when = when
        self.armed = False
        self.fired = threading.Event()
        self._lock = threading.Lock()

    def arm(self) -> None:
        self.armed = True

    def __call__(self, url: str, **options: Any) -> LoggingRedis:
        client = cast(_SwitchedRedis, redis_client(url, redis_class=_SwitchedRedis, **options))
        client.switch = self
        self.clients.append(client)
        return client

    def trip(self, name: str, when: str) -> None:
        if not (self.armed and when == self.when and self.command in name.split("+")):
            return
        with self._lock:  # the heartbeat thread sends too
            if not self.fired.is_set():
                self.fired.set()
                os.kill(self.pid, signal.SIGKILL)


class _SwitchedRedis(LoggingRedis):
    switch: KillSwitch

    def before_send(self, name: str) -> None:
        self.switch.trip(name, "before")

    def after_reply(self, name: str) -> None:
        self.switch.trip(name, "after")

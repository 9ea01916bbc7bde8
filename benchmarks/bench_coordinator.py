"""Scale benchmark of the Redis coordinator protocol: 256 to 4096 simulated ranks.

    .venv/bin/python -m benchmarks.bench_coordinator [--ranks 256,1024,4096] [--steps 3]
        [--warmup 1] [--real-ranks 256] [--threads-per-proc 256] [--replicas-per-proc 2048]
        [--tensors 4] [--piece-mib 16] [--heartbeat-seconds 4] [--straggler-seconds 2.5]
        [--straggler-max-ranks 1024] [--heartbeat-ttl 600] [--format 2] [--json OUT]

A full run (256, 1024 and 4096 ranks, one format) takes 2-4 minutes on 2 loaded cores
and needs an open-file limit of about 2 x 4096 + 64 (raised to the hard limit when
allowed).

It starts its own ``redis-server`` (``--save "" --appendonly no``) on a free loopback
port (never a shared one) and, for each world size N, drives the real
``ckpt.coordination.RedisCoordinator``, one coordinator and one connection per simulated rank:

- the committer (rank 0) runs alone in its own process, as it would on a real job. It
  takes the generation, then per step calls ``begin(step)`` when the step is armed
  (its reader starts taking reports from Redis as they arrive, in the background, as
  on a real job while rank 0 writes its own data) and, at the start signal,
  ``commit(...)`` with its own index: it waits for the reader, claims the step,
  builds and publishes the manifest to a temporary local directory (``LocalBackend``,
  fsync included; timed separately and left out of the protocol latency), then marks
  the step committed;
- ranks 1..N-1 report with a valid ``ShardIndex``, then wait for the outcome. In format
  v2 (``--format 2``, the default) a report pins the rank's index file
  (``WriterRef``: path, size, seal), lists its data file and that index file and its
  timing, and describes no layouts: rank 0's own report describes the layouts of every
  tensor (grids, ``infer_layout``), and the manifest is v2 (about 450 B per report). In
  format v1 (``--format 1``) a report holds every piece the rank stored: ``--tensors``
  Shard(0) pieces of ``--piece-mib`` MiB with one checksum per MiB chunk, two small
  replicated tensors written by one rank each (about 2.6 KiB of JSON; that is also
  the content of the v2 index file). ``--format 2,1`` measures both, interleaved step by
  step (the same load for each). Index files need not exist for the protocol; empty
  stand-ins are placed with the data files, which the committer lists. The
  first ``--real-ranks`` of them are threads (``--threads-per-proc`` per process), each
  with its own ``RedisCoordinator`` calling ``report(step, index_json)`` and
  ``wait_outcome(step)``. The rest are replicas (``--replicas-per-proc`` per process,
  one asyncio connection each): before every step a shadow ``RedisCoordinator`` of the
  same rank, with a client that records instead of sending, runs ``report`` and
  ``wait_outcome``; the replica then sends exactly those commands (same keys,
  arguments and script SHA; the blocking pop again, with the check between pops,
  whenever it times out) and counts them as the shadow sent them. 4096 threads
  running ``RedisCoordinator`` need more CPU than two cores have. The simulated ranks
  run at nice 10, below the committer and Redis (on a real job they are other hosts
  and cannot take the committer's CPU). Every rank is
  connected and waiting before the step; a start signal then releases all of them at
  once (a worst-case burst of reports: in a real job reports spread over the ranks'
  write times, which leaves the committer's reader more time per report).

Each coordinator gets, through its ``client_factory``, a redis-py client that logs every
command and pipeline it sends (``tests/coordination/redis_helpers.LoggingRedis``), so
round trips are counted both as the save protocol's (every round trip but heartbeats and
script loading) and as every network round trip a rank really made. The committer loads
ckpt's scripts into the server first and tells this process their names (the first line
of each script names it). Timestamps are ``CLOCK_MONOTONIC``, comparable across the
processes of this machine.

Per world size it reports (medians and maxima over the measured steps):

- round trips per rank per checkpoint: mean and max over the non-committers, and the
  committer's, split into its reads of reports, checks, the claim and the commit;
- commit latency: from the moment the committer's reader has the last report (its
  read returns) to the reply of the COMMIT script, without the manifest build +
  publish (shown beside it), split into merging the last batch (and its size), the
  CLAIM round trip and the COMMIT round trip; the same from Redis's own timestamp of the last report
  (the stream entry ID, whole milliseconds of the server clock); and to the moment the
  last waiter wakes. The latency from the last reporter's own reply timestamp is shown
  too (that thread shares a GIL with hundreds of others, so its clock reading can lag);
- Redis-side script times (SLOWLOG, threshold 250 us), call counts (INFO
  commandstats, reset per step) and Redis CPU;
- Redis memory (INFO memory, polled every 2 ms from another connection): before the
  step, the peak rise during it (the reader trims the reports it has merged, so only
  unread reports are held), split into keys (``used_memory_dataset``) and client
  buffers, the Lua VM peak, and what the step leaves behind once its per-step keys are
  gone (MEMORY USAGE of the job's keys);
- the committer's Python work for N reports measured in one process without Redis
  (parse + merge per report, build, manifest serialisation), to tell it apart from
  Redis and contention.

Then, informative only: the load of N ranks' heartbeat loops (ckpt's BEAT script per
rank per second; threads for the real ranks, the shadow's commands for replicas); the
cost of the committer's once-per-second check of N heartbeats; and, up to
``--straggler-max-ranks``, a step whose last rank reports ``--straggler-seconds``
late (the heartbeat set is kept fresh for all N ranks by one bulk ZADD every 0.5 s
from this process), to show that waiting ranks do not poll.

The simulated ranks use a heartbeat TTL of ``--heartbeat-ttl`` (600 s) instead of
ckpt's 15 s: hundreds of threads per GIL on a loaded 2-core machine can go that long
without running, and liveness is not what is measured here. (With ckpt's 15 s a
waiting rank's slice is 7.5 s; either way no rank polls in a step that commits
within the slice.)

Machine notes: all simulated ranks share this machine's cores, so report round trips
and the wake-up fan-out after the commit are dominated by scheduling here (real ranks
run on their own hosts). Redis-side times (SLOWLOG, commandstats) and the committer's
own work are the robust numbers. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from ckpt.coordination import ManifestBuilder, RedisCoordinator
from ckpt.format import (
    DATA_DIR,
    DEFAULT_CHUNK_BYTES,
    INDEX_DIR,
    Box,
    RankTiming,
    ShardIndex,
    StoredPiece,
    TensorEntry,
    WriterRef,
    infer_layout,
    seal_digest,
    step_prefix,
)
from storage_backends import LocalBackend
from tests.coordination import redis_helpers
from tests.coordination.redis_helpers import Sent, now_ns
from tests.support.redis_server import RedisServer, redis_server_binary

COLS = 4096  # columns of every simulated global tensor (float32: 16 KiB per row)
ROW_BYTES = COLS * 4
HEADER_BYTES = 1024  # a plausible safetensors header per data file
REPLICATED = 2  # small replicated tensors per state (written by one rank each)
SLOWLOG_US = 250
POLL_S = 0.002
THREAD_STACK = 256 << 10
# Simulated ranks stand in for other hosts: on this machine they run at a lower CPU
# priority than the committer and Redis, so that thousands of them waking at once do
# not delay the committer's own round trips (on a real job they cannot).
SIMULATED_NICE = 10
TARGET_ROUND_TRIPS = 3
TARGET_LATENCY_MS = 20.0
TARGET_AT = 4096
# SHA -> name of ckpt's scripts, in this process: the committer's client learns them and
# tells the parent (for SLOWLOG).
SCRIPT_NAMES: dict[str, str] = {}
# Every rank reports a timing, as ckpt's ranks do (the manifest then records them all).
TIMING = RankTiming(started_unix=1.8e9, stall_s=0.0123, persist_s=0.4567, retries=0)


def ms(ns: float) -> float:
    return ns / 1e6


# --------------------------------------------------------------------------- the simulated state


def shard_index(
    rank: int, world: int, *, tensors: int, piece_bytes: int, generation: str
) -> ShardIndex:
    """What rank ``rank`` reports in format v1: its Shard(0) rows of every large tensor
    (its index file's content in format v2)."""
    rows = max(1, piece_bytes // ROW_BYTES)
    nbytes = rows * ROW_BYTES
    chunks = math.ceil(nbytes / DEFAULT_CHUNK_BYTES)
    path = f"data/{generation}-r{rank:05d}-000.safetensors"
    entries: dict[str, TensorEntry] = {}
    offset = HEADER_BYTES
    for i in range(tensors):
        digests = "".join(f"{(rank << 32 | i << 16 | c) & (2**64 - 1):016x}" for c in range(chunks))
        piece = StoredPiece.at(
            Box((rank * rows, 0), (rows, COLS)), path, offset, nbytes, "raw", digests
        )
        entries[f"layers.{i}.weight"] = TensorEntry("float32", (world * rows, COLS), (piece,))
        offset += nbytes
    for i in range(REPLICATED):
        pieces: tuple[StoredPiece, ...] = ()
        if i % world == rank:  # the writer chosen for this replicated tensor
            pieces = (
                StoredPiece.at(Box((0,), (COLS,)), path, offset, ROW_BYTES, "raw", f"{i:016x}"),
            )
            offset += ROW_BYTES
        entries[f"layers.{i}.norm"] = TensorEntry("float32", (COLS,), pieces)
    state = {"meta": {"epoch": 1, "note": "bench"}} if rank == 0 else None
    return ShardIndex(rank=rank, tensors=entries, files={path: offset}, state=state, timing=TIMING)


def index_path(generation: str, rank: int) -> str:
    """Rank ``rank``'s index file in format v2 (ckpt draws the 8 hex digits at random)."""
    return f"{INDEX_DIR}/{generation}-r{rank:05d}-{rank * 2654435761 % 2**32:08x}.json"


def writer_report(
    rank: int, world: int, *, tensors: int, piece_bytes: int, generation: str
) -> ShardIndex:
    """What rank ``rank`` reports in format v2 (as ``ckpt.engine._job.writer_report``): the
    index file it wrote (its pieces, sealed), its data files and that index file, its
    timing, and the layouts it describes: rank 0 describes every tensor, the others none."""
    v1 = shard_index(rank, world, tensors=tensors, piece_bytes=piece_bytes, generation=generation)
    stored = {name: e for name, e in v1.tensors.items() if e.pieces}
    data = ShardIndex(rank=rank, tensors=stored, files=v1.files).to_bytes()
    layouts: dict[str, TensorEntry] = {}
    if rank == 0:
        rows = max(1, piece_bytes // ROW_BYTES)
        for i in range(tensors):
            shape = (world * rows, COLS)
            cells = [((r * rows, 0), (rows, COLS), r) for r in range(world)]
            layouts[f"layers.{i}.weight"] = TensorEntry(
                "float32", shape, (), infer_layout(shape, cells)
            )
        for i in range(REPLICATED):
            cell = ((0,), (COLS,), i % world)
            layouts[f"layers.{i}.norm"] = TensorEntry(
                "float32", (COLS,), (), infer_layout((COLS,), [cell])
            )
    path = index_path(generation, rank)
    return ShardIndex(
        rank=rank,
        tensors=layouts,
        files={**v1.files, path: len(data)},
        state=v1.state,
        timing=TIMING,
        writer=WriterRef(rank, path, len(data), seal_digest(data)),
    )


def report(
    version: int, rank: int, world: int, *, tensors: int, piece_bytes: int, generation: str
) -> ShardIndex:
    """Rank ``rank``'s report in format ``version``."""
    make = writer_report if version == 2 else shard_index
    return make(rank, world, tensors=tensors, piece_bytes=piece_bytes, generation=generation)


# --------------------------------------------------------------------------- redis plumbing


class LoggingRedis(redis_helpers.LoggingRedis):
    """The shared logging client, which also keeps what each read of the reports returned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int, int, str]] = []  # reply ns, entries, last entry ID

    def on_replies(self, name: str, replies: list[Any]) -> None:
        if name.endswith("XREAD") and replies and replies[-1]:
            entries = replies[-1][0][1]
            if entries:
                self.reads.append((now_ns(), len(entries), entries[-1][0].decode()))


def client_for(port: int) -> LoggingRedis:
    return LoggingRedis(
        host="127.0.0.1", port=port, socket_connect_timeout=10, health_check_interval=0
    )


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphaned ranks or servers)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class BenchRedis:
    """Our own redis-server (``tests.support.redis_server``: a free loopback port, no
    persistence) set up for thousands of clients, with the server-side figures we report."""

    def __init__(self, directory: Path, maxclients: int) -> None:
        if redis_server_binary() is None:
            raise SystemExit("redis-server is not on PATH")
        settings = [
            "--maxclients",
            str(maxclients),
            "--tcp-backlog",
            "4096",
            "--slowlog-log-slower-than",
            str(SLOWLOG_US),
            "--slowlog-max-len",
            "100000",
        ]
        try:
            self.server = RedisServer(directory, extra_args=settings, preexec_fn=die_with_parent)
        except RuntimeError as exc:
            raise SystemExit(f"redis-server did not start: {exc}") from None
        self.port = self.server.port
        self.client: Any = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        self.version = self.client.info("server")["redis_version"]
        self.maxclients = int(self.client.config_get("maxclients")["maxclients"] or maxclients)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def commandstats(self) -> dict[str, dict[str, float]]:
        return {k.removeprefix("cmdstat_"): v for k, v in self.client.info("commandstats").items()}

    def script_times(self) -> dict[str, list[int]]:
        """Microseconds of every slow-logged command, by script or command name; then reset the log."""
        out: dict[str, list[int]] = {}
        for entry in self.client.slowlog_get(100000):
            words = entry["command"].split()
            if not words:
                continue
            if len(words) > 1 and words[0].upper() == b"EVALSHA":
                name = SCRIPT_NAMES.get(words[1].decode(), "other")
            else:
                name = words[0].decode().upper()
            out.setdefault(name, []).append(int(entry["duration"]))
        self.client.slowlog_reset()
        return out

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


MEMORY_FIELDS = ("used_memory", "used_memory_dataset", "mem_clients_normal", "used_memory_vm_eval")


def memory_sample(client: Any) -> dict[str, int]:
    """INFO memory: total, keys (dataset), client buffers and the Lua VM, in bytes."""
    info = client.info("memory")
    sample = {k: int(info.get(k, 0)) for k in MEMORY_FIELDS}
    if sample["used_memory_dataset"] > sample["used_memory"]:
        # Redis computes it as an unsigned difference that wraps around while a large
        # reply sits in a client's output buffer; such a sample says nothing.
        sample["used_memory_dataset"] = 0
    return sample


class MemoryPoller:
    """Polls INFO memory from its own connection; keeps the peak of each field."""

    def __init__(self, port: int) -> None:
        self._client: Any = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        self._stop = threading.Event()
        self.peak = dict.fromkeys(MEMORY_FIELDS, 0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in memory_sample(self._client).items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(POLL_S)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self._client.close()
        return self.peak


def job_key_bytes(client: Any, job: str) -> tuple[int, int]:
    """(number of keys, MEMORY USAGE summed) of one job's keys."""
    keys = list(client.scan_iter(f"ckpt:{{{job}}}:*", count=1000))
    return len(keys), sum(int(client.memory_usage(k) or 0) for k in keys)


# --------------------------------------------------------------------------- child processes


@dataclass(frozen=True)
class Spec:
    """What a child process simulates."""

    port: int
    job: str
    world: int
    ranks: tuple[int, ...]
    tensors: int
    piece_bytes: int
    generation: str = ""
    manifest_dir: str = ""
    heartbeat_ttl: float = 600.0
    formats: tuple[int, ...] = (2,)

    def reports(self, rank: int) -> dict[int, ShardIndex]:
        """Rank ``rank``'s report in each format measured."""
        return {
            version: report(
                version,
                rank,
                self.world,
                tensors=self.tensors,
                piece_bytes=self.piece_bytes,
                generation=self.generation,
            )
            for version in self.formats
        }


def _coordinator(
    spec: Spec, rank: int, client: redis.Redis | None, *, heartbeat: bool
) -> RedisCoordinator:
    """A coordinator on ``client`` (connected beforehand; None: its own)."""
    return RedisCoordinator(
        f"redis://127.0.0.1:{spec.port}/0",
        job=spec.job,
        rank=rank,
        world_size=spec.world,
        generation=spec.generation or None,
        start_heartbeat=heartbeat,
        timeout=600.0,
        heartbeat_ttl=spec.heartbeat_ttl,
        client_factory=None if client is None else lambda _url, **_options: client,
    )


def committer_main(conn: Connection, spec: Spec) -> None:
    """Rank 0: takes the generation; per step ``begin`` when armed and ``commit`` at the signal."""
    die_with_parent()
    client = client_for(spec.port)
    coord = _coordinator(spec, 0, client, heartbeat=False)  # generation=None: rank 0 takes one
    for script in client.scripts.values():
        client.script_load(script.script)  # the replicas call EVALSHA directly
    conn.send((coord.generation, client.script_names))
    own = replace(spec, generation=coord.generation).reports(0)
    backend = LocalBackend(spec.manifest_dir)
    beating: RedisCoordinator | None = None
    rt0 = c0 = r0 = 0
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            coord.close()
            conn.send("closed")
            return
        if msg[0] == "arm":
            rt0, c0, r0 = client.round_trips, len(client.commands), len(client.reads)
            coord.begin(msg[1], DEFAULT_CHUNK_BYTES)  # its reader takes reports from now on
            conn.send("armed")
            continue
        if msg[0] == "hb_start":
            beating = _coordinator(
                replace(spec, generation=coord.generation), 0, None, heartbeat=True
            )
            conn.send("ok")
            continue
        if msg[0] == "hb_stop":
            if beating is not None:
                beating.close()
            conn.send("ok")
            continue
        _, step, version = msg  # "go"
        try:
            manifest = coord.commit(
                backend, step, own[version], chunk_bytes=DEFAULT_CHUNK_BYTES, user_metadata={}
            )
        except Exception as exc:  # reported to the parent
            conn.send(f"committer: {exc!r}")
            continue
        assert manifest is not None
        sent = client.commands[c0:]
        wake, last_batch, _ = client.reads[r0:][-1]

        def timed(script: str, sent: list[Sent] = sent) -> tuple[int, int]:
            return next(
                (start, end) for name, start, end in reversed(sent) if name == f"EVALSHA:{script}"
            )

        conn.send(
            {
                "wake": wake,
                "last_batch": last_batch,
                "claim": timed("CLAIM"),
                "commit": timed("COMMIT"),
                "round_trips": client.round_trips - rt0,
                "commands": len(sent),
                "reads": sum(1 for name, _, _ in sent if name.endswith("XREAD")),
                "checks": sum(1 for name, _, _ in sent if name == "EVALSHA:WATCH"),
                "manifest_bytes": len(manifest.to_bytes()),
            }
        )


@dataclass
class RankRecord:
    rank: int
    reported_count: int
    sent: int
    replied: int
    woken: int
    round_trips: int
    commands: int
    extra: dict[str, int]
    replica: bool = False  # a protocol replica (asyncio) rather than a RedisCoordinator thread


def _rank_step(
    coord: RedisCoordinator,
    client: LoggingRedis,
    index: bytes,
    step: int,
    delay: float,
    go: threading.Event,
    out: list[RankRecord | BaseException],
) -> None:
    try:
        go.wait()
        if delay:
            time.sleep(delay)
        rt0, c0 = client.round_trips, len(client.commands)
        sent = now_ns()
        count = coord.report(step, index)
        replied = now_ns()
        coord.wait_outcome(step)
        woken = now_ns()
        names = Counter(name for name, _, _ in client.commands[c0:])
        extra = {k: v for k, v in names.items() if k not in ("EVALSHA:REPORT", "BLPOP")}
        out.append(
            RankRecord(
                coord.rank,
                count,
                sent,
                replied,
                woken,
                client.round_trips - rt0,
                sum(names.values()),
                extra,
            )
        )
    except BaseException as exc:  # reported to the parent, which stops the run
        out.append(exc)


def ranks_main(conn: Connection, spec: Spec) -> None:
    """Simulates ``spec.ranks`` (never rank 0), one thread + coordinator + connection each."""
    die_with_parent()
    os.nice(SIMULATED_NICE)
    threading.stack_size(THREAD_STACK)
    clients = {r: client_for(spec.port) for r in spec.ranks}
    coords = {r: _coordinator(spec, r, clients[r], heartbeat=False) for r in spec.ranks}
    indexes = {
        r: {version: index.to_bytes() for version, index in spec.reports(r).items()}
        for r in spec.ranks
    }
    for c in clients.values():
        c.ping()  # connect now, not inside the timed step
    beating: list[RedisCoordinator] = []
    conn.send(("ready", {v: len(data) for v, data in next(iter(indexes.values())).items()}))
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            for coord in coords.values():
                coord.close()
            conn.send("closed")
            return
        if msg[0] == "hb_start":
            beating = [_coordinator(spec, r, None, heartbeat=True) for r in spec.ranks]
            conn.send("ok")
            continue
        if msg[0] == "hb_stop":
            for coord in beating:
                coord.close()
            beating = []
            conn.send("ok")
            continue
        _, step, delays, version = msg  # "arm": start every thread; it waits for "go"
        go = threading.Event()
        out: list[RankRecord | BaseException] = []
        threads = [
            threading.Thread(
                target=_rank_step,
                args=(
                    coords[r],
                    clients[r],
                    indexes[r][version],
                    step,
                    delays.get(r, 0.0),
                    go,
                    out,
                ),
                daemon=True,
            )
            for r in spec.ranks
        ]
        for t in threads:
            t.start()
        conn.send("armed")
        conn.recv()  # "go"
        go.set()
        for t in threads:
            t.join()
        errors = [e for e in out if isinstance(e, BaseException)]
        if errors:
            conn.send(f"{len(errors)} simulated ranks failed, e.g. {errors[0]!r}")
        else:
            conn.send([asdict(r) for r in out if isinstance(r, RankRecord)])


# --------------------------------------------------------------------------- protocol replicas


def encode(*args: bytes | str | int | float) -> bytes:
    """One RESP2 command, its arguments encoded as redis-py encodes them."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class Resp:
    """A minimal RESP2 connection on asyncio: a replica's transport."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Resp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        return cls(reader, writer)

    async def call(self, *args: bytes | str | int | float) -> Any:
        self.writer.write(encode(*args))
        return await self.read()

    async def read(self) -> Any:
        line = await self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else (await self.reader.readexactly(n + 2))[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [await self.read() for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        raise redis.ResponseError(rest.decode(errors="replace"))

    def close(self) -> None:
        self.writer.close()


Command = tuple[Any, ...]


class RecordingPipeline(redis.client.Pipeline):
    """A pipeline whose ``execute`` records its commands instead of sending them."""

    def __init__(self, owner: ScriptedRedis) -> None:
        super().__init__(owner.connection_pool, owner.response_callbacks, False, None)
        self.owner = owner

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands = [args for args, _ in self.command_stack]
        self.owner.sent.extend(commands)
        self.reset()
        return [1] * len(commands)


class ScriptedRedis(LoggingRedis):
    """Stands in for redis-py inside a ``RedisCoordinator``, without a server: it records
    every command the coordinator sends (each one round trip) and answers from ``answers``
    (by command name)."""

    def __init__(self) -> None:
        super().__init__(host="127.0.0.1", port=1)  # never connects
        self.sent: list[Command] = []
        self.answers: dict[str, list[Any]] = {}

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(args)
        queue = self.answers.get(str(args[0]).upper())
        return queue.pop(0) if queue else None

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return RecordingPipeline(self)

    def take(self) -> list[Command]:
        sent, self.sent = self.sent, []
        return sent


@dataclass
class Script:
    """What a RedisCoordinator sends for one step, and its round trips."""

    report: Command
    pop: Command  # the blocking pop on the outcome list
    checks: list[Command]  # what it sends between two pops that time out
    report_round_trips: int
    pop_round_trips: int
    check_round_trips: int


class Replica:
    """A non-committer whose commands come from a real ``RedisCoordinator``, sent on asyncio.

    A shadow coordinator (same job, rank, world size and generation, a ``ScriptedRedis``
    client) runs ``report`` and ``wait_outcome`` before each step, once with a pop that
    returns at once and once with a pop that times out; that yields the exact commands
    (keys, arguments, script SHA) ckpt sends, each one round trip. In the step the replica
    sends them itself: the report, then the pop, and the check between pops whenever a pop
    times out, until the outcome arrives. It does not re-implement ckpt's decisions between
    pops (it stops on any answer but "alive"), and its heartbeat is the command a shadow
    with a heartbeat sends when it starts, once per second. It costs a fraction of a
    thread's CPU, so thousands of ranks fit on two cores.
    """

    def __init__(self, spec: Spec, rank: int, conn: Resp, indexes: dict[int, bytes]) -> None:
        self.spec, self.rank, self.conn, self.indexes = spec, rank, conn, indexes
        self.shadow = ScriptedRedis()
        self.coord = _coordinator(spec, rank, self.shadow, heartbeat=False)

    def script(self, step: int, version: int) -> Script:
        shadow, coord = self.shadow, self.coord
        shadow.take()
        shadow.answers = {"EVALSHA": [[b"OK", b"1"]]}
        coord.report(step, self.indexes[version])
        reported = shadow.take()
        shadow.answers = {"BLPOP": [[b"done", b"committed"]]}
        coord.wait_outcome(step)
        popped = shadow.take()
        shadow.answers = {"BLPOP": [None, [b"done", b"committed"]], "EVALSHA": [[b"OK", b"0"]]}
        coord.wait_outcome(step)
        checks = shadow.take()[1:-1]
        return Script(reported[-1], popped[-1], checks, len(reported), len(popped), len(checks))

    async def run_step(self, script: Script, delay: float, go: asyncio.Event) -> RankRecord:
        await go.wait()
        if delay:
            await asyncio.sleep(delay)
        extra = Counter[str]()
        sent = now_ns()
        status, detail = await self.conn.call(*script.report)
        replied = now_ns()
        if status != b"OK":
            raise RuntimeError(f"rank {self.rank}: report refused: {status!r} {detail!r}")
        round_trips, commands = script.report_round_trips, 1
        deadline = time.monotonic() + 600.0
        while time.monotonic() < deadline:
            got = await self.conn.call(*script.pop)
            round_trips += script.pop_round_trips
            commands += 1
            if got is not None:
                if got[1] != b"committed":
                    raise RuntimeError(f"rank {self.rank}: the step was aborted")
                return RankRecord(
                    self.rank,
                    int(detail),
                    sent,
                    replied,
                    now_ns(),
                    round_trips,
                    commands,
                    dict(extra),
                    replica=True,
                )
            for check in script.checks:
                reply = await self.conn.call(*check)
                extra[self.shadow.command_name(check)] += 1
                if reply[0] != b"OK" or reply[1] != b"0":
                    raise RuntimeError(f"rank {self.rank}: the check between pops says {reply!r}")
            round_trips += script.check_round_trips
            commands += len(script.checks)
        raise RuntimeError(f"rank {self.rank}: no outcome within 600 s")

    def heartbeat_command(self) -> Command:
        """The heartbeat this rank's coordinator sends: a shadow with a heartbeat beats
        once as it starts."""
        shadow = ScriptedRedis()
        _coordinator(self.spec, self.rank, shadow, heartbeat=True).close()
        return shadow.take()[0]

    async def heartbeat(self, conn: Resp) -> None:
        """The coordinator's heartbeat command once per second (ckpt's loop)."""
        beat = self.heartbeat_command()
        while True:
            await conn.call(*beat)
            await asyncio.sleep(1.0)


def replicas_main(conn: Connection, spec: Spec) -> None:
    """Simulates ``spec.ranks`` as replicas on one event loop."""
    die_with_parent()
    os.nice(SIMULATED_NICE)
    asyncio.run(_replicas(conn, spec))


async def _replicas(conn: Connection, spec: Spec) -> None:
    loop = asyncio.get_running_loop()

    async def recv() -> Any:
        return await loop.run_in_executor(None, conn.recv)

    replicas = [
        Replica(
            spec,
            r,
            await Resp.connect(spec.port),
            {version: index.to_bytes() for version, index in spec.reports(r).items()},
        )
        for r in spec.ranks
    ]
    beating: list[tuple[Resp, asyncio.Task[None]]] = []
    conn.send(("ready", {v: len(data) for v, data in replicas[0].indexes.items()}))
    while True:
        msg = await recv()
        if msg[0] == "close":
            for rep in replicas:
                rep.conn.close()
            conn.send("closed")
            return
        if msg[0] == "hb_start":
            for rep in replicas:
                hb_conn = await Resp.connect(spec.port)
                beating.append((hb_conn, asyncio.create_task(rep.heartbeat(hb_conn))))
            conn.send("ok")
            continue
        if msg[0] == "hb_stop":
            for hb_conn, task in beating:
                task.cancel()
                hb_conn.close()
            beating = []
            conn.send("ok")
            continue
        _, step, delays, version = msg  # "arm"
        go = asyncio.Event()
        tasks = [
            asyncio.create_task(
                rep.run_step(rep.script(step, version), delays.get(rep.rank, 0.0), go)
            )
            for rep in replicas
        ]
        conn.send("armed")
        await recv()  # "go"
        go.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            conn.send(f"{len(errors)} protocol replicas failed, e.g. {errors[0]!r}")
        else:
            conn.send([asdict(r) for r in results if isinstance(r, RankRecord)])


# --------------------------------------------------------------------------- one world size


class StepFailed(RuntimeError):
    """A step did not commit (a simulated rank or the committer raised)."""


@dataclass
class StepResult:
    """The measurements of one step."""

    world: int
    step: int
    straggler_s: float
    reports_ms: float  # start signal -> last report reply
    report_rtt_p50_ms: float
    report_rtt_p99_ms: float
    latency_ms: float  # Redis: last report stored -> step marked committed, less the manifest
    latency_redis_with_manifest_ms: float  # the same with the manifest build + publish
    latency_reader_ms: float  # committer's reader has the last report -> COMMIT reply, no manifest
    latency_with_manifest_ms: float
    wake_ms: float  # last reporter's reply timestamp -> the read that brought it returned
    tail_merge_ms: float  # that read -> CLAIM sent: merging the last batch and rank 0's own index
    last_batch: int  # reports the committer's last read brought
    claim_rtt_ms: float
    manifest_ms: float  # CLAIM reply -> COMMIT sent: build, serialise, publish with fsync
    commit_rtt_ms: float
    last_waiter_ms: float  # committer's reader has the last report -> last waiter woke
    fanout_first_ms: float  # mark_committed reply -> first / median / last waiter woke
    fanout_median_ms: float
    fanout_last_ms: float
    rt_max: int  # RedisCoordinator threads: the save protocol's round trips
    rt_mean: float
    cmds_max: int  # RedisCoordinator threads: every command sent
    cmds_mean: float
    replica_rt_max: int  # protocol replicas: the save protocol's round trips
    replica_rt_mean: float
    replica_cmds_max: int
    replica_cmds_mean: float
    committer_rt: int
    committer_cmds: int
    committer_reads: int
    committer_checks: int
    extra_commands: dict[str, int]
    redis_scripts_us: dict[str, list[int]]
    redis_calls: dict[str, int]
    redis_usec_per_call: dict[str, float]
    redis_cpu_s: float
    wall_s: float
    mem_before: dict[str, int]  # MEMORY_FIELDS
    mem_peak: dict[str, int]
    mem_after: dict[str, int]
    job_keys_after: int
    job_key_bytes_before: int  # MEMORY USAGE of the job's keys
    job_key_bytes_after: int
    manifest_bytes: int
    spread_s: float = 0.0
    format: int = 1

    def peak_delta(self, key: str = "used_memory") -> int:
        return self.mem_peak[key] - self.mem_before[key]

    @property
    def max_round_trips(self) -> int:
        """The most protocol round trips any non-committer made in this step."""
        return max(self.rt_max, self.replica_rt_max)

    @property
    def max_commands(self) -> int:
        return max(self.cmds_max, self.replica_cmds_max)

    @property
    def kept_bytes(self) -> int:
        """What the step left in Redis once its per-step keys are gone."""
        return self.job_key_bytes_after - self.job_key_bytes_before


class World:
    """The processes simulating one world size against one redis-server."""

    def __init__(
        self, server: BenchRedis, world: int, args: argparse.Namespace, manifest_dir: Path
    ) -> None:
        self.server = server
        self.world = world
        self.manifest_dir = manifest_dir
        self.job = f"bench-{world}-{os.getpid()}"
        ctx = mp.get_context("spawn")
        base = Spec(
            server.port,
            self.job,
            world,
            (),
            args.tensors,
            args.piece_mib << 20,
            manifest_dir=str(manifest_dir),
            heartbeat_ttl=args.heartbeat_ttl,
            formats=tuple(args.formats),
        )
        self.committer_conn, child = ctx.Pipe()
        self.committer = ctx.Process(target=committer_main, args=(child, base), daemon=True)
        self.committer.start()
        self.generation, names = self.committer_conn.recv()  # it has loaded ckpt's scripts
        SCRIPT_NAMES.update(names)
        self.scripts = {name: sha for sha, name in names.items()}
        others = list(range(1, world))
        real, replicas = others[: args.real_ranks], others[args.real_ranks :]
        self.real_ranks, self.replica_ranks = len(real), len(replicas)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for ranks, per_proc, target in (
            (real, args.threads_per_proc, ranks_main),
            (replicas, args.replicas_per_proc, replicas_main),
        ):
            procs = -(-len(ranks) // per_proc)
            for i in range(procs):
                spec = replace(base, ranks=tuple(ranks[i::procs]), generation=self.generation)
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=target, args=(child, spec), daemon=True)
                proc.start()
                self.conns.append(parent)
                self.procs.append(proc)
        sizes = [conn.recv()[1] for conn in self.conns]
        self.index_bytes = {v: max(s[v] for s in sizes) for v in args.formats}

    def _all(self, msg: tuple[Any, ...]) -> list[Any]:
        for conn in self.conns:
            conn.send(msg)
        return [conn.recv() for conn in self.conns]

    def _place_data_files(self, step: int) -> None:
        """Empty stand-ins for the data files the reports name, and for the index files of
        format v2: the committer checks that they exist (a listing) right before and after
        it publishes the manifest."""
        prefix = self.manifest_dir / step_prefix(step)
        for folder in (DATA_DIR, INDEX_DIR):
            (prefix / folder).mkdir(parents=True, exist_ok=True)
        for rank in range(self.world):
            (prefix / DATA_DIR / f"{self.generation}-r{rank:05d}-000.safetensors").touch()
            (prefix / index_path(self.generation, rank)).touch()

    def step(self, step: int, delays: dict[int, float], version: int) -> StepResult:
        self._place_data_files(step)
        srv = self.server
        self.committer_conn.send(("arm", step))
        self.committer_conn.recv()
        self._all(("arm", step, delays, version))
        srv.client.slowlog_reset()
        srv.client.config_resetstat()
        keys_before = job_key_bytes(srv.client, self.job)[1]
        mem_before = memory_sample(srv.client)
        cpu0 = srv.cpu_seconds()
        poller = MemoryPoller(srv.port)
        start = time.monotonic()
        self.committer_conn.send(("go", step, version))
        for conn in self.conns:
            conn.send(("go",))
        replies = [conn.recv() for conn in self.conns]
        committer = self.committer_conn.recv()
        wall = time.monotonic() - start
        mem_peak = poller.stop()
        cpu = srv.cpu_seconds() - cpu0
        failures = [r for r in [*replies, committer] if isinstance(r, str)]
        if failures:
            raise StepFailed(f"step {step}: " + "; ".join(failures))
        records = [RankRecord(**r) for reply in replies for r in reply]
        stats = srv.commandstats()
        time.sleep(0.2)  # client buffers shrink in the server's cron
        mem_after = memory_sample(srv.client)
        keys_after = job_key_bytes(srv.client, self.job)
        marks = srv.client.hmget(
            f"ckpt:{{{self.job}}}:step:{step}", "last_report_us", "committed_us"
        )
        committer["redis_commit_us"] = int(marks[1]) - int(marks[0])
        result = analyse(
            self.world,
            step,
            max(delays.values(), default=0.0),
            records,
            committer,
            srv.script_times(),
            stats,
            cpu,
            wall,
        )
        result.mem_before, result.mem_peak, result.mem_after = mem_before, mem_peak, mem_after
        result.job_keys_after, result.job_key_bytes_after = keys_after
        result.job_key_bytes_before = keys_before
        return result

    def heartbeats(self, on: bool) -> None:
        msg = ("hb_start" if on else "hb_stop",)
        self.committer_conn.send(msg)
        self.committer_conn.recv()
        self._all(msg)

    def close(self) -> None:
        self._all(("close",))
        self.committer_conn.send(("close",))
        self.committer_conn.recv()
        for proc in [*self.procs, self.committer]:
            proc.join(timeout=30)


def analyse(
    world: int,
    step: int,
    straggler: float,
    records: list[RankRecord],
    c: dict[str, Any],
    scripts: dict[str, list[int]],
    stats: dict[str, dict[str, float]],
    cpu: float,
    wall: float,
) -> StepResult:
    """Timings and counts of one step; the caller fills in the memory fields."""
    last = next(
        r for r in records if r.reported_count == world - 1
    )  # the report that completed the set
    t0 = min(r.sent for r in records) if records else c["wake"]
    t_last = last.replied if records else c["wake"]
    manifest_ns = c["commit"][0] - c["claim"][1]
    committed = c["commit"][1]
    rtts = sorted(r.replied - r.sent for r in records) or [0]
    fanout = sorted(r.woken - committed for r in records) or [0]
    extra: Counter[str] = Counter()
    for r in records:
        extra.update(r.extra)
    real = [r for r in records if not r.replica]
    replicas = [r for r in records if r.replica]
    return StepResult(
        world=world,
        step=step,
        straggler_s=straggler,
        reports_ms=ms(t_last - t0),
        report_rtt_p50_ms=ms(rtts[len(rtts) // 2]),
        report_rtt_p99_ms=ms(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]),
        latency_ms=c["redis_commit_us"] / 1e3 - ms(manifest_ns),
        latency_redis_with_manifest_ms=c["redis_commit_us"] / 1e3,
        latency_reader_ms=ms(committed - c["wake"] - manifest_ns),
        latency_with_manifest_ms=ms(committed - c["wake"]),
        wake_ms=ms(c["wake"] - t_last),
        tail_merge_ms=ms(c["claim"][0] - c["wake"]),
        last_batch=c["last_batch"],
        claim_rtt_ms=ms(c["claim"][1] - c["claim"][0]),
        manifest_ms=ms(manifest_ns),
        commit_rtt_ms=ms(c["commit"][1] - c["commit"][0]),
        last_waiter_ms=ms(max((r.woken for r in records), default=committed) - c["wake"]),
        fanout_first_ms=ms(fanout[0]),
        fanout_median_ms=ms(fanout[len(fanout) // 2]),
        fanout_last_ms=ms(fanout[-1]),
        rt_max=max((r.round_trips for r in real), default=0),
        rt_mean=statistics.fmean(r.round_trips for r in real) if real else 0.0,
        cmds_max=max((r.commands for r in real), default=0),
        cmds_mean=statistics.fmean(r.commands for r in real) if real else 0.0,
        replica_rt_max=max((r.round_trips for r in replicas), default=0),
        replica_rt_mean=statistics.fmean(r.round_trips for r in replicas) if replicas else 0.0,
        replica_cmds_max=max((r.commands for r in replicas), default=0),
        replica_cmds_mean=statistics.fmean(r.commands for r in replicas) if replicas else 0.0,
        committer_rt=c["round_trips"],
        committer_cmds=c["commands"],
        committer_reads=c["reads"],
        committer_checks=c["checks"],
        extra_commands=dict(extra),
        redis_scripts_us=scripts,
        redis_calls={k: int(v["calls"]) for k, v in stats.items()},
        redis_usec_per_call={k: float(v["usec_per_call"]) for k, v in stats.items()},
        redis_cpu_s=cpu,
        wall_s=wall,
        mem_before={},
        mem_peak={},
        mem_after={},
        job_keys_after=0,
        job_key_bytes_before=0,
        job_key_bytes_after=0,
        manifest_bytes=c["manifest_bytes"],
    )


@dataclass
class HeartbeatResult:
    world: int
    seconds: float
    zadd_per_s: float
    zadd_usec_per_call: float
    expire_usec_per_call: float
    redis_cpu_fraction: float
    check_ms: float  # the committer's check of N heartbeats (WATCH '*'), client side
    check_usec_redis: float  # the same, in Redis
    straggler: StepResult | None = None
    straggler_error: str | None = None


class HeartbeatRefresher:
    """Keeps all N ranks' heartbeats fresh with one bulk ZADD every 0.5 s (a stand-in
    for N heartbeat threads, so that starved simulated threads cannot abort a step)."""

    def __init__(self, port: int, key: str, world: int) -> None:
        self._client: Any = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        self._key, self._world = key, world
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        now = int(time.time() * 1000)
        self._client.zadd(self._key, {str(r): now for r in range(self._world)})

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


def measure_heartbeats(w: World, args: argparse.Namespace) -> HeartbeatResult:
    """Heartbeat load, the cost of the committer's heartbeat check, and a step with a straggler."""
    srv = w.server
    # 1. The load of N real heartbeat threads (ckpt's own loop: the BEAT script per second).
    w.heartbeats(True)
    time.sleep(1.5)  # every thread has beaten at least once
    srv.client.config_resetstat()
    cpu0, start = srv.cpu_seconds(), time.monotonic()
    time.sleep(args.heartbeat_seconds)
    cpu, seconds = srv.cpu_seconds() - cpu0, time.monotonic() - start
    stats = srv.commandstats()
    w.heartbeats(False)
    zadd = stats.get("zadd", {"calls": 0, "usec_per_call": 0.0})
    expire = stats.get("expire", {"calls": 0, "usec_per_call": 0.0})
    refresher = HeartbeatRefresher(srv.port, f"ckpt:{{{w.job}}}:hb:{w.generation}", w.world)
    try:
        # 2. The committer's check of N heartbeats, as its reader runs once per second: the
        # WATCH script with the keys and arguments of ckpt/coordination/lua/watch.lua.
        probe: Any = redis.Redis(host="127.0.0.1", port=srv.port, socket_timeout=30)
        keys = [
            f"ckpt:{{{w.job}}}:gen",
            f"ckpt:{{{w.job}}}:step:1",
            f"ckpt:{{{w.job}}}:hb:{w.generation}",
        ]
        srv.client.config_resetstat()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            probe.evalsha(
                w.scripts["WATCH"],
                len(keys),
                *keys,
                w.generation,
                int(args.heartbeat_ttl * 1000),
                "*",
                1,
            )
            times.append(time.perf_counter() - t)
        probe.close()
        check_us = float(srv.commandstats().get("evalsha", {"usec_per_call": 0.0})["usec_per_call"])
        # 3. A step whose last rank reports late: do the waiting ranks poll?
        straggler, error = None, None
        if args.straggler_seconds > 0 and w.world <= args.straggler_max_ranks:
            try:
                straggler = w.step(10_000, {w.world - 1: args.straggler_seconds}, args.formats[0])
            except StepFailed as exc:
                error = str(exc)
    finally:
        refresher.stop()
    return HeartbeatResult(
        world=w.world,
        seconds=seconds,
        zadd_per_s=zadd["calls"] / seconds,
        zadd_usec_per_call=float(zadd["usec_per_call"]),
        expire_usec_per_call=float(expire["usec_per_call"]),
        redis_cpu_fraction=cpu / seconds,
        check_ms=statistics.median(times) * 1e3,
        check_usec_redis=check_us,
        straggler=straggler,
        straggler_error=error,
    )


def committer_cpu(world: int, args: argparse.Namespace, version: int) -> dict[str, float]:
    """The committer's Python work for N reports, in this process, without Redis (ms).

    The same calls as on the commit path: ``ManifestBuilder.add_report`` per report (done
    as reports arrive), then rank 0's own index and ``render`` (after the last one).
    """
    kwargs = {"tensors": args.tensors, "piece_bytes": args.piece_mib << 20, "generation": "bench"}
    raws = [report(version, r, world, **kwargs).to_bytes() for r in range(1, world)]
    builder = ManifestBuilder(1)
    t0 = time.perf_counter()
    for raw in raws:
        builder.add_report(raw, "report", DEFAULT_CHUNK_BYTES)
    t1 = time.perf_counter()
    builder.add(report(version, 0, world, **kwargs))
    builder.render(
        generation="bench",
        world_size=world,
        chunk_bytes=DEFAULT_CHUNK_BYTES,
        created_unix=0.0,
        commit_seconds=0.001,
    )
    t2 = time.perf_counter()
    return {
        "parse_ms": (t1 - t0) * 1e3,
        "parse_us_per_report": (t1 - t0) * 1e6 / max(1, world - 1),
        "render_ms": (t2 - t1) * 1e3,
    }


# --------------------------------------------------------------------------- report


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def scenario(spread: float) -> str:
    return "all report at once" if not spread else f"reports spread over {spread:g} s"


def format_world(
    world: int,
    steps: list[StepResult],
    w: World,
    cpu: dict[str, float],
    args: argparse.Namespace,
    spread: float,
    version: int,
) -> str:
    def col(key: str) -> list[float]:
        return [float(getattr(s, key)) for s in steps]

    def row(label: str, key: str, unit: str = "ms", fmt: str = "8.2f") -> str:
        values = col(key)
        return f"  {label:<62} {_med(values):{fmt}} {max(values):{fmt}}  {unit}"

    rt_max = max(s.max_round_trips for s in steps)
    cmds_max = max(s.max_commands for s in steps)
    lat = _med(col("latency_ms"))
    scripts: dict[str, list[int]] = {}
    for s in steps:
        for name, values in s.redis_scripts_us.items():
            scripts.setdefault(name, []).extend(values)
    mib = 2**20

    def peak(key: str) -> float:
        return _med([float(s.peak_delta(key)) for s in steps])

    lines = [
        f"== {world} ranks, format v{version}, {scenario(spread)}: committer process; {w.real_ranks} RedisCoordinator threads + "
        f"{w.replica_ranks} "
        f"protocol replicas in {len(w.procs)} processes; one connection per rank; report {w.index_bytes[version]} B "
        f"per rank; {len(steps)} steps (after {args.warmup} warm-up) ==",
        f"  {'metric':<62} {'median':>8} {'max':>8}",
        row(
            f"round trips/rank/ckpt, {w.real_ranks} threads: protocol (mean)", "rt_mean", "", "8.2f"
        ),
        row("  same, every command sent (mean)", "cmds_mean", "", "8.2f"),
    ]
    if w.replica_ranks:
        lines += [
            row(
                f"round trips/rank/ckpt, {w.replica_ranks} replicas: protocol (mean)",
                "replica_rt_mean",
                "",
                "8.2f",
            ),
            row("  same, every command sent (mean)", "replica_cmds_mean", "", "8.2f"),
        ]
    lines += [
        f"  {'max over every non-committer and step: protocol / commands sent':<62} {rt_max:8d} {cmds_max:8d}",
        row("round trips / ckpt, committer: protocol", "committer_rt", "", "8.0f"),
        row("  same, every command sent", "committer_cmds", "", "8.0f"),
        row(
            "  of which reads (7 wake-ups at 4096 ranks, + 1 per second)",
            "committer_reads",
            "",
            "8.0f",
        ),
        row("  of which heartbeat checks (once per second)", "committer_checks", "", "8.0f"),
        row("reports phase: start signal -> last report reply", "reports_ms"),
        row("report round trip, p50 over ranks", "report_rtt_p50_ms"),
        row("report round trip, p99 over ranks", "report_rtt_p99_ms"),
        row("COMMIT LATENCY (Redis clock): last report stored -> step committed,", "latency_ms"),
        row("  less the manifest build + serialise + publish with fsync", "manifest_ms"),
        row("  the same with the manifest", "latency_redis_with_manifest_ms"),
        row(
            "committer's view: its reader has the last report -> COMMIT reply", "latency_reader_ms"
        ),
        row("  = merging the last batch + rank 0's own index", "tail_merge_ms"),
        row("    reports in that last batch (the committer's last read)", "last_batch", "", "8.0f"),
        row("  + CLAIM round trip (generation re-checked)", "claim_rtt_ms"),
        row("  + COMMIT round trip (Redis replies to the woken waiters first)", "commit_rtt_ms"),
        row("  (last reporter's reply timestamp -> committer's read returned)", "wake_ms"),
        row("  the same with the manifest", "latency_with_manifest_ms"),
        row("committer has the last report -> last waiter woke (incl. manifest)", "last_waiter_ms"),
        row("COMMIT reply -> first waiter woke", "fanout_first_ms"),
        row("COMMIT reply -> median waiter woke", "fanout_median_ms"),
        row("COMMIT reply -> last waiter woke", "fanout_last_ms"),
        "  Redis-side time of slow commands (SLOWLOG >= {} us; us): {}".format(
            SLOWLOG_US,
            ", ".join(
                f"{n} n={len(v)} median {_med([float(x) for x in v]):.0f} max {max(v)}"
                for n, v in sorted(scripts.items())
            )
            or "none slower than the threshold",
        ),
        "  Redis calls per step (commandstats): EVALSHA {:.0f} ({:.1f} us/call), BLPOP {:.0f}, XREAD {:.0f}; "
        "Redis CPU {:.3f} s over a {:.2f} s step".format(
            _med([float(s.redis_calls.get("evalsha", 0)) for s in steps]),
            _med([s.redis_usec_per_call.get("evalsha", 0.0) for s in steps]),
            _med([float(s.redis_calls.get("blpop", 0)) for s in steps]),
            _med([float(s.redis_calls.get("xread", 0)) for s in steps]),
            _med(col("redis_cpu_s")),
            _med(col("wall_s")),
        ),
        "  Redis memory per step: before {:.2f} MiB; peak +{:.2f} MiB = keys (used_memory_dataset) "
        "+{:.2f} MiB ({:.0f} B per reporting rank) + client buffers +{:.2f} MiB; Lua VM peak {:.2f} MiB "
        "(not in used_memory)".format(
            _med([float(s.mem_before["used_memory"]) for s in steps]) / mib,
            peak("used_memory") / mib,
            peak("used_memory_dataset") / mib,
            peak("used_memory_dataset") / max(1, world - 1),
            peak("mem_clients_normal") / mib,
            _med([float(s.mem_peak["used_memory_vm_eval"]) for s in steps]) / mib,
        ),
        "  after the commit: {} job keys (gen, committed index, one step hash per committed step); "
        "+{:.0f} B kept per step (MEMORY USAGE); used_memory {:+.2f} MiB vs before".format(
            steps[-1].job_keys_after,
            _med([float(s.kept_bytes) for s in steps]),
            _med([float(s.mem_after["used_memory"] - s.mem_before["used_memory"]) for s in steps])
            / mib,
        ),
        f"  manifest: {steps[0].manifest_bytes / 2**20:.2f} MiB",
        f"  committer CPU in one quiet process, no Redis: parse + merge {cpu['parse_ms']:.1f} ms "
        f"({cpu['parse_us_per_report']:.0f} us per report, while reports arrive); rank 0's own index + render "
        f"{cpu['render_ms']:.1f} ms (after the last report)",
    ]
    extras = Counter[str]()
    for s in steps:
        extras.update(s.extra_commands)
    if extras:
        lines.append(f"  checks between pops sent by waiting ranks (all steps): {dict(extras)}")
    lines.append(
        f"  {verdict(rt_max <= TARGET_ROUND_TRIPS)}  round trips per non-committer per checkpoint <= "
        f"{TARGET_ROUND_TRIPS}, the protocol's (max over every rank and step: {rt_max})"
    )
    lines.append(
        f"  {verdict(cmds_max <= TARGET_ROUND_TRIPS)}  the same, counting every command a rank sent, the "
        f"checks between blocking pops included (max: {cmds_max})"
    )
    committer_max = max(s.committer_cmds for s in steps)
    lines.append(
        f"  {verdict(committer_max <= TARGET_ROUND_TRIPS)}  the committer's round trips <= "
        f"{TARGET_ROUND_TRIPS} (max {committer_max}: one per read of the reports that arrived, "
        "+ claim + commit + checks)"
    )
    if world >= TARGET_AT:
        lines.append(
            f"  {verdict(lat <= TARGET_LATENCY_MS)}  commit latency after the last report <= "
            f"{TARGET_LATENCY_MS:.0f} ms at {TARGET_AT} ranks (median {lat:.2f} ms; "
            f"{_med(col('latency_redis_with_manifest_ms')):.2f} ms with the manifest build + publish)"
        )
    else:
        lines.append(
            f"  info  commit latency {lat:.2f} ms (target {TARGET_LATENCY_MS:.0f} ms applies at {TARGET_AT})"
        )
    return "\n".join(lines)


def format_heartbeats(world: int, hb: HeartbeatResult) -> str:
    lines = [
        f"  heartbeats (informative): {hb.zadd_per_s:.0f} ZADD/s from {world} ranks' heartbeat loops over "
        f"{hb.seconds:.1f} s ({hb.zadd_usec_per_call:.1f} us/call + EXPIRE {hb.expire_usec_per_call:.1f} "
        f"us/call); Redis CPU {hb.redis_cpu_fraction:.1%} of a core",
        f"  the committer's check of {world} heartbeats (once per second while reports are due): "
        f"{hb.check_ms:.2f} ms client side, {hb.check_usec_redis:.0f} us in Redis; waiting ranks check only "
        "the committer, once per half heartbeat TTL",
    ]
    s = hb.straggler
    if s is not None:
        replicas = (
            (
                f"; replicas counter max {s.replica_rt_max} mean {s.replica_rt_mean:.2f}, commands max "
                f"{s.replica_cmds_max} mean {s.replica_cmds_mean:.2f}"
            )
            if s.replica_cmds_max
            else ""
        )
        lines.append(
            f"  straggler step (rank {world - 1} reports {s.straggler_s:.1f} s late; {world} fresh heartbeats): "
            f"round trips/rank: threads counter max {s.rt_max} mean {s.rt_mean:.2f}, commands max {s.cmds_max} "
            f"mean {s.cmds_mean:.2f}{replicas}; committer {s.committer_rt}/{s.committer_cmds} ({s.committer_reads} "
            f"reads, {s.committer_checks} checks); checks between pops {s.extra_commands}; step {s.wall_s:.2f} s, "
            f"Redis CPU {s.redis_cpu_s:.2f} s; commit latency {s.latency_ms:.2f} ms"
        )
    if hb.straggler_error:
        lines.append(f"  straggler step did not commit: {hb.straggler_error[:300]}")
    return "\n".join(lines)


def format_summary(results: dict[tuple[int, float, int], list[StepResult]]) -> str:
    lines = [
        "== summary (medians over steps; round trips: max over ranks and steps) ==",
        f"  {'ranks':>6} {'format':>6} {'spread':>6} {'rt max':>8} {'cmds max':>9} {'committer':>9} {'latency ms':>10} "
        f"{'+manifest':>9} {'last wake':>9} {'peak MiB':>8} {'B/rank':>7} {'kept B':>7}",
        "  (rt/cmds max: protocol round trips per non-committer per checkpoint / every command "
        "sent, max over ranks; committer: every round trip of rank 0; latency: Redis clock, last report "
        "stored -> step committed, manifest excluded; last wake: the committer's reader has the last report "
        "-> last waiter woke; peak MiB: used_memory "
        "rise during the step; B/rank: key memory per reporting rank at the peak; kept B: key memory "
        "left per committed step)",
    ]
    for (world, spread, version), steps in sorted(results.items()):
        lines.append(
            f"  {world:>6} {f'v{version}':>6} {spread:>6g} {max(s.max_round_trips for s in steps):>8} {max(s.max_commands for s in steps):>9} "
            f"{max(s.committer_rt for s in steps):>9} {_med([s.latency_ms for s in steps]):>10.2f} "
            f"{_med([s.latency_redis_with_manifest_ms for s in steps]):>9.2f} "
            f"{_med([s.last_waiter_ms for s in steps]):>9.2f} "
            f"{_med([s.peak_delta() / 2**20 for s in steps]):>8.2f} "
            f"{_med([s.peak_delta('used_memory_dataset') / max(1, world - 1) for s in steps]):>7.0f} "
            f"{_med([float(s.kept_bytes) for s in steps]):>7.0f}"
        )
    counted = [max(s.max_round_trips for s in steps) for steps in results.values()]
    sent = [max(s.max_commands for s in steps) for steps in results.values()]
    lines.append(
        f"  {verdict(len(set(counted)) == 1)}  round trips per rank independent of world size, by "
        f"the protocol's count (max per world size: {counted})"
    )
    lines.append(
        f"  {verdict(len(set(sent)) == 1)}  the same, counting every command sent (max per world "
        f"size: {sent})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", default="256,1024,4096", help="world sizes, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="measured checkpoints per world size")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured checkpoints first")
    p.add_argument(
        "--real-ranks",
        type=int,
        default=256,
        help="non-committers run as RedisCoordinator threads; the rest are protocol replicas",
    )
    p.add_argument(
        "--threads-per-proc",
        type=int,
        default=256,
        help="RedisCoordinator threads per process (fewer threads per GIL: less convoying)",
    )
    p.add_argument(
        "--replicas-per-proc", type=int, default=2048, help="protocol replicas per process"
    )
    p.add_argument("--tensors", type=int, default=4, help="Shard(0) tensors in each rank's index")
    p.add_argument("--piece-mib", type=int, default=16, help="MiB per piece (one checksum per MiB)")
    p.add_argument(
        "--straggler-seconds",
        type=float,
        default=2.5,
        help="delay of the last rank in the straggler step (0: skip that step)",
    )
    p.add_argument(
        "--straggler-max-ranks",
        type=int,
        default=1024,
        help="largest world size that runs the straggler step (its polling costs the "
        "simulated ranks about N x N heartbeat entries parsed per second)",
    )
    p.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=4.0,
        help="heartbeat load window (0: skip heartbeats and the straggler step)",
    )
    p.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=600.0,
        help="heartbeat TTL of the simulated ranks (ckpt's default is 15 s; thousands of "
        "threads on a loaded 2-core machine can miss that without being dead)",
    )
    p.add_argument(
        "--spread-seconds",
        default="0,1",
        help="scenarios, comma-separated: each non-committer reports after a random delay in "
        "[0, S) s (0: all at once, the worst-case burst; 1: ranks finishing their writes "
        "within a second of each other)",
    )
    p.add_argument(
        "--format",
        dest="formats",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[2],
        help="checkpoint format versions of the reports, comma-separated (2: a small report "
        "pinning the rank's index file, rank 0 describing the layouts; 1: every piece in "
        "the report; 2,1: both, interleaved step by step)",
    )
    p.add_argument("--json", type=Path, help="also write every measurement here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    worlds = [int(x) for x in args.ranks.split(",") if x]
    fds = raise_fd_limit()
    need = 2 * max(worlds) + 64
    if fds < need:
        raise SystemExit(f"open-file limit {fds} is below the {need} this run needs (ulimit -n)")
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-coord-"))
    server = BenchRedis(tmp, maxclients=need)
    print(
        f"redis-server {server.version} on 127.0.0.1:{server.port} (own, no persistence, maxclients "
        f"{server.maxclients}); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"manifests under {tmp}",
        flush=True,
    )
    spreads = [float(x) for x in args.spread_seconds.split(",") if x]
    results: dict[tuple[int, float, int], list[StepResult]] = {}
    heartbeats: dict[int, HeartbeatResult] = {}
    cpus: dict[str, dict[str, float]] = {}
    try:
        for world in worlds:
            start = time.monotonic()
            cpu = {v: committer_cpu(world, args, v) for v in args.formats}
            w = World(server, world, args, tmp / f"root-{world}")
            try:
                for v in args.formats:
                    cpus[f"{world}/v{v}"] = cpu[v]
                step = 0
                for spread in spreads:
                    rng = random.Random(world)
                    steps: dict[int, list[StepResult]] = {v: [] for v in args.formats}
                    for i in range(args.warmup + args.steps):
                        delays = (
                            {r: rng.uniform(0.0, spread) for r in range(1, world)} if spread else {}
                        )
                        for v in args.formats:  # interleaved: the same load for each format
                            step += 1
                            result = w.step(step, delays, v)
                            result.spread_s, result.format = spread, v
                            if i >= args.warmup:
                                steps[v].append(result)
                    for v in args.formats:
                        results[(world, spread, v)] = steps[v]
                        print(format_world(world, steps[v], w, cpu[v], args, spread, v), flush=True)
                if args.heartbeat_seconds > 0:
                    heartbeats[world] = measure_heartbeats(w, args)
                    print(format_heartbeats(world, heartbeats[world]), flush=True)
            finally:
                w.close()
            server.client.flushall()
            print(
                f"  ({world} ranks done in {time.monotonic() - start:.0f} s, load average "
                f"{os.getloadavg()[0]:.1f})\n",
                flush=True,
            )
        print(format_summary(results))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "steps": {
                        f"{w}/{spread}/v{v}": [asdict(s) for s in steps]
                        for (w, spread, v), steps in results.items()
                    },
                    "heartbeats": {w: asdict(h) for w, h in heartbeats.items()},
                    "committer_cpu": cpus,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

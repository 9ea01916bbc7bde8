"""The committer's reader of one step's reports in Redis.

It reads the reports as they arrive and merges each into the manifest at once, so that
little is left after the last one. Each read is one round trip: drop the reports already
merged, wait for a wake-up (REPORT pushes one at 16 reports, at half, when all but
4^k x 16 are in, and at the last), take every report that has arrived. While a burst is
in progress (a read brought at least ``DRAIN_AT`` new reports), the next read takes what
arrived meanwhile without waiting for a wake-up: the reader keeps pace with the burst
instead of sleeping until the next threshold and then facing most of it at once, which
would leave a large batch to merge after the last report. A read that brings fewer goes
back to waiting, so reports that trickle in cost no more reads than wake-ups, and a burst
at most one more read per ``DRAIN_AT`` reports. The last ``WAIT_FOR_LAST`` reports are
read on wake-ups only: Redis serves a burst in long passes over its clients, and a read
sent without waiting may run in the middle of one and miss the reports after it, to be
answered after the pass and followed by one more read; a read blocked on the wake-up list
runs the rest of its pipeline right after the pass in which the REPORT script woke it,
so it takes every report of that pass. Between reads, once per ``check_every``
seconds, the coordinator's ``check`` raises when the step must stop (refused, ranks lost,
past the deadline). Runs in its own thread from ``begin``, or in
the committer's thread without one.

After connection loss (a restart, a Sentinel failover) the server may hold fewer reports
than were read, or reports sent again (with stream ids that need not follow the last id
read, the new master's clock being another): from then on each read takes the whole
stream, trims nothing, and skips the ranks already merged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ckpt.coordination._commit import ManifestBuilder
from ckpt.coordination._redis_connection import BLOCKING_CALL_SECONDS, RedisLink
from ckpt.coordination._redis_keys import StepKeys
from ckpt.errors import CoordinationError

# A read that brings this many new reports is followed by one that does not wait for a
# wake-up (the REPORT script's smallest batch) ...
DRAIN_AT = 16
# ... unless no more than this many are still due (the REPORT script wakes the reader
# when all but 256, 64, 16 and 0 are in).
WAIT_FOR_LAST = 256


@dataclass(frozen=True)
class ReportsJob:
    """What the reader of one step's reports needs.

    Attributes:
        step: the step.
        chunk_bytes: checksum chunk size the reports must use.
        expected: how many reports are due (every rank but the committer).
        keys: the step's keys (its stream of reports and its wake-up list).
        link: the committer's connection.
        timeout: seconds the reports may take.
        check_every: seconds between two calls of ``check`` while reports are due.
        check: ``check(started, deadline)`` (``time.monotonic`` values) raises when the
            step must stop.
    """

    step: int
    chunk_bytes: int
    expected: int
    keys: StepKeys
    link: RedisLink
    timeout: float
    check_every: float
    check: Callable[[float, float], None]


class ReportCollector:
    """Reads and merges the reports of ``job.step``; ``result`` hands over the builder."""

    def __init__(self, job: ReportsJob) -> None:
        self._job = job
        self.builder = ManifestBuilder(job.step)
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._stopped = threading.Event()

    def start(self) -> None:
        name = f"ckpt-reports-{self._job.step}"
        threading.Thread(target=self.run, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        try:
            self._read_all()
        except BaseException as exc:  # handed to the committer by result()
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout: float) -> ManifestBuilder:
        if not self._done.wait(timeout):
            raise CoordinationError(
                f"step {self._job.step}: the reports were not read within {timeout:.0f} s"
            )
        if self._error is not None:
            raise self._error
        return self.builder

    def _read_all(self) -> None:
        job = self._job
        started = time.monotonic()
        deadline = started + job.timeout
        next_check = started + job.check_every
        last_id = "0-0"
        losses = job.link.losses
        drain = False  # a burst in progress: read again without waiting for a wake-up
        while len(self.builder.ranks) < job.expected:
            if self._stopped.is_set():
                raise CoordinationError(f"step {job.step}: reading the reports was stopped")
            block_ms = 0
            if not drain:
                wake = min(next_check, deadline, time.monotonic() + BLOCKING_CALL_SECONDS)
                block_ms = max(1, int(1000 * (wake - time.monotonic())))
            entries = job.link.call(
                f"reading the reports of step {job.step}", partial(self._read, last_id, block_ms)
            )
            if job.link.losses != losses:
                last_id = ""  # whole stream from now on; what is merged is skipped
            before = len(self.builder.ranks)
            for entry_id, fields in entries:
                if last_id:
                    last_id = entry_id
                self._take(fields)
            now = time.monotonic()
            if now >= next_check or now >= deadline:
                job.check(started, deadline)
                next_check = now + job.check_every
            merged = len(self.builder.ranks)
            drain = merged - before >= DRAIN_AT and job.expected - merged > WAIT_FOR_LAST

    def _read(self, last_id: str, block_ms: int) -> list[tuple[Any, dict[bytes, bytes]]]:
        """One round trip: drop the reports already merged, wait for a wake-up (or the block
        time; not at all with ``block_ms`` 0), read every report that has arrived."""
        keys = self._job.keys
        pipe = self._job.link.client.pipeline(transaction=False)
        if last_id not in ("0-0", ""):
            pipe.xtrim(keys.reports, minid=last_id, approximate=False)  # keep only unmerged reports
        if block_ms:
            pipe.blpop([keys.wake], timeout=block_ms / 1000)
        pipe.delete(keys.wake)  # wake-ups queued while merging: this read takes their reports
        pipe.xread({keys.reports: last_id or "0-0"})
        reply = pipe.execute()[-1]
        if not reply:
            return []
        return [(entry_id.decode(), fields) for entry_id, fields in reply[0][1]]

    def _take(self, fields: dict[bytes, bytes]) -> None:
        step = self._job.step
        if b"abort" in fields:
            raise CoordinationError(f"step {step} was aborted: {fields[b'abort'].decode()}")
        rank = fields.get(b"rank", b"?").decode()
        if rank.isdigit() and int(rank) in self.builder.ranks:
            return  # sent again after connection loss, or read again: merged already
        where = f"rank {rank}'s report of step {step} in Redis"
        self.builder.add_report(fields[b"index"], where, self._job.chunk_bytes)

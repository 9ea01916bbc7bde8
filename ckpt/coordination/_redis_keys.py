"""The names of a job's keys in Redis.

Keys live under ``ckpt:{<job>}:`` so that jobs sharing one Redis never see each other.
The braces are a Redis Cluster hash tag: every key of a job hashes to one slot, so the
Lua scripts, which touch several of a job's keys at once, run on a Cluster too (a
script's keys must share a slot there), and different jobs spread over the slots. No
stored format depends on these names (storage is the truth, I5): a Redis that still holds
keys of the earlier scheme (``ckpt:<job>:``, no braces) needs no migration: those
expire with their TTLs (or can be deleted), and the index is rebuilt from storage.

===============================  ========================================================
``gen``                          the current generation (fencing token) of the job
``step:<s>``                     hash: state (open/committing/committed/aborted), gen,
                                 attempt, world, reason, last_report_us, committed_us
                                 (Redis clock)
``step:<s>:ranks:<save>``        set: the ranks that reported (a retried report counts once)
``step:<s>:reports:<save>``      stream: each rank's shard index as it reports, and an
                                 abort marker
``step:<s>:wake:<save>``         list: wakes the committer to read the reports (and on abort)
``step:<s>:done:<save>``         list: one outcome token per non-committer when the step ends
``committed``                    sorted set of committed steps (the index; rebuilt from
                                 storage when Redis lost it)
``claimed``                      sorted set of steps claimed (their manifest may be
                                 published) and not yet marked committed; a reader of
                                 the index asks storage about them (Redis died between)
``indexed``                      set once ``committed`` was merged with a storage scan; its
                                 absence means Redis may have lost part of the index
``hb:<gen>``                     sorted set: rank -> Redis server time of its last
                                 heartbeat (ms; one clock for every host)
===============================  ========================================================

``<save>`` is ``<generation>.<attempt>``: the attempt counts the saves of the step begun
by this incarnation, so a step whose save aborted can be saved again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepKeys:
    """The keys of one save of one step."""

    gen: str
    step: str
    ranks: str
    reports: str
    wake: str
    done: str


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job."""

    job: str

    @property
    def prefix(self) -> str:
        """What every key of the job starts with: ``ckpt:{<job>}:`` (its hash tag)."""
        return f"ckpt:{{{self.job}}}:"

    def _key(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    @property
    def gen(self) -> str:
        return self._key("gen")

    @property
    def committed(self) -> str:
        return self._key("committed")

    @property
    def claimed(self) -> str:
        return self._key("claimed")

    @property
    def indexed(self) -> str:
        return self._key("indexed")

    def step_hash(self, step: int) -> str:
        """The hash of ``step`` (its state, whichever save wrote it last)."""
        return self._key("step", step)

    def heartbeats(self, generation: str) -> str:
        return self._key("hb", generation)

    def step(self, step: int, generation: str, attempt: int) -> StepKeys:
        """Per generation and attempt: a zombie, or a rank still finishing an aborted save
        of the step, can never read, count or take what belongs to the current save."""
        save = f"{generation}.{attempt}"
        return StepKeys(
            gen=self.gen,
            step=self.step_hash(step),
            ranks=self._key("step", step, "ranks", save),
            reports=self._key("step", step, "reports", save),
            wake=self._key("step", step, "wake", save),
            done=self._key("step", step, "done", save),
        )

"""Run a function on N real processes joined by torch.distributed (gloo on CPU).

``run_ranks(fn, world, *args)`` spawns ``world`` processes, initialises a gloo process
group on a free loopback port with a short timeout, calls ``fn(rank, world, *args)`` in
each, and returns the per-rank return values (they must be JSON-serialisable). A rank
that raises makes ``run_ranks`` raise ``RankFailed`` with every failing rank's traceback.
``fn`` must be importable (defined at module level of a test module).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from tests.support.ports import free_port


class RankFailed(AssertionError):
    """One or more ranks raised; the message holds their tracebacks."""


def rank_main(
    rank: int,
    world: int,
    port: int,
    out_dir: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    result_path = Path(out_dir) / f"rank{rank}.json"
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
        try:
            value = fn(rank, world, *args)
            result_path.write_text(json.dumps({"ok": True, "value": value}))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # reported to the parent, which raises RankFailed
        result_path.write_text(
            json.dumps({"ok": False, "error": f"{exc!r}\n{traceback.format_exc()}"})
        )
        raise
    # The result is written and the process group destroyed. Skip the interpreter's
    # teardown: torch's gloo objects sometimes abort there ("terminate called without an
    # active exception"), which would fail a rank that did everything it was asked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        context = mp.start_processes(
            rank_main,
            args=(world, port, out_dir, timeout_s, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        failed_join: BaseException | None = None
        try:
            while not context.join(timeout=timeout_s * 4):
                pass
        except Exception as exc:  # ProcessRaisedException / ProcessExitedException
            failed_join = exc
        results: list[Any] = []
        errors = []
        for rank in range(world):
            path = Path(out_dir) / f"rank{rank}.json"
            if not path.exists():
                errors.append(f"rank {rank}: exited without a result")
                results.append(None)
                continue
            data = json.loads(path.read_text())
            if data["ok"]:
                results.append(data["value"])
            else:
                errors.append(f"rank {rank}: {data['error']}")
                results.append(None)
        if errors or failed_join is not None:
            raise RankFailed("\n".join(errors) or repr(failed_join))
        return results

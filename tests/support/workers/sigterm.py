"""Worker for test_manager's SIGTERM test: a training loop that is told to stop.

Usage: ``python -m tests.support.workers.sigterm ROOT`` (from the repository root)

Saves every 3 steps through a ``FaultyBackend`` whose gate holds step 3's save in
flight. At step 5 it prints ``READY`` and waits for SIGTERM; then it lets the held
write go on and calls ``maybe_save(5)``, which must finish step 3, save step 5 and exit
with status 143. Tensor ``w`` holds the step number everywhere, so the parent can check
what was saved. Exits 3 when SIGTERM never comes, 4 when the loop runs past step 5.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import torch

from ckpt import CheckpointManager
from storage_backends import LocalBackend
from tests.support.faulty import FaultyBackend

READY_STEP = 5
SIGTERM_WAIT_S = 60.0


def main(root: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    faulty = FaultyBackend(LocalBackend(root), gate=threading.Event())
    w = torch.zeros(1 << 16)
    state: dict[str, object] = {"w": w, "step": 0}
    mgr = CheckpointManager(faulty, every_steps=3, keep_last=None, if_busy="wait")
    for step in range(1, READY_STEP + 1):
        w.fill_(float(step))
        state["step"] = step
        if step == READY_STEP:
            faulty.held.wait(SIGTERM_WAIT_S)  # step 3's save is in flight now
            print("READY", flush=True)
            deadline = time.monotonic() + SIGTERM_WAIT_S
            while not mgr.preempted:  # the handler only sets a flag; poll it
                if time.monotonic() > deadline:
                    return 3
                time.sleep(0.01)
            faulty.release()
        mgr.maybe_save(step, state)
    return 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

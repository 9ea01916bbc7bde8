"""Worker for test_manager's SIGTERM tests: a training loop that is told to stop.

Usage: ``python -m tests.support.workers.sigterm ROOT [MODE]`` (from the repository root)

Saves every 3 steps through a ``FaultyBackend`` whose gate holds step 3's save in
flight. At step 5 it prints ``READY`` and waits for SIGTERM (exits 3 when it never comes).
Tensor ``w`` holds the step number everywhere, so the parent can check what was saved.
Then, by ``MODE``:

* ``save`` (default): lets the held write go on and calls ``maybe_save(5)``, which must
  finish step 3, save step 5 and exit with status 143 (exits 4 when the loop runs past 5);
* ``stuck``: lets the held write go on and waits for its commit, then never calls
  ``maybe_save`` again (a main thread stuck in a collective); the manager's watchdog must
  exit with status 143 after ``GRACE_S`` (exits 3 when it does not);
* ``fails``: raises, as a collective does when a peer rank died, with step 3's write still
  held, so that interpreter exit waits on the save; the watchdog must exit with status 143
  (without it the held write gives up after 60 s and the exit status is 1);
* ``twice``: no watchdog; prints ``PREEMPTED`` once the first SIGTERM is seen and waits;
  a second SIGTERM must end the process by the signal (exits 3 when it does not).
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
GRACE_S = 1.0


def main(root: str, mode: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    faulty = FaultyBackend(LocalBackend(root), gate=threading.Event())
    w = torch.zeros(1 << 16)
    state: dict[str, object] = {"w": w, "step": 0}
    mgr = CheckpointManager(
        faulty,
        every_steps=3,
        keep_last=None,
        if_busy="wait",
        sigterm_grace_seconds=None if mode == "twice" else GRACE_S,
    )
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
            if mode == "fails":
                raise RuntimeError("[gloo] connection closed by peer (a rank died)")
            faulty.release()
            if mode == "twice":
                print("PREEMPTED", flush=True)
            if mode in ("stuck", "twice"):
                mgr.wait()  # step 3 commits, whatever the machine's load
                deadline = time.monotonic() + SIGTERM_WAIT_S
                while time.monotonic() < deadline:  # never reaches maybe_save again
                    time.sleep(0.01)
                return 3
        mgr.maybe_save(step, state)
    return 4


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "save"))

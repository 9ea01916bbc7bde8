"""End-to-end restore: from process start to the first training step after a restore.

    .venv/bin/python -m benchmarks.bench_restore_e2e [--mib 512] [--ranks 1 4] [--repeats 3]
                                                     [--dir .bench] [--json OUT] [--quick]

For each world size W (default 1 and 4) it launches W fresh interpreters (gloo ranks on
loopback, ``subprocess``, so that imports are measured as a restarted job pays them) that
build a model + Adam-like state of ``--mib`` MiB in all (parameters, exp_avg and
exp_avg_sq of a few large fp32 matrices, ``Shard(0)`` DTensors on a W-rank mesh, plus
small vectors and a step counter) and save it once. Then, per repeat, for every W in an
order that alternates between repeats, and both with the checkpoint's pages cached
(``warm``: a restart on the same node) and evicted (``cold``: fsync +
``posix_fadvise(DONTNEED)``), it launches W fresh ranks that restore it and take one
training step. Each rank times its phases:

- ``start``: interpreter start-up until the benchmark's code runs (parent's launch time
  to the child's first statement);
- ``import``: ``import torch``, ``torch.distributed``, ``ckpt`` (and the restore path
  that ``ckpt`` loads on first use);
- ``init``: ``init_process_group`` (gloo rendezvous) and the device mesh;
- ``setup``: allocating the empty model/optimizer state to restore into;
- ``discovery``, ``planning``, ``reads``, ``apply``: from ``ckpt.RestoreReport``
  (finding and validating the step; matching the state and planning reads; reading,
  verifying and copying; ``load_state_dict``/plain values);
- ``restore``: the whole ``ckpt.restore`` call (the four phases above and the rest);
- ``step``: the first training step (an Adam update of every local shard and an
  all-reduce of the loss);
- ``total``: launch to the end of the first step.

A phase's value is the max over ranks, median over repeats. The restored shards are
compared with the saved ones (float64 sums per tensor) after every restore. Nothing
here asserts a timing; the machine's other load moves these numbers, so compare only
numbers of one run. ``--quick`` runs a tiny state on 1 and 2 ranks once (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = (
    "start",
    "import",
    "init",
    "setup",
    "discovery",
    "planning",
    "reads",
    "apply",
    "restore",
    "step",
    "total",
)
N_LARGE = 4
COLS = 1024
N_SMALL = 32
SMALL = 4096
STEP = 100
WORKER_TIMEOUT_S = 600


# --------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> None:
    """One rank: import, join the group, build the state, then save or restore + step."""
    started = time.time()
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import ckpt

    # ckpt loads its save and restore paths on first use: resolve them here, so that
    # their imports count as imports and not as the first restore's discovery.
    restore, save = ckpt.restore, ckpt.save
    imported = time.time()
    rank, world = args.rank, args.world
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world
    )
    mesh = init_device_mesh("cpu", (world,))
    joined = time.time()

    total_bytes = int(args.mib * (1 << 20))
    local_rows = max(1, total_bytes // (3 * N_LARGE * COLS * 4) // world)

    def shard(local: torch.Tensor) -> Any:
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False)

    def group() -> dict[str, Any]:
        out = {f"layers.{i}.weight": shard(torch.empty(local_rows, COLS)) for i in range(N_LARGE)}
        out.update({f"layers.{i}.norm": shard(torch.empty(SMALL // world)) for i in range(N_SMALL)})
        return out

    state: dict[str, Any] = {
        "model": group(),
        "optim": {"exp_avg": group(), "exp_avg_sq": group()},
        "progress": {"step": 0},
    }
    locals_ = {
        f"{g}.{name}": value.to_local()
        for g, tree in (
            ("model", state["model"]),
            ("exp_avg", state["optim"]["exp_avg"]),
            ("exp_avg_sq", state["optim"]["exp_avg_sq"]),
        )
        for name, value in tree.items()
    }
    built = time.time()
    out_path = Path(args.out)

    if args.worker == "save":
        gen = torch.Generator().manual_seed(1 + rank)
        for t in locals_.values():
            t.copy_(torch.rand(t.shape, generator=gen))
        state["progress"]["step"] = STEP
        save(state, args.root, step=STEP)
        sums = {name: float(t.double().sum()) for name, t in locals_.items()}
        out_path.write_text(json.dumps({"sums": sums}))
        dist.barrier()
        os._exit(0)  # gloo sometimes aborts in interpreter teardown

    report = restore(state, args.root)
    restored = time.time()

    # The first training step: an Adam update of every local shard, and the loss reduced.
    model = {k: v for k, v in locals_.items() if k.startswith("model.")}
    beta1, beta2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
    loss = torch.zeros(())
    with torch.no_grad():
        for name, weight in model.items():
            grad = weight * 2e-3  # d/dw of 1e-3 * w^2
            loss += (weight * weight).sum() * 1e-3
            m = locals_["exp_avg." + name[len("model.") :]]
            v = locals_["exp_avg_sq." + name[len("model.") :]]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            weight.addcdiv_(m, v.sqrt().add_(eps), value=-lr)
    dist.all_reduce(loss)
    stepped = time.time()

    # The step changed the state: what restore returned is checked on a second, untimed one.
    report_check = restore(state, args.root)
    sums = {name: float(t.double().sum()) for name, t in locals_.items()}
    result = {
        "start": started - args.launched,
        "import": imported - started,
        "init": joined - imported,
        "setup": built - joined,
        "discovery": report.discovery_seconds,
        "planning": report.planning_seconds,
        "reads": report.read_seconds,
        "apply": report.apply_seconds,
        "restore": restored - built,
        "step": stepped - restored,
        "total": stepped - args.launched,
        "restored_step": report.step,
        "checked_step": report_check.step,
        "progress": state["progress"]["step"],
        "sums": sums,
        "bytes_read": report.stats.bytes_read if report.stats else 0,
    }
    out_path.write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)


# --------------------------------------------------------------------------- parent


def _free_port() -> int:
    from tests.support.ports import free_port

    return free_port()


def _launch(mode: str, world: int, root: Path, mib: float, work: Path) -> list[dict[str, Any]]:
    """Start ``world`` fresh ranks; wait for them; return each rank's JSON result."""
    port = _free_port()
    procs = []
    outs = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for rank in range(world):
        out = work / f"{mode}-w{world}-r{rank}.json"
        out.unlink(missing_ok=True)
        outs.append(out)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_restore_e2e",
            "--worker",
            mode,
            "--rank",
            str(rank),
            "--world",
            str(world),
            "--port",
            str(port),
            "--root",
            str(root),
            "--mib",
            str(mib),
            "--out",
            str(out),
            "--launched",
            repr(time.time()),
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    for rank, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise SystemExit(f"{mode}: rank {rank} of {world} did not finish") from None
        if code != 0 or not outs[rank].exists():
            for p in procs:
                p.kill()
            raise SystemExit(f"{mode}: rank {rank} of {world} failed (exit code {code})")
    return [json.loads(o.read_text()) for o in outs]


def _evict(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_restore_e2e", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mib", type=float, default=512.0, help="state size in MiB, all ranks")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4], help="world sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path(".bench"))
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    p.add_argument("--quick", action="store_true", help="8 MiB, ranks 1 and 2, one repeat")
    p.add_argument("--no-cold", action="store_true", help="skip the cold (evicted) restores")
    # Internal: the ranks' command line.
    p.add_argument("--worker", choices=["save", "restore"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.ranks, args.repeats, args.no_cold = 8.0, [1, 2], 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        _worker(args)
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=args.dir)).absolute()
    modes = ["warm"] if args.no_cold else ["warm", "cold"]
    samples: dict[str, dict[str, list[float]]] = {}
    load: list[float] = []
    try:
        saved: dict[int, dict[int, dict[str, float]]] = {}
        for world in args.ranks:
            root = work / f"w{world}"
            results = _launch("save", world, root, args.mib, work)
            saved[world] = {rank: r["sums"] for rank, r in enumerate(results)}
            print(f"saved {args.mib:g} MiB from {world} rank(s)", file=sys.stderr, flush=True)
        for repeat in range(args.repeats):
            order = [(w, m) for w in args.ranks for m in modes]
            if repeat % 2:
                order.reverse()
            for world, mode in order:
                root = work / f"w{world}"
                if mode == "cold":
                    _evict(root)
                results = _launch("restore", world, root, args.mib, work)
                for rank, r in enumerate(results):
                    if r["restored_step"] != STEP or r["progress"] != STEP:
                        raise SystemExit(f"rank {rank} of {world} restored {r['restored_step']}")
                    if r["sums"] != saved[world][rank]:
                        raise SystemExit(f"rank {rank} of {world}: restored tensors differ")
                key = f"{world} rank{'s' if world > 1 else ''}, {mode}"
                per = samples.setdefault(key, {})
                for phase in PHASES:
                    per.setdefault(phase, []).append(max(r[phase] for r in results))
                print(
                    f"repeat {repeat + 1}/{args.repeats}: {key}: total {per['total'][-1]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
            load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nend-to-end restore: {args.mib:g} MiB of state (fp32 params + exp_avg + exp_avg_sq, "
        f"Shard(0) DTensors), gloo on loopback, {os.cpu_count()} CPUs, {args.repeats} "
        f"repeat(s); load average after each repeat {', '.join(f'{v:.1f}' for v in load)}"
    )
    print("seconds: max over ranks, median over repeats; every restore checked against the save\n")
    header = f"{'run':<18}" + "".join(f"{p:>10}" for p in PHASES)
    print(header)
    print("-" * len(header))
    medians = {
        key: {phase: statistics.median(values) for phase, values in per.items()}
        for key, per in samples.items()
    }
    for key, med in medians.items():
        print(f"{key:<18}" + "".join(f"{med[p]:>10.3f}" for p in PHASES))
    print(
        "\n(start: interpreter start-up; import: torch + ckpt; init: gloo rendezvous + mesh; "
        "setup: empty state;\n discovery/planning/reads/apply: ckpt.RestoreReport; restore: the whole "
        "ckpt.restore call; step: "
        "first training step; total: launch -> end of first step)"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"dir": str(args.dir), "json": str(args.json)},
                    "samples": samples,
                    "medians": medians,
                    "load_average": load,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

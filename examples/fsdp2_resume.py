"""An FSDP2 job under torchrun that checkpoints, dies, and resumes on another world size.

Each rank saves only its own shards; the restore reads the byte ranges each new rank
needs, whatever the old layout was. The data position is a global sample index, so the
resumed job sees every sample once whatever its world size.

    torchrun --standalone --nproc-per-node 4 examples/fsdp2_resume.py --root /tmp/run --stop-at 30
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_resume.py --root /tmp/run

On GPUs use the nccl backend (``--backend nccl``); on CPUs gloo. ``--smoke`` runs the story
with torchrun on 2 then 3 CPU processes and checks that the 3-rank job restored exactly
the weights and optimizer state the 2-rank job saved.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckpt

ROWS_PER_RANK = 4


def build(device: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8)
    )
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def samples(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``first .. first + count - 1`` of a synthetic data set (any rank, any run)."""
    xs, ys = [], []
    for index in range(first, first + count):
        g = torch.Generator().manual_seed(index)
        xs.append(torch.randn(64, generator=g))
        ys.append(torch.randint(0, 8, (), generator=g))
    return torch.stack(xs), torch.stack(ys)


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """A hash of the full (unsharded) model and optimizer state; collective, rank 0's counts."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=full)  # empty beyond rank 0
    digest = hashlib.sha256()
    for name in sorted(model_sd):
        digest.update(name.encode() + torch.as_tensor(model_sd[name]).numpy().tobytes())
    per_param: dict[str, dict[str, Any]] = optim_sd.get("state", {})  # type: ignore[assignment]
    for name in sorted(per_param):
        for key, value in sorted(per_param[name].items()):
            digest.update(f"{name}.{key}".encode() + torch.as_tensor(value).numpy().tobytes())
    return digest.hexdigest()


def train(args: argparse.Namespace) -> None:
    dist.init_process_group(args.backend, timeout=timedelta(seconds=120))
    try:
        run(args)
    finally:
        # FSDP2 modules reach their mesh's process groups through reference cycles: free
        # them while the interpreter is whole, not during its shutdown, where gloo's
        # threads releasing tensors abort the process (pytorch/pytorch#179291).
        gc.collect()
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if args.backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model, optimizer = build(device)
    progress = {"next_step": 1, "next_sample": 0}
    state: dict[str, Any] = {"train": ckpt.ModelOptimizerState(model, optimizer), "data": progress}
    with ckpt.CheckpointManager(args.root, every_steps=args.every, keep_last=2) as mgr:
        restored = mgr.restore(state)
        if args.fingerprints:
            value = fingerprint(model, optimizer)
            record(args.fingerprints, f"restored {restored} on {world}", value)
        for step in range(progress["next_step"], args.steps + 1):
            x, y = samples(progress["next_sample"] + rank * ROWS_PER_RANK, ROWS_PER_RANK)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            progress["next_sample"] += world * ROWS_PER_RANK
            progress["next_step"] = step + 1
            mgr.maybe_save(step, state)
            if step == args.stop_at:
                mgr.wait()
                if args.fingerprints:
                    value = fingerprint(model, optimizer)
                    record(args.fingerprints, f"saved {step} on {world}", value)
                break


def record(path: str, what: str, value: str) -> None:
    if dist.get_rank() == 0:
        with open(path, "a") as out:
            out.write(json.dumps({"what": what, "fingerprint": value}) + "\n")


def torchrun(nproc: int, *worker_args: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"fsdp2-example-{os.getpid()}",
        __file__, *worker_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    subprocess.run(cmd, check=True, env=env, timeout=600)


def smoke() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, log = str(Path(tmp, "ckpts")), str(Path(tmp, "fingerprints.jsonl"))
        common = ["--root", root, "--steps", "12", "--every", "4", "--fingerprints", log]
        torchrun(2, *common, "--stop-at", "8")  # saves 4 and 8, then "dies"
        torchrun(3, *common)  # restores step 8 on 3 ranks and finishes
        lines = [json.loads(line) for line in Path(log).read_text().splitlines()]
        saved = next(x["fingerprint"] for x in lines if x["what"] == "saved 8 on 2")
        restored = next(x["fingerprint"] for x in lines if x["what"] == "restored 8 on 3")
        if saved != restored:
            raise SystemExit("the 3-rank job did not restore what the 2-rank job saved")
        print("smoke: a checkpoint of 2 FSDP2 ranks restored bit for bit on 3 ranks")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="checkpoint root (path or s3://bucket/prefix)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="save every N steps")
    parser.add_argument("--stop-at", type=int, help="stop early, as if the job died here")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--fingerprints", help="append state hashes to this file (for --smoke)")
    parser.add_argument("--smoke", action="store_true", help="run the short self-check")
    args = parser.parse_args()
    if args.smoke:
        smoke()
    elif args.root is None:
        parser.error("--root is required (or --smoke)")
    else:
        train(args)


if __name__ == "__main__":
    main()

"""Moving a job from torch.distributed.checkpoint (DCP) to ckpt, and staying compatible.

Three ways, each shown below on a model + optimizer + step:

1. **Import** an existing DCP checkpoint once: ``ckpt convert DCP_DIR ROOT
   --trust-pickled-values`` (the command line; the flag because DCP pickles the non-tensor
   values, e.g. the optimizer's param_groups) and continue under ``ckpt.CheckpointManager``.
2. **Keep calling DCP** but store ckpt checkpoints (checksums, S3, atomic commit): pass
   ``storage_writer=ckpt.dcp.Writer(root)`` / ``storage_reader=ckpt.dcp.Reader(root)``.
3. **Export** a ckpt checkpoint for tools that only read DCP: ``ckpt convert ROOT DIR --to dcp``.

    python examples/dcp_migration.py --workdir /tmp/dcp-migration

``--smoke`` runs all three in a temporary directory and checks each result bit for bit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import ckpt
import ckpt.dcp


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def ckpt_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ckpt", *args], check=True)


def run(workdir: Path) -> None:
    model, optimizer = build()
    train(model, optimizer, 5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # 1. A checkpoint an existing job wrote with plain DCP, imported once into a ckpt root.
    dcp_dir = workdir / "dcp-step-5"
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 5},
             checkpoint_id=str(dcp_dir), no_dist=True)  # fmt: skip
    # DCP pickles non-tensor values (the step, the optimizer's param_groups): ckpt loads them
    # only when told to trust them, and then with torch.load(weights_only=True).
    ckpt_cli("convert", str(dcp_dir), str(workdir / "imported"), "--trust-pickled-values")
    fresh, fresh_opt = build()
    with ckpt.CheckpointManager(workdir / "imported", every_steps=10) as mgr:
        restored = mgr.restore({"model": fresh, "optim": fresh_opt, "step": 0})
    print(f"1. imported the DCP checkpoint and restored step {restored} under ckpt")
    if restored != 5 or not same(fresh.state_dict(), expected):
        raise SystemExit("the imported checkpoint did not restore the saved weights")

    # 2. DCP's API, ckpt's storage: the same calls, with ckpt's writer and reader.
    root = str(workdir / "via-dcp-api")
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()},
             storage_writer=ckpt.dcp.Writer(root, step=5), no_dist=True)  # fmt: skip
    again, _ = build()
    target = {"model": again.state_dict()}
    dcp.load(target, storage_reader=ckpt.dcp.Reader(root), no_dist=True)
    again.load_state_dict(target["model"])
    print(f"2. dcp.save/dcp.load through ckpt.dcp.Writer/Reader: ckpt ls {root} shows step 5")
    if not same(again.state_dict(), expected):
        raise SystemExit("dcp.load through ckpt.dcp.Reader did not read the saved weights")

    # 3. A ckpt checkpoint exported for a tool that reads only DCP.
    exported = workdir / "exported-dcp"
    ckpt_cli("convert", root, str(exported), "--to", "dcp")
    plain, _ = build()
    target = {"model": plain.state_dict()}
    dcp.load(target, checkpoint_id=str(exported), no_dist=True)
    print(f"3. exported to {exported}, which plain dcp.load reads")
    if not same(target["model"], expected):
        raise SystemExit("plain dcp.load of the export did not read the saved weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="an empty directory to work in")
    parser.add_argument("--smoke", action="store_true", help="run the short self-check")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
        print("smoke: import, the DCP API through ckpt, and export all round-trip bit for bit")
    elif args.workdir is None:
        parser.error("--workdir is required (or --smoke)")
    else:
        run(Path(args.workdir))


if __name__ == "__main__":
    main()

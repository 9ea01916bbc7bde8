"""The ``ckpt`` command line: demo, ls, inspect, verify, gc."""

from __future__ import annotations

import datetime
import logging
import re
import statistics
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ckpt._api import open_url
from ckpt.errors import CheckpointError
from ckpt.format import read_manifest, scan_steps
from ckpt.retention import RetentionPolicy, apply_retention, plan_gc
from recovery import validate_files, verify_checkpoint
from storage_backends import StorageBackend

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Fault-tolerant checkpoints for PyTorch."
)
console = Console()

StepOption = Annotated[
    int | None, typer.Option("--step", help="a committed step; default: the newest")
]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _newest(url: str, step: int | None) -> tuple[StorageBackend, int]:
    backend = open_url(url)
    if step is not None:
        return backend, step
    listing = scan_steps(backend)
    if not listing.committed:
        raise CheckpointError(f"no committed checkpoint under {backend.url}")
    return backend, listing.committed[-1]


@app.command()
def demo(
    workdir: Annotated[
        str, typer.Argument(help="where the demo writes (wiped first)")
    ] = "./ckpt-demo",
    steps: Annotated[int, typer.Option(help="training steps")] = 40,
    every: Annotated[int, typer.Option(help="checkpoint every N steps")] = 5,
    nproc: Annotated[int, typer.Option(help="training ranks (FSDP2 over gloo when > 1)")] = 1,
    resume_nproc: Annotated[
        int | None, typer.Option(help="ranks after the crash (default: --nproc)")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option(help="redis://host:port/db; default: embedded")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the crash step")] = None,
    kill_during: Annotated[
        str, typer.Option(help="step: after a training step; save: while a checkpoint is written")
    ] = "step",
    torchrun_restarts: Annotated[
        bool, typer.Option(help="let torchrun --max-restarts restart the job (same size)")
    ] = False,
) -> None:
    """Train a small model, SIGKILL it mid-run, restore (resharded with --resume-nproc), finish,
    and verify bit for bit against a run without the failure."""
    from ckpt.demo import run_demo

    result = run_demo(
        workdir,
        steps=steps,
        every=every,
        nproc=nproc,
        resume_nproc=resume_nproc,
        coordinator=coordinator,
        seed=seed,
        kill_during=kill_during,
        torchrun_restarts=torchrun_restarts,
        echo=console.print,
    )
    table = Table(title="checkpoints written (both incarnations)")
    for col in ("step", "stall ms", "background ms", "MiB", "GB/s (background)"):
        table.add_column(col, justify="right")
    for s in result.saves:
        background = s["persist"] + s["commit"]
        table.add_row(
            str(s["step"]),
            f"{s['stall'] * 1e3:.1f}",
            f"{background * 1e3:.1f}",
            f"{s['bytes'] / 2**20:.1f}",
            f"{s['bytes'] / background / 1e9:.2f}" if background else "-",
        )
    console.print(table)
    if result.saves:
        stalls = [s["stall"] for s in result.saves]
        backgrounds = [s["persist"] + s["commit"] for s in result.saves]
        console.print(
            f"checkpoints: {len(result.saves)}, median stall {statistics.median(stalls) * 1e3:.1f} "
            "ms vs "
            f"median background {statistics.median(backgrounds) * 1e3:.1f} ms per checkpoint "
            f"({statistics.median(backgrounds) / max(statistics.median(stalls), 1e-9):.0f}x hidden "
            "from training)"
        )
    console.print(
        f"{result.nproc} -> {result.resume_nproc} ranks: crashed at step {result.crash_step}, "
        "restored step "
        f"{result.restored_step}, finished {steps} steps "
        f"in {result.seconds:.1f} s: final state "
        + (
            "[green]bit-identical[/green] to an uninterrupted run"
            if result.identical
            else "[red]DIFFERS[/red]"
        )
    )
    if not result.identical:
        raise typer.Exit(1)


@app.command("ls")
def list_steps(url: Annotated[str, typer.Argument(help="checkpoint root")]) -> None:
    """List checkpoints: committed ones with size and generation, and partial ones."""
    backend = open_url(url)
    listing = scan_steps(backend)
    table = Table(title=backend.url)
    for col in ("step", "state", "size", "files", "tensors", "world", "written", "generation"):
        table.add_column(col)
    rows = [(s, True) for s in listing.committed] + [(s, False) for s in listing.uncommitted]
    for step, committed in sorted(rows):
        if not committed:
            table.add_row(str(step), "[yellow]partial[/yellow]", "", "", "", "", "", "")
            continue
        try:
            m = read_manifest(backend, step)
        except CheckpointError as exc:
            table.add_row(str(step), f"[red]unreadable[/red]: {exc}", "", "", "", "", "", "")
            continue
        written = datetime.datetime.fromtimestamp(m.created_unix).isoformat(timespec="seconds")
        table.add_row(
            str(step),
            "committed",
            _human(m.total_bytes),
            str(len(m.files)),
            str(len(m.tensors)),
            str(m.world_size),
            written,
            m.generation,
        )
    console.print(table)


@app.command()
def inspect(
    url: Annotated[str, typer.Argument(help="checkpoint root")], step: StepOption = None
) -> None:
    """Show one checkpoint's tensors, pieces and stored values."""
    backend, found = _newest(url, step)
    m = read_manifest(backend, found)
    console.print(
        f"step {m.step}  generation {m.generation}  world size {m.world_size}  "
        f"chunk {_human(m.chunk_bytes)}  {len(m.files)} files, {_human(m.total_bytes)}"
    )
    table = Table()
    for col in ("tensor", "dtype", "shape", "pieces", "codec", "stored"):
        table.add_column(col)
    for name, entry in sorted(m.tensors.items()):
        codecs = ",".join(sorted({p.codec for p in entry.pieces})) or "-"
        table.add_row(
            name,
            entry.dtype,
            str(list(entry.shape)),
            str(len(entry.pieces)),
            codecs,
            _human(sum(p.byte_length for p in entry.pieces)),
        )
    console.print(table)
    console.print(f"state entries: {', '.join(sorted(m.state))}")
    if m.user_metadata:
        console.print(f"user metadata: {m.user_metadata}")


@app.command()
def verify(
    url: Annotated[str, typer.Argument(help="checkpoint root")],
    step: StepOption = None,
    all_steps: Annotated[bool, typer.Option("--all", help="verify every committed step")] = False,
) -> None:
    """Read every byte of a checkpoint and check its checksums. Exit status 1 when corrupt."""
    backend = open_url(url)
    if all_steps:
        steps = list(scan_steps(backend).committed)
    else:
        steps = [_newest(url, step)[1]]
    bad = 0
    for s in steps:
        try:
            m = read_manifest(backend, s)
            validate_files(backend, m)
            stats = verify_checkpoint(backend, m)
        except CheckpointError as exc:
            bad += 1
            console.print(f"[red]step {s}: CORRUPT[/red] {exc}")
            continue
        console.print(
            f"[green]step {s}: OK[/green] {_human(stats.bytes_read)} verified in "
            f"{stats.seconds:.2f} s"
        )
    if bad:
        raise typer.Exit(1)


@app.command()
def gc(
    url: Annotated[str, typer.Argument(help="checkpoint root")],
    keep_last: Annotated[
        int | None, typer.Option(help="committed steps to keep; default all")
    ] = None,
    keep_every: Annotated[int | None, typer.Option(help="also keep multiples of this step")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only say what would be deleted")
    ] = False,
) -> None:
    """Delete abandoned partial checkpoints and, with --keep-last, superseded ones."""
    backend = open_url(url)
    policy = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    if dry_run:
        listing = scan_steps(backend)
        plan = plan_gc(listing.committed, listing.uncommitted, policy)
    else:
        plan = apply_retention(backend, policy)
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} committed steps {list(plan.committed)} and partial steps {list(plan.abandoned)}"
    )


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="checkpoint root to read")],
    dst: Annotated[
        str, typer.Argument(help="checkpoint root (--to ckpt), file or directory to write")
    ],
    step: StepOption = None,
    to: Annotated[str, typer.Option(help="ckpt | safetensors | torch")] = "ckpt",
    world_size: Annotated[
        int | None, typer.Option(help="--to ckpt: ranks of the new layout")
    ] = None,
    dim: Annotated[int, typer.Option(help="--to ckpt: dimension the tensors are split along")] = 0,
    prefix: Annotated[
        str | None,
        typer.Option(help="export only names starting with this, stripped (e.g. 'model.')"),
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="--to safetensors: e.g. 5GB; writes shards + index.json")
    ] = None,
) -> None:
    """Re-lay a checkpoint for another world size, or export it consolidated.

    Exports are safetensors or torch files.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ckpt.convert import export_safetensors, export_torch, relayout

    source = open_url(src)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("converting", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what[-40:])

        if to == "ckpt":
            if world_size is None:
                raise typer.BadParameter("--to ckpt needs --world-size")
            result = relayout(
                source, open_url(dst), world_size=world_size, step=step, dim=dim, progress=progress
            )
        elif to == "safetensors":
            limit = _parse_size(max_shard_size) if max_shard_size else None
            result = export_safetensors(
                source, dst, step=step, prefix=prefix, max_shard_bytes=limit, progress=progress
            )
        elif to == "torch":
            result = export_torch(source, dst, step=step, prefix=prefix, progress=progress)
        else:
            raise typer.BadParameter("--to must be ckpt, safetensors or torch")
    console.print(
        f"step {result.step}: {result.tensors} tensors, {_human(result.bytes)} -> {dst} "
        f"({len(result.files)} files)"
    )


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def _parse_size(text: str) -> int:
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else "?"
    if match is None or unit not in _UNITS:
        raise typer.BadParameter(f"cannot read the size {text!r} (e.g. 500MB, 5GB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except CheckpointError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)

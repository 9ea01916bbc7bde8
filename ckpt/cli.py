"""The ``ckpt`` command line: demo, ls, inspect, verify, gc, convert."""

from __future__ import annotations

import datetime
import json
import logging
import re
import statistics
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckpt._api import open_url
from ckpt._foreign import find_dcp
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.format import read_manifest, scan_steps
from ckpt.retention import DEFAULT_ABANDONED_AFTER_S, RetentionPolicy, apply_retention
from recovery import validate_files, verify_checkpoint
from storage_backends import LocalBackend, StorageBackend

if TYPE_CHECKING:
    from ckpt.convert import ConvertResult

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
        console.print("user metadata:")
        for line in _metadata_lines(m.user_metadata):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


# Longest user-metadata value ``inspect`` prints whole, and most keys it lists.
_METADATA_VALUE_CHARS = 200
_METADATA_KEYS = 50


def _metadata_lines(metadata: Mapping[str, Any]) -> list[str]:
    """One line per key, long values cut with a note (metadata can be megabytes)."""
    lines = []
    for key in sorted(metadata)[:_METADATA_KEYS]:
        text = json.dumps(metadata[key], ensure_ascii=False, default=str)
        if len(text) > _METADATA_VALUE_CHARS:
            size = len(text.encode())
            text = f"{text[:_METADATA_VALUE_CHARS]}... ({size} bytes; use ckpt.format to read it)"
        lines.append(f"  {key}: {text}")
    if len(metadata) > _METADATA_KEYS:
        lines.append(
            f"  ... and {len(metadata) - _METADATA_KEYS} more keys (use ckpt.format to read them)"
        )
    return lines


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
        int | None,
        typer.Option(help="committed steps that verify to keep (invalid ones are not counted)"),
    ] = None,
    keep_every: Annotated[int | None, typer.Option(help="also keep multiples of this step")] = None,
    abandoned_after: Annotated[
        float,
        typer.Option(
            help="seconds without a write after which a partial step (or a file no manifest "
            "names) is garbage; a save may still be writing a younger one (0 only when no "
            "job writes to this root)"
        ),
    ] = DEFAULT_ABANDONED_AFTER_S,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only say what would be deleted")
    ] = False,
) -> None:
    """Delete abandoned partial checkpoints, files no manifest names and, with --keep-last,
    superseded checkpoints (the newest one that validates is always kept)."""
    backend = open_url(url)
    try:
        policy = RetentionPolicy(
            keep_last=keep_last, keep_every=keep_every, abandoned_after=abandoned_after
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    plan = apply_retention(backend, policy, remove_stale=True, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} committed steps {list(plan.committed)}, partial steps {list(plan.abandoned)} "
        f"and {len(plan.stale_files)} files no manifest names"
    )
    if plan.invalid:
        console.print(
            f"[yellow]committed steps that do not validate[/yellow] (not counted toward "
            f"--keep-last): {list(plan.invalid)}; `ckpt verify {url} --all` says why"
        )
    if plan.in_use:
        console.print(
            f"kept partial steps {list(plan.in_use)}: written to in the last "
            f"{abandoned_after:.0f} s (a save may be in flight)"
        )


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="checkpoint root, or a DCP checkpoint directory")],
    dst: Annotated[
        str,
        typer.Argument(help="checkpoint root (--to ckpt), file or directory to write"),
    ],
    step: Annotated[
        int | None,
        typer.Option(
            "--step",
            help="a committed step of SRC (default: the newest); for a DCP import, the step "
            "to write (default: its 'step' or 'global_step' value, else 0)",
        ),
    ] = None,
    to: Annotated[str, typer.Option(help="ckpt | safetensors | torch | dcp")] = "ckpt",
    world_size: Annotated[
        int | None,
        typer.Option(help="--to ckpt: ranks of the new layout (a DCP import: default 1)"),
    ] = None,
    dim: Annotated[int, typer.Option(help="--to ckpt: dimension the tensors are split along")] = 0,
    prefix: Annotated[
        str | None,
        typer.Option(help="export only names starting with this, stripped (e.g. 'model.')"),
    ] = None,
    max_shard_size: Annotated[
        str | None, typer.Option(help="--to safetensors: e.g. 5GB; writes shards + index.json")
    ] = None,
    trust_pickled_values: Annotated[
        bool,
        typer.Option(
            "--trust-pickled-values",
            help="DCP import: load DCP's pickled non-tensor values (step, param_groups, ...) "
            "with torch.load(weights_only=True); without it they are left out and listed",
        ),
    ] = False,
) -> None:
    """Re-lay a checkpoint for another world size, export it consolidated, or convert
    from and to torch.distributed.checkpoint (DCP).

    A DCP checkpoint as SRC is recognised and imported; --to dcp exports one that plain
    dcp.load reads. Exports are safetensors, torch or DCP files.
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
    from ckpt.dcp import export_dcp, import_dcp

    if to not in ("ckpt", "safetensors", "torch", "dcp"):
        raise typer.BadParameter("--to must be ckpt, safetensors, torch or dcp")
    source = open_url(src, create=False)
    dcp_dir = _dcp_source(source)
    if dcp_dir is None and not scan_steps(source).committed:
        raise CheckpointNotFoundError(
            f"nothing to convert under {source.url}: no committed ckpt checkpoint and no DCP "
            "checkpoint (.metadata and __R_N.distcp files)"
        )
    if dcp_dir is not None and to != "ckpt":
        raise typer.BadParameter(f"{src} holds a DCP checkpoint: it converts to ckpt only")
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

        if dcp_dir is not None:
            imported = import_dcp(
                dcp_dir,
                dst,
                step=step,
                world_size=world_size,
                trust_pickled_values=trust_pickled_values,
                progress=progress,
            )
            result: ConvertResult = imported
        elif to == "ckpt":
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
            result = export_dcp(source, dst, step=step, progress=progress)
    console.print(
        f"step {result.step}: {result.tensors} tensors, {_human(result.bytes)} -> {dst} "
        f"({len(result.files)} files)"
    )
    if dcp_dir is not None and imported.skipped:
        names = [name for name, _ in imported.skipped]
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        console.print(
            f"[yellow]{len(names)} non-tensor values of the DCP checkpoint were not imported"
            f"[/yellow]: {escape(shown)}"
            + (
                " (DCP pickles them; --trust-pickled-values loads them with "
                "torch.load(weights_only=True))"
                if not trust_pickled_values
                else f" ({escape(imported.skipped[0][1])})"
            ),
            markup=True,
            highlight=False,
        )


def _dcp_source(source: StorageBackend) -> str | None:
    """The local DCP checkpoint directory to import when ``source`` holds one and no
    committed ckpt checkpoint; else None."""
    folders = find_dcp(source)
    if not folders or scan_steps(source).committed:
        return None
    where = source.url.rstrip("/")
    if len(folders) > 1:
        listed = ", ".join(f"{where}/{f}" if f else where for f in folders[:5])
        raise CheckpointError(
            f"{where} holds {len(folders)} DCP checkpoints ({listed}"
            f"{' ...' if len(folders) > 5 else ''}): convert one at a time, giving its "
            "directory as SRC and its step with --step"
        )
    if not isinstance(source, LocalBackend):
        raise CheckpointError(
            f"{where} holds a DCP checkpoint: ckpt imports DCP from a local directory; copy it "
            "to local disk first"
        )
    return str(source.root / folders[0]) if folders[0] else str(source.root)


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

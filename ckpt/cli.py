"""The ``ckpt`` command line: demo, ls, inspect, verify, gc, convert.

docs/CLI.md is the reference: commands, the ``--json`` schemas, exit codes and
environment variables. Every failure ends in one line on stderr and a non-zero exit
status (``--debug`` or ``CKPT_DEBUG=1`` adds the traceback). Read-only commands never
create anything. ``ls`` and ``inspect`` import neither torch nor the restore path: they
need only the format reader and the storage backends.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import os
import re
import statistics
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import ckpt
from ckpt._foreign import find_dcp
from ckpt._open import open_url as _open_url
from ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CoordinationError,
    CorruptCheckpointError,
    StorageError,
)
from ckpt.format import ITEMS_REF, TENSOR_REF, Manifest, read_manifest, scan_steps
from ckpt.report import report_command
from storage_backends import (
    BlobNotFoundError,
    LocalBackend,
    RetryPolicy,
    S3Config,
    StorageBackend,
    StorageBackendError,
)

if TYPE_CHECKING:
    from ckpt.convert import ConvertResult

__all__ = [
    "DEBUG_ENV",
    "EXIT_CORRUPT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "app",
    "main",
    "run",
]

EXIT_OK = 0
"""Success (``verify``: every checked step verified)."""
EXIT_CORRUPT = 1
"""A checkpoint is corrupt: ``verify`` found one, or a command stopped on corrupt data."""
EXIT_USAGE = 2
"""A usage error (unknown option, bad value) or a request that cannot be done as given."""
EXIT_NOT_FOUND = 3
"""No such checkpoint root, step, or no committed checkpoint."""
EXIT_STORAGE = 4
"""The storage or the coordinator failed or is unreachable (credentials, endpoint, disk)."""
EXIT_INTERNAL = 5
"""An unexpected error: a bug in ckpt; ``--debug`` shows the traceback to report."""
EXIT_INTERRUPTED = 130
"""Interrupted (Ctrl-C)."""

DEBUG_ENV = "CKPT_DEBUG"

app = typer.Typer(
    no_args_is_help=True,
    help="Fault-tolerant checkpoints for PyTorch.",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

StepOption = Annotated[
    int | None, typer.Option("--step", min=0, help="a committed step; default: the newest")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="print one JSON document (schema in docs/CLI.md)")
]
UrlArgument = Annotated[str, typer.Argument(help="checkpoint root: a path, file:// or s3:// URL")]


@dataclass
class _Run:
    """What the root options asked for, read by ``run`` once the command has ended."""

    debug: bool = False


_run = _Run()

# The command line gives up on S3 sooner than a training job does: a person or a script
# is waiting, and a dead endpoint or missing credentials should say so in seconds.
CLI_S3_RETRY = RetryPolicy(attempts=3, total_seconds=10.0, initial_seconds=0.2, max_seconds=2.0)
CLI_S3_CONNECT_TIMEOUT_S = 3.0


def open_url(url: str) -> StorageBackend:
    """The root at ``url`` as the command line opens it: nothing is created (a command
    that writes creates the root with its first write), and S3 calls retry within
    ``CLI_S3_RETRY``."""
    config = S3Config(retry=CLI_S3_RETRY, connect_timeout=CLI_S3_CONNECT_TIMEOUT_S)
    return _open_url(url, create=False, s3_config=config)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _list(backend: StorageBackend) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(committed, partial) steps; a root that does not exist is ``RootNotFoundError``."""
    listing = scan_steps(backend)
    return listing.committed, listing.uncommitted


def _pick_step(backend: StorageBackend, step: int | None) -> int:
    """``step``, or the newest committed one; not-found errors list what is there."""
    committed, partial = _list(backend)
    if step is None:
        if not committed:
            raise CheckpointNotFoundError(
                f"no committed checkpoint under {backend.url}" + _partial_note(partial)
            )
        return committed[-1]
    if step not in committed:
        try:
            read_manifest(backend, step, pieces=False)  # something is there (a FIFO?): say what
        except CheckpointNotFoundError:
            pass
        else:
            return step  # committed since the listing
        what = "a partial step (its save never committed)" if step in partial else "not there"
        there = ", ".join(map(str, committed[-20:])) or "none"
        raise CheckpointNotFoundError(
            f"step {step} under {backend.url} is {what}; committed steps: {there}"
            + _partial_note(partial)
        )
    return step


def _partial_note(partial: Sequence[int]) -> str:
    return f" (partial steps: {', '.join(map(str, partial[-20:]))})" if partial else ""


def _emit_json(doc: Mapping[str, Any]) -> None:
    console.out(json.dumps(doc, indent=2, ensure_ascii=False, default=str), highlight=False)


def _iso(unix: float) -> str | None:
    if not unix:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def _version(value: bool) -> None:
    if value:
        console.out(f"ckpt {ckpt.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar=DEBUG_ENV,
            help=f"on failure print the traceback; log at DEBUG (also {DEBUG_ENV}=1)",
        ),
    ] = False,
) -> None:
    """Fault-tolerant checkpoints for PyTorch."""
    _run.debug = debug
    if debug:
        for name in ("ckpt", "recovery", "storage_backends"):
            logging.getLogger(name).setLevel(logging.DEBUG)


class KillDuring(str, enum.Enum):
    """When ``ckpt demo`` kills its victim rank."""

    step = "step"
    save = "save"


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
        KillDuring,
        typer.Option(help="step: after a training step; save: while a checkpoint is written"),
    ] = KillDuring.step,
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
        kill_during=kill_during.value,
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
def list_steps(url: UrlArgument, as_json: JsonOption = False) -> None:
    """List checkpoints: committed ones with size and generation, and partial ones."""
    backend = open_url(url)
    committed, partial = _list(backend)
    rows: list[dict[str, Any]] = []
    for step in sorted(committed + partial):
        row: dict[str, Any] = {
            "step": step,
            "state": "committed" if step in committed else "partial",
            "bytes": None,
            "files": None,
            "tensors": None,
            "world_size": None,
            "created": None,
            "generation": None,
            "error": None,
        }
        if step in committed:
            try:
                m = read_manifest(backend, step, pieces=False)
            except CheckpointError as exc:
                row.update(state="unreadable", error=str(exc))
            else:
                row.update(
                    bytes=m.total_bytes,
                    files=len(m.files),
                    tensors=len(m.tensors),
                    world_size=m.world_size,
                    created=_iso(m.created_unix),
                    generation=m.generation,
                )
        rows.append(row)
    if as_json:
        _emit_json({"schema": "ckpt.ls/v1", "root": backend.url, "steps": rows})
        return
    # Fits 80 columns whole (files and full generations are in --json).
    table = Table(title=backend.url, box=None, padding=(0, 1), pad_edge=False)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("tensors", justify="right", no_wrap=True)
    table.add_column("ranks", justify="right", no_wrap=True)
    table.add_column("written (UTC)", no_wrap=True)
    table.add_column("generation", overflow="ellipsis", no_wrap=True, max_width=12)
    for row in rows:
        if row["state"] == "partial":
            table.add_row(str(row["step"]), "[yellow]partial[/yellow]")
        elif row["state"] == "unreadable":
            table.add_row(str(row["step"]), "[red]unreadable[/red]")
        else:
            table.add_row(
                str(row["step"]),
                "committed",
                _human(row["bytes"]),
                str(row["tensors"]),
                str(row["world_size"]),
                (row["created"] or "")[:16].replace("T", " "),
                row["generation"],
            )
    console.print(table)
    for row in rows:
        if row["error"]:
            console.print(f"step {row['step']}: {row['error']}", markup=False, highlight=False)
    if not rows:
        console.print("no checkpoints yet", highlight=False)


def _values(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The plain values of a manifest's state tree by dotted name; tensors, and containers
    holding only tensors, are left out (``inspect`` lists them as tensors)."""
    out: dict[str, Any] = {}
    for key, node in tree.items():
        name = f"{prefix}{key}"
        pairs = node.get(ITEMS_REF) if isinstance(node, dict) and len(node) == 1 else None
        if isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs):
            out.update(_values({str(k): v for k, v in pairs}, f"{name}."))
        elif isinstance(node, dict) and node and not any(k.startswith("__") for k in node):
            out.update(_values(node, f"{name}."))
        elif not _only_tensors(node):
            out[name] = node
    return out


def _only_tensors(node: Any) -> bool:
    if isinstance(node, dict):
        if TENSOR_REF in node:
            return True
        return bool(node) and all(_only_tensors(v) for v in node.values())
    if isinstance(node, list):
        return bool(node) and all(_only_tensors(v) for v in node)
    return False


@app.command()
def inspect(url: UrlArgument, step: StepOption = None, as_json: JsonOption = False) -> None:
    """Show one checkpoint's tensors, stored values (e.g. next_step) and metadata."""
    backend = open_url(url)
    m = read_manifest(backend, _pick_step(backend, step))
    values = _values(m.state)
    if as_json:
        _emit_json(_inspect_doc(backend, m, values))
        return
    console.print(
        f"step {m.step}  written {_iso(m.created_unix) or '?'}  world size {m.world_size}  "
        f"format v{m.format_version}\n"
        f"generation {m.generation}  {len(m.files)} files, {_human(m.total_bytes)}, "
        f"chunks of {_human(m.chunk_bytes)}",
        highlight=False,
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
    console.print(f"state entries: {', '.join(sorted(m.state))}", highlight=False)
    for title, mapping in (("values", values), ("user metadata", m.user_metadata)):
        if mapping:
            console.print(f"{title}:", highlight=False)
            for line in _metadata_lines(mapping):
                console.print(line, markup=False, highlight=False, soft_wrap=True)


def _inspect_doc(backend: StorageBackend, m: Manifest, values: Mapping[str, Any]) -> dict[str, Any]:
    tensors = [
        {
            "name": name,
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "pieces": len(entry.pieces),
            "codecs": sorted({p.codec for p in entry.pieces}),
            "stored_bytes": sum(p.byte_length for p in entry.pieces),
        }
        for name, entry in sorted(m.tensors.items())
    ]
    return {
        "schema": "ckpt.inspect/v1",
        "root": backend.url,
        "step": m.step,
        "generation": m.generation,
        "world_size": m.world_size,
        "format_version": m.format_version,
        "chunk_bytes": m.chunk_bytes,
        "bytes": m.total_bytes,
        "created": _iso(m.created_unix),
        "files": dict(sorted(m.files.items())),
        "tensors": tensors,
        "state_entries": sorted(m.state),
        "values": values,
        "user_metadata": m.user_metadata,
    }


# Longest value ``inspect`` prints whole, and most keys it lists.
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
    url: UrlArgument,
    step: StepOption = None,
    all_steps: Annotated[bool, typer.Option("--all", help="verify every committed step")] = False,
    as_json: JsonOption = False,
) -> None:
    """Read every byte of a checkpoint and check its checksums. Exit status 1 when corrupt."""
    from recovery import validate_files, verify_checkpoint  # imports torch

    backend = open_url(url)
    if all_steps:
        steps = list(_list(backend)[0])
        if not steps:
            _pick_step(backend, None)  # says what is there instead
    else:
        steps = [_pick_step(backend, step)]
    results: list[dict[str, Any]] = []
    for s in steps:
        try:
            m = read_manifest(backend, s)
            validate_files(backend, m)
            with _progress(f"verifying step {s}", quiet=as_json) as progress:
                stats = verify_checkpoint(backend, m, progress=progress)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            results.append(
                {"step": s, "ok": False, "bytes": None, "seconds": None, "error": str(exc)}
            )
            if not as_json:
                console.print(f"[red]step {s}: CORRUPT[/red] ", end="")
                console.print(str(exc), markup=False, highlight=False)
            continue
        results.append(
            {
                "step": s,
                "ok": True,
                "bytes": stats.bytes_read,
                "seconds": stats.seconds,
                "error": None,
            }
        )
        if not as_json:
            console.print(
                f"[green]step {s}: OK[/green] {_human(stats.bytes_read)} verified in "
                f"{stats.seconds:.2f} s"
            )
    ok = all(r["ok"] for r in results)
    if as_json:
        _emit_json({"schema": "ckpt.verify/v1", "root": backend.url, "ok": ok, "steps": results})
    if not ok:
        raise typer.Exit(EXIT_CORRUPT)


@contextlib.contextmanager
def _progress(what: str, *, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on a terminal (stderr); nothing when piped or ``quiet``. Yields the
    ``progress(done, total)`` callback to hand to the long operation."""
    if quiet or not err_console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def _spinner(what: str) -> Iterator[None]:
    """A spinner on a terminal (stderr) while work of unknown length runs; nothing when piped."""
    if not err_console.is_terminal:
        yield
        return
    with err_console.status(what):
        yield


# ckpt.retention.DEFAULT_ABANDONED_AFTER_S; not imported here, so that ``ls`` and
# ``inspect`` need not load the retention module (which loads the restore path).
_DEFAULT_ABANDONED_AFTER_S = 3600.0


@app.command()
def gc(
    url: UrlArgument,
    keep_last: Annotated[
        int | None,
        typer.Option(
            min=1, help="committed steps that verify to keep (invalid ones are not counted)"
        ),
    ] = None,
    keep_every: Annotated[
        int | None, typer.Option(min=1, help="also keep multiples of this step")
    ] = None,
    abandoned_after: Annotated[
        float,
        typer.Option(
            min=0,
            help="seconds without a write after which a partial step (or a file no manifest "
            "names) is garbage; a save may still be writing a younger one (0 only when no "
            "job writes to this root)",
        ),
    ] = _DEFAULT_ABANDONED_AFTER_S,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only say what would be deleted")
    ] = False,
) -> None:
    """Delete abandoned partial checkpoints, files no manifest names and, with --keep-last,
    superseded checkpoints (the newest one that validates is always kept)."""
    from ckpt.retention import RetentionPolicy, apply_retention

    backend = open_url(url)
    try:
        policy = RetentionPolicy(
            keep_last=keep_last, keep_every=keep_every, abandoned_after=abandoned_after
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _list(backend)  # a root that does not exist is an error, not an empty root
    with _spinner(f"{'planning' if dry_run else 'collecting'} garbage under {backend.url}"):
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


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)
_UNITS = {
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
    """Bytes in ``text``: a number with a unit (``5GB``, ``512MiB``, ``100B``); a bare
    number is refused (``--max-shard-size 5`` meant 5 bytes, 114 files for a small model)."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else "?"
    if match is None or unit not in _UNITS:
        hint = " (a unit is required; B for bytes)" if text.strip().isdigit() else ""
        raise typer.BadParameter(f"cannot read the size {text!r}{hint}: e.g. 500MB, 5GB, 2GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise typer.BadParameter(f"the size {text!r} is less than one byte")
    return size


def _check_size(text: str | None) -> str | None:
    """Option callback: refuse a malformed size before the command starts."""
    if text is not None:
        _parse_size(text)
    return text


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
        str | None,
        typer.Option(
            callback=_check_size,
            help="--to safetensors: e.g. 5GB, 512MiB; writes shards + index.json",
        ),
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
    source = open_url(src)
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


app.command("report")(report_command)


def _exit_code(exc: BaseException) -> int:
    """The exit status for a failure (docs/CLI.md, "Exit codes")."""
    if isinstance(exc, CorruptCheckpointError):
        return EXIT_CORRUPT
    if isinstance(exc, (CheckpointNotFoundError, BlobNotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, (StorageError, StorageBackendError, CoordinationError)):
        return EXIT_STORAGE
    if isinstance(exc, CheckpointError):
        return EXIT_USAGE
    return EXIT_INTERNAL


def _fail(message: str, code: int, exc: BaseException | None = None) -> int:
    """Print the one error line (the traceback first with --debug); returns ``code``."""
    if exc is not None and _run.debug:
        err_console.print("".join(traceback.format_exception(exc)), markup=False, end="")
    one_line = " ".join(message.split())
    err_console.print(f"ckpt: error: {one_line}", markup=False)
    return code


def run(args: Sequence[str] | None = None) -> int:
    """Run the command line with ``args`` (default: ``sys.argv[1:]``); returns the exit
    status instead of exiting."""
    _run.debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    command = typer.main.get_command(app)
    argv = list(sys.argv[1:] if args is None else args)
    if not argv:
        command.main(args=["--help"], prog_name="ckpt", standalone_mode=False)
        return EXIT_USAGE
    try:
        result = command.main(args=argv, prog_name="ckpt", standalone_mode=False)
    except typer.TyperException as exc:  # a usage error: unknown option, bad value
        ctx = getattr(exc, "ctx", None)
        where = getattr(ctx, "command_path", None) or "ckpt"
        code = getattr(exc, "exit_code", EXIT_USAGE)
        return _fail(f"{exc.format_message()} (see `{where} --help`)", code, exc)
    except (typer.Abort, KeyboardInterrupt) as exc:
        return _fail("interrupted", EXIT_INTERRUPTED, exc)
    except (CheckpointError, StorageBackendError) as exc:
        return _fail(str(exc) or type(exc).__name__, _exit_code(exc), exc)
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        hint = "" if _run.debug else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
        return _fail(f"internal error: {type(exc).__name__}: {exc}{hint}", EXIT_INTERNAL, exc)
    return result if isinstance(result, int) else EXIT_OK


def main() -> None:
    """The ``ckpt`` entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run())

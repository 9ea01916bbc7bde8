"""A timeline of every save under a checkpoint root, drawn as a static HTML page or a PNG.

``ckpt report URL -o FILE.html`` (or ``FILE.png``) reads the manifest of every step, and
nothing else of the data: each committed save's phase times per rank (``timings``, see
docs/FORMAT.md), its bytes, and whether a restore would use it. Steps that fail
validation (what a restore skips and falls back from) and saves that never committed
(aborted, or unfinished) are marked. The root is only read.

The HTML page is one file with everything inline (SVG charts with hover titles, a table);
it fetches nothing and needs no server. The PNG needs matplotlib, which ckpt does not
require.

Example::

    from ckpt.report import collect, write_report

    steps = collect("/nvme/run1", last=50)
    write_report(steps, "timeline.html", title="/nvme/run1")
"""

from __future__ import annotations

import datetime
import html
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ckpt._open import open_url
from ckpt.errors import CheckpointError, CheckpointNotFoundError, storage_errors
from ckpt.format import INDEX_DIR, SaveTimings, read_manifest, scan_steps, step_prefix
from storage_backends import StorageBackend, StorageBackendError

__all__ = ["StepRecord", "collect", "render_html", "render_png", "report_command", "write_report"]

COMMITTED, INVALID, ABORTED, UNFINISHED = "committed", "invalid", "aborted", "unfinished"
# Longest abort reason shown (the marker is free text written by the job).
_REASON_CHARS = 300


@dataclass(frozen=True)
class StepRecord:
    """What the report knows of one step.

    Attributes:
        step: the step number.
        status: ``committed`` (a restore may use it), ``invalid`` (committed, but its
            manifest or files fail validation: a restore skips it), ``aborted`` (a save
            that left an abort marker) or ``unfinished`` (a prefix with no manifest).
        problem: why the step is not usable, for the last three.
        created_unix: when the manifest was made (committed steps), or when the prefix
            was last written (others; None when the backend cannot tell).
        world_size, generation, total_bytes: from the manifest (committed steps).
        timings: the ranks' phase times, when the manifest records them.
    """

    step: int
    status: str
    problem: str | None = None
    created_unix: float | None = None
    world_size: int | None = None
    generation: str | None = None
    total_bytes: int | None = None
    timings: SaveTimings | None = None

    @property
    def started_unix(self) -> float | None:
        """When the save began: its first rank's start, else the manifest's time."""
        return self.timings.started_unix if self.timings else self.created_unix

    @property
    def seconds(self) -> float | None:
        """From the first rank's start to the manifest rendered (None without timings)."""
        t = self.timings
        if t is None:
            return None
        ends = (s + a + b for s, a, b in zip(t.start_s, t.stall_s, t.persist_s))
        return max(ends, default=0.0) + t.commit_s

    @property
    def bytes_imbalance(self) -> float | None:
        """The busiest rank's bytes over the mean (1.0 = balanced)."""
        return _busiest_over_mean(self.timings.stored_bytes) if self.timings else None

    @property
    def persist_imbalance(self) -> float | None:
        """The slowest rank's persist time over the mean."""
        return _busiest_over_mean(self.timings.persist_s) if self.timings else None


def _busiest_over_mean(values: Sequence[float]) -> float | None:
    mean = statistics.fmean(values) if values else 0.0
    return max(values) / mean if mean > 0 else None


def collect(
    url: str | os.PathLike[str] | StorageBackend,
    *,
    last: int | None = None,
    check_files: bool = True,
) -> list[StepRecord]:
    """Read what every step under ``url`` says about its save, oldest first.

    Reads manifests, listings, sizes and abort markers; never data files, and writes
    nothing.

    Args:
        url: the checkpoint root (or a backend).
        last: only the newest ``last`` steps.
        check_files: also check that every data file exists with its recorded size (one
            size query per file, as a restore does), so that steps a restore would skip
            are marked.

    Raises:
        CheckpointNotFoundError: there is no root at ``url``.
        StorageError: the root cannot be listed.
    """
    backend = open_url(url, create=False)
    with storage_errors(f"listing the steps under {backend.url}", missing=CheckpointNotFoundError):
        listing = scan_steps(backend)
    steps = sorted(
        [(s, True) for s in listing.committed] + [(s, False) for s in listing.uncommitted]
    )
    if last is not None:
        steps = steps[-last:] if last > 0 else []
    return [
        _committed(backend, s, check_files) if done else _unfinished(backend, s)
        for s, done in steps
    ]


def _committed(backend: StorageBackend, step: int, check_files: bool) -> StepRecord:
    try:
        m = read_manifest(backend, step, pieces=False)
    except CheckpointError as exc:
        return StepRecord(step, INVALID, problem=str(exc))
    problem = None
    if check_files:
        from recovery import validate_files  # loads torch: only when files are checked

        try:
            validate_files(backend, m)
        except CheckpointError as exc:
            problem = str(exc)
    return StepRecord(
        step,
        INVALID if problem else COMMITTED,
        problem=problem,
        created_unix=m.created_unix or None,
        world_size=m.world_size,
        generation=m.generation,
        total_bytes=m.total_bytes,
        timings=m.timings,
    )


def _unfinished(backend: StorageBackend, step: int) -> StepRecord:
    prefix = step_prefix(step)
    try:
        when = backend.last_modified(prefix)
        markers = [
            p for p in backend.list_objects(f"{prefix}/{INDEX_DIR}") if p.endswith("-ABORTED")
        ]
        reason = None
        if markers:
            size = min(backend.size(markers[-1]), _REASON_CHARS)
            reason = backend.read(markers[-1], 0, size).decode(errors="replace")
    except StorageBackendError as exc:  # a report shows what it can: the step stays listed
        return StepRecord(step, UNFINISHED, problem=f"cannot be inspected: {exc}")
    if reason is not None:
        return StepRecord(step, ABORTED, problem=reason.strip(), created_unix=when)
    return StepRecord(
        step,
        UNFINISHED,
        problem="no manifest: a save in flight, or one that died",
        created_unix=when,
    )


def write_report(records: Sequence[StepRecord], out: str | os.PathLike[str], *, title: str) -> Path:
    """Draw ``records`` into ``out``: HTML for ``.html``/``.htm``, PNG for ``.png``.

    Raises:
        CheckpointError: another suffix, or a PNG without matplotlib installed.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        path.write_text(render_html(records, title=title), encoding="utf-8")
    elif suffix == ".png":
        render_png(records, path, title=title)
    else:
        raise CheckpointError(
            f"cannot write a report as {path.name!r}: name a .html or a .png file"
        )
    return path


# -- numbers shown for each step ------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    record: StepRecord
    interval_s: float | None  # since the previous save began
    idle_s: float | None  # since the previous save ended


def _rows(records: Sequence[StepRecord]) -> list[_Row]:
    rows: list[_Row] = []
    previous: StepRecord | None = None
    for r in records:
        interval = idle = None
        start = r.started_unix
        if r.status in (COMMITTED, INVALID) and start is not None:
            if previous is not None and previous.started_unix is not None:
                interval = start - previous.started_unix
                if previous.seconds is not None:
                    idle = start - previous.started_unix - previous.seconds
            previous = r
        rows.append(_Row(r, interval, idle))
    return rows


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in _UNITS:
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


# -- HTML --------------------------------------------------------------------------------------

_COLORS = {
    "stall": "#d9534f",
    "persist": "#337ab7",
    "commit": "#5cb85c",
    "bytes": "#8e7cc3",
    "imbalance": "#f0ad4e",
    INVALID: "#c9302c",
    ABORTED: "#999999",
    UNFINISHED: "#bbbbbb",
}
_W, _LEFT, _RIGHT = 1000, 70, 60
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:15px;margin:28px 0 6px}
.sub{color:#666;font-size:13px} .cards{display:flex;gap:14px;flex-wrap:wrap;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px} .card span{color:#666;font-size:12px}
svg{display:block;background:#fcfcfc;border:1px solid #eee} svg text{font-size:11px;fill:#444}
table{border-collapse:collapse;font-size:12px;margin-top:8px}
td,th{border-bottom:1px solid #eee;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f5f5f5;position:sticky;top:0} td.l,th.l{text-align:left}
tr.invalid td{background:#fbeaea} tr.aborted td,tr.unfinished td{color:#888}
.key span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;vertical-align:middle}
.note{white-space:normal;max-width:420px;text-align:left}
"""


def render_html(records: Sequence[StepRecord], *, title: str) -> str:
    """One self-contained HTML page: summary, timeline charts and a table of every step."""
    rows = _rows(records)
    timed = [r for r in records if r.timings is not None]
    committed = [r for r in records if r.status == COMMITTED]
    stalls = [max(r.timings.stall_s) for r in timed if r.timings]
    persists = [max(r.timings.persist_s) for r in timed if r.timings]
    intervals = [row.interval_s for row in rows if row.interval_s is not None]
    cards = [
        (str(len(committed)), "usable steps"),
        (str(sum(r.status == INVALID for r in records)), "invalid (restore skips)"),
        (str(sum(r.status in (ABORTED, UNFINISHED) for r in records)), "not committed"),
        (_secs(_median(stalls)) if stalls else "-", "median stall (slowest rank)"),
        (_secs(_median(persists)) if persists else "-", "median persist (slowest rank)"),
        (_secs(_median(intervals)) if intervals else "-", "median interval"),
        (_human_bytes(committed[-1].total_bytes) if committed else "-", "newest size"),
    ]
    key = "".join(
        f'<span style="background:{_COLORS[k]}"></span>{k}'
        for k in ("stall", "persist", "commit", INVALID, ABORTED)
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>ckpt report: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Checkpoint saves under {html.escape(title)}</h1>",
        f"<div class='sub'>{len(records)} steps; generated {_when(_now())}; "
        "hover over a bar for its numbers</div>",
        "<div class='cards'>",
        *(f"<div class='card'><b>{html.escape(v)}</b><span>{k}</span></div>" for v, k in cards),
        "</div>",
        f"<div class='key sub'>{key}</div>",
        "<h2>Wall clock: when each save ran (stall, persist, commit of the slowest rank)</h2>",
        _wall_clock_svg(rows),
        "<h2>Per step: stall and persist (bar: median rank, tick: slowest rank), commit</h2>",
        _phases_svg(rows),
        "<h2>Per step: bytes written, and the busiest rank over the mean</h2>",
        _bytes_svg(rows),
        "<h2>Per rank: persist time over the step's median (darker = slower rank)</h2>",
        _heatmap_svg(timed),
        "<h2>Every step</h2>",
        _table(rows),
        "</body></html>",
    ]
    return "\n".join(parts)


def _now() -> float:
    return datetime.datetime.now().timestamp()


def _svg(height: int, body: Sequence[str]) -> str:
    return (
        f'<svg width="{_W}" height="{height}" viewBox="0 0 {_W} {height}" role="img">'
        + "".join(body)
        + "</svg>"
    )


def _rect(x: float, y: float, w: float, h: float, color: str, tip: str) -> str:
    return (
        f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(w, 0.6):.2f}" height="{max(h, 0.0):.2f}" '
        f'fill="{color}"><title>{html.escape(tip)}</title></rect>'
    )


def _text(x: float, y: float, s: str, anchor: str = "start") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{html.escape(s)}</text>'


def _axis_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _empty(height: int, why: str) -> str:
    return _svg(height, [_text(_W / 2, height / 2, why, "middle")])


def _tip(row: _Row) -> str:
    r, t = row.record, row.record.timings
    lines = [f"step {r.step}: {r.status}", f"started {_when(r.started_unix)}"]
    if t is not None:
        lines += [
            f"stall median {_secs(_median(t.stall_s))}, slowest {_secs(max(t.stall_s))}",
            f"persist median {_secs(_median(t.persist_s))}, slowest {_secs(max(t.persist_s))}",
            f"commit {_secs(t.commit_s)}; whole save {_secs(r.seconds)}",
            f"bytes {_human_bytes(r.total_bytes)} on {len(t.stored_bytes)} ranks, "
            f"busiest/mean {_ratio(r.bytes_imbalance)}",
        ]
        if t.retries is not None:
            lines.append(f"storage retries {sum(t.retries)}")
    elif r.total_bytes is not None:
        lines.append(f"bytes {_human_bytes(r.total_bytes)} (no timings recorded)")
    if row.interval_s is not None:
        lines.append(f"{_secs(row.interval_s)} after the previous save began")
    if r.problem:
        lines.append(r.problem)
    return "\n".join(lines)


def _wall_clock_svg(rows: Sequence[_Row]) -> str:
    placed = [row for row in rows if row.record.started_unix is not None]
    if not placed:
        return _empty(60, "no step records a time")
    starts = [row.record.started_unix or 0.0 for row in placed]
    ends = [s + (row.record.seconds or 0.0) for s, row in zip(starts, placed)]
    lo, hi = min(starts), max(ends)
    span = max(hi - lo, 1e-3)
    height, top, lane = 150, 20, 70
    plot = _W - _LEFT - _RIGHT

    def x(t: float) -> float:
        return _LEFT + (t - lo) / span * plot

    body = []
    for tick in _axis_ticks(0.0, span):
        body.append(
            f'<line x1="{x(lo + tick):.1f}" y1="{top}" x2="{x(lo + tick):.1f}" '
            f'y2="{top + lane}" stroke="#eee"/>'
        )
        body.append(_text(x(lo + tick), top + lane + 14, f"+{_secs(tick)}", "middle"))
    body.append(_text(_LEFT, height - 8, f"from {_when(lo)}"))
    for row, start in zip(placed, starts):
        r, t, tip = row.record, row.record.timings, _tip(row)
        if r.status in (ABORTED, UNFINISHED):
            body.append(_rect(x(start) - 1, top + lane - 14, 2, 14, _COLORS[r.status], tip))
            continue
        if t is None:
            color = _COLORS[INVALID] if r.status == INVALID else "#777"
            body.append(_rect(x(start) - 1, top, 2, lane, color, tip))
            continue
        stall, persist = max(t.stall_s), max(t.persist_s)
        cursor = start
        for phase, seconds in (("stall", stall), ("persist", persist), ("commit", t.commit_s)):
            body.append(
                _rect(x(cursor), top + 10, (seconds / span) * plot, lane - 20, _COLORS[phase], tip)
            )
            cursor += seconds
        if r.status == INVALID:
            body.append(
                _rect(
                    x(start),
                    top,
                    max(1.0, (cursor - start) / span * plot),
                    6,
                    _COLORS[INVALID],
                    tip,
                )
            )
    return _svg(height, body)


def _step_axis(rows: Sequence[_Row], y: float) -> tuple[float, list[str]]:
    """The width of one step's slot, and the step labels under the plot at ``y``."""
    slot = (_W - _LEFT - _RIGHT) / max(1, len(rows))
    every = max(1, math.ceil(len(rows) / 20))
    labels = [
        _text(_LEFT + (i + 0.5) * slot, y, str(row.record.step), "middle")
        for i, row in enumerate(rows)
        if i % every == 0
    ]
    return slot, labels


def _phases_svg(rows: Sequence[_Row]) -> str:
    timed = [row for row in rows if row.record.timings is not None]
    if not timed:
        return _empty(60, "no step records its phase times (written before ckpt recorded them)")
    height, top, plot_h = 240, 14, 190
    peak = max(
        max(t.stall_s) + max(t.persist_s) + t.commit_s for row in timed if (t := row.record.timings)
    )
    peak = peak or 1e-3
    slot, labels = _step_axis(rows, top + plot_h + 16)
    body = []
    for tick in _axis_ticks(0.0, peak, 4):
        y = top + plot_h - tick / peak * plot_h
        body.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
        )
        body.append(_text(_LEFT - 6, y + 4, _secs(tick), "end"))
    for i, row in enumerate(rows):
        t, tip = row.record.timings, _tip(row)
        x0, w = _LEFT + i * slot + slot * 0.12, slot * 0.76
        if t is None:
            if row.record.status != COMMITTED:
                color = _COLORS.get(row.record.status, "#999")
                body.append(_rect(x0, top + plot_h - 6, w, 6, color, tip))
            continue
        base: float = top + plot_h
        for phase, median, slowest in (
            ("stall", _median(t.stall_s), max(t.stall_s)),
            ("persist", _median(t.persist_s), max(t.persist_s)),
            ("commit", t.commit_s, t.commit_s),
        ):
            h = median / peak * plot_h
            body.append(_rect(x0, base - h, w, h, _COLORS[phase], tip))
            if slowest > median:
                tick_y = base - slowest / peak * plot_h
                body.append(
                    f'<line x1="{x0:.1f}" x2="{x0 + w:.1f}" y1="{tick_y:.1f}" y2="{tick_y:.1f}" '
                    f'stroke="{_COLORS[phase]}" stroke-width="2">'
                    f"<title>{html.escape(tip)}</title></line>"
                )
            base -= h
        if row.record.status == INVALID:
            body.append(_rect(x0, top, w, 4, _COLORS[INVALID], tip))
    body += labels
    return _svg(height, body)


def _bytes_svg(rows: Sequence[_Row]) -> str:
    sized = [row.record.total_bytes or 0 for row in rows]
    if not any(sized):
        return _empty(60, "no committed step")
    height, top, plot_h = 200, 14, 150
    peak = max(sized)
    ratios = [row.record.bytes_imbalance for row in rows]
    top_ratio = max([r for r in ratios if r is not None] + [1.0]) * 1.1
    slot, labels = _step_axis(rows, top + plot_h + 16)
    body = []
    for tick in _axis_ticks(0.0, peak, 4):
        y = top + plot_h - tick / peak * plot_h
        body.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
        )
        body.append(_text(_LEFT - 6, y + 4, _human_bytes(tick), "end"))
    body.append(_text(_W - _RIGHT + 6, top + 10, f"{top_ratio:.2f}x"))
    body.append(_text(_W - _RIGHT + 6, top + plot_h, "0x"))
    points = []
    for i, (row, nbytes, ratio) in enumerate(zip(rows, sized, ratios)):
        x0, w = _LEFT + i * slot + slot * 0.12, slot * 0.76
        h = nbytes / peak * plot_h
        color = _COLORS[INVALID] if row.record.status == INVALID else _COLORS["bytes"]
        body.append(_rect(x0, top + plot_h - h, w, h, color, _tip(row)))
        if ratio is not None:
            points.append(f"{x0 + w / 2:.1f},{top + plot_h - ratio / top_ratio * plot_h:.1f}")
    if points:
        body.append(
            f'<polyline points="{" ".join(points)}" fill="none" stroke="{_COLORS["imbalance"]}" '
            'stroke-width="2"><title>busiest rank bytes / mean (right axis)</title></polyline>'
        )
    body += labels
    return _svg(height, body)


# Rows of the heatmap: ranks are grouped into at most this many bands (the slowest of each).
_HEAT_BANDS = 64


def _heatmap_svg(timed: Sequence[StepRecord]) -> str:
    if not timed:
        return _empty(60, "no step records per-rank times")
    world = max(len(r.timings.persist_s) for r in timed if r.timings)
    bands = min(world, _HEAT_BANDS)
    per_band = math.ceil(world / bands)
    bands = math.ceil(world / per_band)
    cell_h = max(3.0, min(14.0, 260 / bands))
    top, plot_w = 10, _W - _LEFT - _RIGHT
    cell_w = plot_w / len(timed)
    height = int(top + bands * cell_h + 30)
    body = []
    every = max(1, math.ceil(len(timed) / 20))
    for col, r in enumerate(timed):
        t = r.timings
        if t is None:
            continue
        median = _median(t.persist_s) or 1e-9
        for band in range(bands):
            ranks = range(band * per_band, min(len(t.persist_s), (band + 1) * per_band))
            if not ranks:
                continue
            slow = max(ranks, key=lambda k: t.persist_s[k])
            ratio = t.persist_s[slow] / median
            shade = max(0.0, min(1.0, (ratio - 1.0) / 1.0))  # 1x median: white, 2x or more: dark
            color = (
                f"rgb({255 - int(180 * shade)},{255 - int(200 * shade)},{255 - int(120 * shade)})"
            )
            tip = (
                f"step {r.step}, ranks {ranks.start}-{ranks.stop - 1}: slowest rank {slow} "
                f"persisted in {_secs(t.persist_s[slow])} ({ratio:.2f}x the median), "
                f"{_human_bytes(t.stored_bytes[slow])}, stall {_secs(t.stall_s[slow])}"
            )
            body.append(
                _rect(_LEFT + col * cell_w, top + band * cell_h, cell_w, cell_h, color, tip)
            )
        if col % every == 0:
            body.append(_text(_LEFT + (col + 0.5) * cell_w, height - 12, str(r.step), "middle"))
    body.append(_text(_LEFT - 6, top + 10, "rank 0", "end"))
    body.append(_text(_LEFT - 6, top + bands * cell_h, f"rank {world - 1}", "end"))
    return _svg(height, body)


def _table(rows: Sequence[_Row]) -> str:
    head = (
        "step", "status", "started", "interval", "idle", "stall med", "stall max",
        "persist med", "persist max", "commit", "bytes", "bytes busiest/mean",
        "persist slowest/mean", "retries", "ranks", "note",
    )  # fmt: skip
    out = [
        "<table><tr>",
        *(f"<th{' class=l' if h in ('status', 'note') else ''}>{h}</th>" for h in head),
        "</tr>",
    ]
    for row in reversed(rows):
        r, t = row.record, row.record.timings
        cells = [
            str(r.step),
            r.status,
            _when(r.started_unix),
            _secs(row.interval_s),
            _secs(row.idle_s),
            _secs(_median(t.stall_s)) if t else "-",
            _secs(max(t.stall_s)) if t else "-",
            _secs(_median(t.persist_s)) if t else "-",
            _secs(max(t.persist_s)) if t else "-",
            _secs(t.commit_s) if t else "-",
            _human_bytes(r.total_bytes),
            _ratio(r.bytes_imbalance),
            _ratio(r.persist_imbalance),
            str(sum(t.retries)) if t and t.retries is not None else "-",
            str(r.world_size) if r.world_size else "-",
            r.problem or ("" if t or r.status != COMMITTED else "no timings recorded"),
        ]
        tds = [f"<td>{html.escape(c)}</td>" for c in cells]
        tds[1] = f"<td class=l>{html.escape(cells[1])}</td>"
        tds[-1] = f"<td class=note>{html.escape(cells[-1])}</td>"
        out.append(f"<tr class={r.status}>{''.join(tds)}</tr>")
    out.append("</table>")
    return "".join(out)


# -- PNG ---------------------------------------------------------------------------------------


def render_png(records: Sequence[StepRecord], out: str | os.PathLike[str], *, title: str) -> None:
    """The same timeline as a PNG (matplotlib).

    Raises:
        CheckpointError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CheckpointError(
            "a PNG report needs matplotlib: pip install matplotlib (or write .html, which "
            "needs nothing more)"
        ) from exc
    rows = _rows(records)
    fig, (wall, phases, sizes) = plt.subplots(3, 1, figsize=(12, 9), constrained_layout=True)
    fig.suptitle(f"Checkpoint saves under {title}")
    placed = [row.record for row in rows if row.record.started_unix is not None]
    origin = min((r.started_unix or 0.0 for r in placed), default=0.0)
    for r in placed:
        start = (r.started_unix or 0.0) - origin
        t = r.timings
        if r.status in (ABORTED, UNFINISHED) or t is None:
            color = _COLORS.get(r.status, "#777777")
            wall.axvline(start, color=color, linewidth=1, linestyle=":")
            continue
        cursor = start
        for phase, seconds in (
            ("stall", max(t.stall_s)),
            ("persist", max(t.persist_s)),
            ("commit", t.commit_s),
        ):
            wall.barh(0, seconds, left=cursor, color=_COLORS[phase], height=0.6)
            cursor += seconds
        if r.status == INVALID:
            wall.plot([start], [0.45], marker="x", color=_COLORS[INVALID])
    wall.set_yticks([])
    wall.set_xlabel(f"seconds after {_when(origin)}")
    wall.set_title("wall clock: stall, persist, commit of the slowest rank")

    labels = [str(row.record.step) for row in rows]
    xs = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for phase in ("stall", "persist", "commit"):
        heights, slowest = [], []
        for row in rows:
            t = row.record.timings
            if t is None:
                heights.append(0.0)
                slowest.append(math.nan)
                continue
            values = {"stall": t.stall_s, "persist": t.persist_s, "commit": (t.commit_s,)}[phase]
            heights.append(_median(values))
            slowest.append(max(values))
        phases.bar(xs, heights, bottom=bottom, color=_COLORS[phase], label=f"{phase} (median rank)")
        phases.scatter(
            xs, [b + s for b, s in zip(bottom, slowest)], marker="_", s=120, color=_COLORS[phase]
        )
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, row in zip(xs, rows):
        if row.record.status != COMMITTED:
            phases.axvspan(
                x - 0.45, x + 0.45, color=_COLORS.get(row.record.status, "#999"), alpha=0.2
            )
    phases.set_ylabel("seconds")
    phases.set_title("per step: median rank (bar) and slowest rank (tick); shaded: not usable")
    phases.legend(loc="upper left", fontsize=8)

    largest = max((row.record.total_bytes or 0 for row in rows), default=0)
    unit, scale = next(
        ((u, 1024**k) for k, u in reversed(list(enumerate(_UNITS))) if largest >= 1024**k),
        ("B", 1),
    )
    sizes.bar(xs, [(row.record.total_bytes or 0) / scale for row in rows], color=_COLORS["bytes"])
    sizes.set_ylabel(unit)
    ratio_axis = sizes.twinx()
    ratio_axis.plot(
        xs,
        [row.record.bytes_imbalance or math.nan for row in rows],
        color=_COLORS["imbalance"],
        marker="o",
        label="busiest rank bytes / mean",
    )
    ratio_axis.set_ylabel("busiest / mean")
    ratio_axis.legend(loc="upper right", fontsize=8)
    sizes.set_title("per step: bytes written, and write imbalance across ranks")
    every = max(1, math.ceil(len(rows) / 25))
    for axis in (phases, sizes):
        axis.set_xticks(xs[::every], labels[::every])
        axis.set_xlabel("step")
    fig.savefig(os.fspath(out), dpi=110)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------


def report_command(
    url: Annotated[str, typer.Argument(help="checkpoint root")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="FILE.html (self-contained) or FILE.png")
    ],
    last: Annotated[
        int | None, typer.Option("--last", min=1, help="only the newest N steps")
    ] = None,
    check_files: Annotated[
        bool,
        typer.Option(
            "--check-files/--no-check-files",
            help="check every data file's size, as a restore does (one query per file)",
        ),
    ] = True,
) -> None:
    """Draw a timeline of the saves under URL: stall, persist and commit per step, bytes,
    imbalance across ranks, gaps, and the steps a restore would skip. Reads manifests only."""
    # Opened as every command opens a root (nothing created, S3 retries a person waits
    # for); imported here because ckpt.cli imports this module.
    from ckpt.cli import open_url as open_root

    backend = open_root(url)
    records = collect(backend, last=last, check_files=check_files)
    path = write_report(records, output, title=backend.url)
    typer.echo(f"{len(records)} steps drawn into {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """``ckpt report`` on its own: ``python -m ckpt.report URL -o FILE.html``."""
    app = typer.Typer(add_completion=False)
    app.command()(report_command)
    try:
        app(args=list(argv) if argv is not None else None, prog_name="ckpt report")
    except CheckpointError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except SystemExit as exc:  # the command line's own exit: usage errors, --help
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

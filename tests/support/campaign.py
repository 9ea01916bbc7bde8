"""Fault campaigns' figures: a pytest plugin that gathers them and prints one table.

A campaign is a test marked ``@pytest.mark.campaign`` that runs many trials of one fault
(a reduced count in CI, all of them with ``--full``) and records what it saw through the
``campaign_table`` fixture, before it asserts on it::

    @pytest.mark.campaign
    def test_sigkill_save(campaign_table: CampaignTable, full: bool) -> None:
        figures = run_trials(500 if full else 20)
        campaign_table.record("sigkill: 1 rank, ckpt.save", trials=500, torn=0, hangs=0)
        assert figures["torn"] == 0

At the end of the run the terminal summary prints every recorded row in one table (its
columns are the union of the figures' names, ``trials`` first). ``--campaign-report=PATH``
(or the environment variable ``CKPT_CAMPAIGN_REPORT``) also writes the table to PATH:
JSON when PATH ends in ``.json``, else Markdown. Write it as one word: pytest takes a
separate PATH for a test path before this plugin (loaded by a conftest) is known. ``scripts/campaigns.sh`` runs every
campaign at once. Loaded from ``tests/conftest.py`` through ``pytest_plugins``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPORT_ENV = "CKPT_CAMPAIGN_REPORT"
Figure = int | float | str


@dataclass(frozen=True)
class CampaignRow:
    """One campaign's figures: ``name`` (e.g. ``"sigkill: 1 rank, ckpt.save"``), and
    counts such as trials, torn, wrong_restore, escapes and hangs."""

    name: str
    figures: dict[str, Figure]
    test: str
    full: bool


@dataclass
class CampaignTable:
    """The figures of every campaign in this run, in the order they were recorded."""

    full: bool = False
    rows: list[CampaignRow] = field(default_factory=list)
    _test: str = ""

    def record(self, name: str, **figures: Figure) -> None:
        """Add one row (call it before asserting, so a failing campaign shows its figures)."""
        self.rows.append(CampaignRow(name, dict(figures), self._test, self.full))

    def columns(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names.extend(k for k in row.figures if k not in names)
        return sorted(names, key=lambda k: (k != "trials", names.index(k)))

    def lines(self) -> list[str]:
        """The table as aligned text lines (header, rule, one line per row)."""
        columns = self.columns()
        cells = [["campaign", *columns]] + [
            [row.name, *(_cell(row.figures.get(c, "")) for c in columns)] for row in self.rows
        ]
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

        def line(r: list[str]) -> str:
            first = r[0].ljust(widths[0])
            return "  ".join([first, *(v.rjust(w) for v, w in zip(r[1:], widths[1:]))])

        return [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]

    def markdown(self) -> str:
        columns = self.columns()
        out = [
            "| campaign | " + " | ".join(columns) + " |",
            "| --- |" + " ---: |" * len(columns),
        ]
        for row in self.rows:
            values = " | ".join(_cell(row.figures.get(c, "")) for c in columns)
            out.append(f"| {row.name} | {values} |")
        return "\n".join(out) + "\n"

    def to_json(self) -> str:
        rows = [
            {"campaign": r.name, "test": r.test, "full": r.full, **r.figures} for r in self.rows
        ]
        return json.dumps({"full": self.full, "campaigns": rows}, indent=2) + "\n"

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() if path.suffix == ".json" else self.markdown())


def _cell(value: Figure) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


_TABLE = pytest.StashKey[CampaignTable]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--campaign-report",
        default=None,
        metavar="PATH",
        help=f"write the fault campaigns' table to PATH (.json: JSON, else Markdown); "
        f"also ${REPORT_ENV}",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TABLE] = CampaignTable(full=bool(config.getoption("--full", False)))


@pytest.fixture
def campaign_table(request: pytest.FixtureRequest) -> CampaignTable:
    """Where a campaign test records its figures (one ``record`` call per campaign)."""
    table = request.config.stash[_TABLE]
    table._test = request.node.nodeid
    return table


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    table = config.stash.get(_TABLE, None)
    if table is None or not table.rows:
        return
    scope = "full counts" if table.full else "reduced counts; --full for all"
    terminalreporter.section(f"fault campaigns ({scope})")
    for line in table.lines():
        terminalreporter.write_line(line)
    target = config.getoption("--campaign-report") or os.environ.get(REPORT_ENV)
    if target:
        path = Path(target)
        table.write(path)
        terminalreporter.write_line(f"campaign table written to {path}")

"""State semantics users of PyTorch expect (issue 11): ``strict=False`` says what it skipped,
``torch.compile`` prefixes are not part of stored names, parameters without optimizer state
round-trip, tied weights are stored once and stay tied."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import ckpt
from tests.support.checks import assert_bit_identical

# --- strict=False -------------------------------------------------------------------


def test_strict_false_reports_missing_and_unexpected_keys(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The report lists both sides' extra keys, logged at WARNING; the shared ones load."""
    torch.manual_seed(0)
    saved = {"model": nn.Linear(4, 3), "old": torch.ones(2), "shared": torch.ones(3)}
    ckpt.save(saved, root, step=1)
    inner = nn.Linear(4, 3)
    shared = torch.zeros(3)
    target = {"model": nn.Sequential(inner), "new": torch.zeros(2), "shared": shared}
    before = inner.weight.detach().clone()

    report = ckpt.restore(target, root, strict=False)

    assert report.step == 1
    assert set(report.missing) == {"new", "model.0.weight", "model.0.bias"}
    assert set(report.unexpected) == {"old", "model.weight", "model.bias"}
    assert not report.loaded_nothing
    assert_bit_identical(inner.weight.detach(), before)  # kept, not loaded
    assert_bit_identical(shared, torch.ones(3))
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "model.0.weight" in warnings and "model.weight" in warnings


def test_strict_false_warns_when_nothing_was_loaded(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No tensor and no value matches: the restore says so instead of reporting a quiet success."""
    ckpt.save({"net": nn.Linear(4, 3), "step": 7}, root, step=1)
    target = {"model": nn.Linear(4, 3), "epoch": 0}

    report = ckpt.restore(target, root, strict=False)

    assert report.loaded_nothing
    assert set(report.missing) == {"model", "epoch"}
    assert set(report.unexpected) == {"net", "step"}
    assert target["epoch"] == 0
    assert any(
        r.levelno == logging.WARNING and "nothing was loaded" in r.getMessage()
        for r in caplog.records
    )


def test_strict_false_with_a_matching_state_reports_nothing_missing(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save({"model": nn.Linear(4, 3), "step": 7}, root, step=1)
    target = {"model": nn.Linear(4, 3), "step": 0}

    report = ckpt.restore(target, root, strict=False)

    assert report.missing == () and report.unexpected == () and not report.loaded_nothing
    assert target["step"] == 7
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

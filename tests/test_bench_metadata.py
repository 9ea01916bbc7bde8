"""The metadata benchmark runs end to end on a tiny layout, so that it cannot rot: real
reports merged by the real committer, published, discovered and planned on three worlds."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.benchmarks import run_benchmark


def test_bench_metadata_runs_both_layouts_on_a_tiny_world(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    run = run_benchmark(
        "bench_metadata",
        *("--quick", "--ranks", "8,16", "--memory-gib", "0.0005", "--tensors", "20"),
        *("--tp", "2", "--dir", tmp_path),
        timeout=120,
        json_out=out,
    )
    assert "manifest" in run.stdout and "discover" in run.stdout
    rows = run.data
    # 16 ranks would need more than the 0.5 MiB allowed: extrapolated from 8, and said so.
    # Format v1 at 16 ranks would need more than the 0.5 MiB allowed: extrapolated from 8,
    # and said so; format v2 is always measured (a rank's metadata grows with its pieces).
    assert [(r["layout"], r["world"], r["measured"]) for r in rows] == [
        ("fsdp", 8, True),
        ("fsdp", 16, False),
        ("fsdp v2", 8, True),
        ("fsdp v2", 16, True),
        ("2d tp2", 8, True),
        ("2d tp2", 16, False),
        ("2d tp2 v2", 8, True),
        ("2d tp2 v2", 16, True),
    ]
    assert "16~" in run.stdout and "format v2" in run.stdout and "seeded plan" in run.stdout
    assert "rules: gathered" in run.stdout
    # Pipeline stages: the committer merged one tree per stage into the manifest's state.
    stages = json.loads((tmp_path / "rows-stages.json").read_text())
    assert [r["stages"] for r in stages] == [1, 4, 16, 32]
    assert stages[0]["partial_maps"] == 0 and all(r["partial_maps"] > 0 for r in stages[1:])
    for row in (r for r in rows if r["measured"]):
        # The manifest a rank reads is the one the committer published, and every
        # sampled rank's plan on every target world found pieces to read.
        assert row["restorer"]["read_bytes"] == row["committer"]["manifest_bytes"]
        world = row["world"]
        assert sorted(map(int, row["restorer"]["plans"])) == [world // 2, world * 3 // 4, world]
        assert all(p["needed_pieces"] > 0 for p in row["restorer"]["plans"].values())
        if row["layout"].endswith("v2"):
            # A restoring rank reads only some writers' index files, never all of them.
            plans = row["restorer"]["plans"].values()
            assert all(0 < p["needed_files"] < row["world"] for p in plans)
            # The first save after a restore takes its plan from the manifest's layouts.
            assert row["restorer"]["seeded_s"] > 0
        else:
            assert row["restorer"]["pieces"] == row["pieces"]
        if row["save_plan"]:
            # The first save planned from rules: one pair per rank + one rank's rules, far
            # less than every rank's pieces; the describing rank had layouts to describe.
            plan = row["save_plan"]
            assert 0 < plan["rules_gather_bytes"] < plan["gather_bytes"]
            assert plan["rules_described"] > 0
    assert sorted(tmp_path.iterdir()) == sorted([out, tmp_path / "rows-stages.json"])

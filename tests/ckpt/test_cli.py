"""The ``ckpt`` command line as scripts and people meet it (docs/CLI.md).

Read-only commands and restores never create anything; every failure is one line on stderr
with a documented exit status; ``--json`` documents are versioned; ``ls`` and ``inspect``
run without torch. Most runs are in-process (``run_cli``); one subprocess checks imports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import ckpt
import ckpt.cli as cli
from ckpt.cli import (
    EXIT_CORRUPT,
    EXIT_INTERNAL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STORAGE,
    EXIT_USAGE,
)
from storage_backends import (
    BlobNotFoundError,
    LocalBackend,
    RootNotFoundError,
    StorageBackendError,
)
from tests.support.cli import run_cli
from tests.support.on_disk import data_file, flip_byte, piece_of
from tests.support.ports import free_port
from tests.support.s3_servers import S3Server, aws_test_env, moto_s3

__all__ = ["aws_test_env", "moto_s3"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _state(step: int) -> dict[str, object]:
    return {"w": torch.arange(8, dtype=torch.float32) + step, "next_step": step + 1}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with committed steps 1 and 2 and a partial step 3."""
    path = tmp_path / "ckpts"
    for step in (1, 2):
        ckpt.save(_state(step), path, step=step)
    (path / "step-000000003").mkdir()
    return path


def _one_error_line(text: str) -> str:
    """The output is exactly one ``ckpt: error:`` line; returns it."""
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), text
    assert "Traceback" not in text
    return lines[0]


# -- nothing is created ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["ls"], ["inspect"], ["verify"], ["verify", "--all"], ["gc", "--dry-run"], ["gc"]],
    ids=lambda a: " ".join(a),
)
def test_read_only_commands_on_a_missing_root_create_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]
) -> None:
    missing = tmp_path / "typo" / "run1"
    code, out = run_cli(monkeypatch, args[0], str(missing), *args[1:])
    assert code == EXIT_NOT_FOUND
    assert "no such checkpoint root" in _one_error_line(out) and str(missing) in out
    assert not (tmp_path / "typo").exists()


def test_load_and_manager_restore_on_a_missing_root_create_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``ckpt.load`` says 'no such checkpoint root'; the manager starts fresh, says so at
    WARNING, and creates the root with its first save."""
    missing = tmp_path / "typo"
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no such checkpoint root"):
        ckpt.load(_state(0), missing)
    assert not missing.exists()
    with ckpt.CheckpointManager(missing, manual=True, save_on_sigterm=False) as mgr:
        with caplog.at_level(logging.WARNING, logger="ckpt"):
            assert mgr.restore(_state(0)) is None
        assert not missing.exists()
        assert any("does not exist: starting from scratch" in r.message for r in caplog.records)
        mgr.save(1, _state(1), blocking=True)
    assert ckpt.load(_state(0), missing) == 1


def test_a_file_as_root_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a checkpoint root")
    for command in ("ls", "gc"):
        code, out = run_cli(monkeypatch, command, str(file))
        assert code == EXIT_STORAGE and "is a file, not a directory" in _one_error_line(out)
    with pytest.raises(ckpt.StorageError, match="is a file, not a directory"):
        ckpt.save(_state(1), file, step=1)
    assert file.read_text() == "not a checkpoint root"


# -- one line per failure, documented exit codes -------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["gc", "{root}", "--keep-last", "0"], "--keep-last"),
        (
            ["convert", "{root}", "{root}.st", "--to", "safetensors", "--max-shard-size", "5"],
            "unit",
        ),
        (["convert", "{root}", "{root}.st", "--max-shard-size", "5 parsecs"], "500MB"),
        (["demo", "--kill-during", "lunch"], "'step', 'save'"),
        (["inspect", "{root}", "--step", "-1"], "--step"),
        (["ls"], "url"),
        (["ls", "{root}", "--colour"], "--colour"),
        (["lls", "{root}"], "lls"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_usage_errors_are_one_line_with_status_2(
    monkeypatch: pytest.MonkeyPatch, root: Path, args: list[str], says: str
) -> None:
    code, out = run_cli(monkeypatch, *(a.format(root=root) for a in args))
    assert code == EXIT_USAGE
    assert says in _one_error_line(out) and "--help" in out


def test_missing_step_is_not_found_and_lists_the_steps_there(
    monkeypatch: pytest.MonkeyPatch, root: Path
) -> None:
    for command in ("verify", "inspect"):
        code, out = run_cli(monkeypatch, command, str(root), "--step", "99")
        line = _one_error_line(out)
        assert code == EXIT_NOT_FOUND, out
        assert "step 99" in line and "CORRUPT" not in line
        assert "committed steps: 1, 2" in line and "partial steps: 3" in line
    code, out = run_cli(monkeypatch, "verify", str(root), "--step", "3")
    assert code == EXIT_NOT_FOUND and "partial step" in out


def test_an_empty_root_has_no_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, out = run_cli(monkeypatch, "ls", str(tmp_path))
    assert code == EXIT_OK and "no checkpoints yet" in out
    for command in ("inspect", "verify"):
        code, out = run_cli(monkeypatch, command, str(tmp_path))
        assert code == EXIT_NOT_FOUND and "no committed checkpoint" in _one_error_line(out)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, root: Path
) -> None:
    def broken(_backend: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "scan_steps", broken)
    code, out = run_cli(monkeypatch, "ls", str(root))
    assert code == EXIT_INTERNAL
    assert "internal error: RuntimeError: a bug" in _one_error_line(out) and "--debug" in out
    code, out = run_cli(monkeypatch, "--debug", "ls", str(root))
    assert code == EXIT_INTERNAL and "Traceback" in out and "RuntimeError: a bug" in out
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    code, out = run_cli(monkeypatch, "ls", str(root))
    assert code == EXIT_INTERNAL and "Traceback" in out


def test_version(monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, "--version")
    assert code == EXIT_OK and out.strip() == f"ckpt {ckpt.__version__}"


def test_shell_completion_is_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("_CKPT_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "ckpt demo --kill-during ")
    monkeypatch.setenv("COMP_CWORD", "3")
    with pytest.raises(SystemExit):
        cli.run(["demo"])
    assert capsys.readouterr().out.split() == ["step", "save"]


# -- output -----------------------------------------------------------------------------------


def test_json_documents(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """``ls``, ``inspect`` and ``verify`` print one JSON document each, as docs/CLI.md says."""
    code, out = run_cli(monkeypatch, "ls", str(root), "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["schema"] == "ckpt.ls/v1" and doc["root"] == root.as_uri()
    assert [(s["step"], s["state"]) for s in doc["steps"]] == [
        (1, "committed"),
        (2, "committed"),
        (3, "partial"),
    ]
    first, _, partial = doc["steps"]
    assert first["bytes"] > 0 and first["tensors"] == 1 and first["world_size"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", first["created"])
    assert set(partial) == set(first) and partial["bytes"] is None

    code, out = run_cli(monkeypatch, "inspect", str(root), "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["schema"] == "ckpt.inspect/v1" and doc["step"] == 2
    assert doc["values"] == {"next_step": 3}
    assert [(t["name"], t["dtype"], t["shape"]) for t in doc["tensors"]] == [("w", "float32", [8])]
    assert doc["state_entries"] == ["next_step", "w"]

    code, out = run_cli(monkeypatch, "verify", str(root), "--all", "--json")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["schema"] == "ckpt.verify/v1" and doc["ok"] is True
    assert [(s["step"], s["ok"], s["error"]) for s in doc["steps"]] == [
        (1, True, None),
        (2, True, None),
    ]

    piece = piece_of(root, 1, "w")
    flip_byte(data_file(root, 1, piece["file"]), piece["byte_offset"])
    code, out = run_cli(monkeypatch, "verify", str(root), "--all", "--json")
    doc = json.loads(out)
    assert code == EXIT_CORRUPT and doc["ok"] is False
    assert [s["ok"] for s in doc["steps"]] == [False, True]
    assert "checksum mismatch" in doc["steps"][0]["error"]


def test_inspect_shows_plain_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Plain values by dotted name; an optimizer's per-parameter state (all tensors) is not
    repeated among them."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.ones(2)).sum().backward()
    optimizer.step()
    state = {"model": model, "optimizer": optimizer, "next_step": 7}
    ckpt.save(state, tmp_path, step=6)
    code, out = run_cli(monkeypatch, "inspect", str(tmp_path))
    assert code == EXIT_OK and "  next_step: 7" in out and "optimizer.param_groups: " in out
    assert "optimizer.state" not in out.split("values:")[1]


def test_ls_fits_80_columns(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """At 80 columns every column but the generation is whole (dates included)."""
    out_file = Console(width=80, color_system=None, record=True)
    monkeypatch.setattr(cli, "console", out_file)
    assert cli.run(["ls", str(root)]) == EXIT_OK
    text = out_file.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line for line in text.splitlines() if "committed" in line]
    assert len(rows) == 2
    for row in rows:
        assert re.search(r" \d{4}-\d\d-\d\d \d\d:\d\d ", row), row
        assert "…" not in row.split(":")[0], row  # only the generation may be cut


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kb", 1500), ("100B", 100)],
)
def test_sizes_need_a_unit(text: str, size: int) -> None:
    assert cli._parse_size(text) == size


def test_ls_and_inspect_import_no_torch(root: Path) -> None:
    """The fast commands load neither torch nor the restore path (one fresh interpreter)."""
    script = (
        "import sys\n"
        "from ckpt.cli import run\n"
        f"codes = [run(['ls', {str(root)!r}]), run(['inspect', {str(root)!r}, '--json'])]\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'recovery', 'numpy'})\n"
        "print('RESULT', codes, heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "RESULT [0, 0] []", run.stdout


# -- S3 and Redis: bounded, logged retries --------------------------------------------------


def test_s3_dead_endpoint_fails_fast_naming_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with caplog.at_level(logging.WARNING, logger="storage_backends"):
        code, out = run_cli(monkeypatch, "ls", "s3://bucket/run1")
    assert code == EXIT_STORAGE
    line = _one_error_line(out)
    assert endpoint in line and "reachable" in line
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == cli.CLI_S3_RETRY.attempts - 1
    assert all(endpoint in m and re.search(r"retry \d of \d in \d+\.\d+ s", m) for m in retries)


def test_s3_missing_credentials_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    code, out = run_cli(monkeypatch, "ls", "s3://bucket/run1")
    assert code == EXIT_STORAGE and "no S3 credentials" in _one_error_line(out)


def test_s3_missing_bucket_is_one_line(monkeypatch: pytest.MonkeyPatch, moto_s3: S3Server) -> None:
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    code, out = run_cli(monkeypatch, "ls", "s3://no-such-bucket/run1")
    assert code == EXIT_STORAGE and "bucket does not exist" in _one_error_line(out)


def test_redis_retries_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with (
        caplog.at_level(logging.WARNING, logger="ckpt.coordination"),
        pytest.raises(ckpt.CoordinationError, match="unreachable"),
    ):
        ckpt.RedisCoordinator(url, rank=0, world_size=1, retry_seconds=0.3).close()
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all(re.search(r"retry \d+ in \d+\.\d+ s", m) for m in retries), retries
    assert "127.0.0.1" in retries[0]


def test_a_reader_backend_never_creates_its_root(tmp_path: Path) -> None:
    """``LocalBackend(create=False)``: a missing root lists as ``RootNotFoundError`` (below
    it, as nothing), reads find nothing, and the first write creates the root."""
    root = tmp_path / "a" / "b"
    backend = LocalBackend(root, create=False)
    with pytest.raises(RootNotFoundError, match="no such checkpoint root"):
        backend.list_prefixes("")
    with pytest.raises(RootNotFoundError):
        backend.list_objects()
    assert backend.list_objects("step-1") == [] and not backend.exists("step-1/x")
    with pytest.raises(BlobNotFoundError):
        backend.read("step-1/x")
    assert backend.abort_unfinished("") == 0 and backend.last_modified("step-1") is None
    assert not (tmp_path / "a").exists()
    backend.write("step-1/x", b"data")
    assert (root / "step-1" / "x").read_bytes() == b"data"
    assert backend.list_prefixes("") == ["step-1"]
    with pytest.raises(StorageBackendError, match="is a file, not a directory"):
        LocalBackend(root / "step-1" / "x", create=False)

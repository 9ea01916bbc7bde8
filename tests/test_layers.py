"""The layers contract of DESIGN.md, checked over the import graph of the source tree.

public face (ckpt, ckpt._api, ckpt._manager, ckpt.cli, ...)
  -> save path (ckpt.engine, ckpt.coordination) | read path (recovery)
  -> vocabulary (ckpt.format, ckpt.errors)
  -> storage_backends

Every import counts, at module level or inside a function: a lazy import that points
the wrong way is still a wrong arrow. Each package must also import first in a fresh
interpreter, and a local-only job must not load the S3 or Redis client libraries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ckpt", "recovery", "storage_backends")

STORAGE, VOCABULARY, SAVE_PATH, READ_PATH, FACE = (
    "storage",
    "vocabulary",
    "save path",
    "read path",
    "face",
)
RANK = {STORAGE: 0, VOCABULARY: 1, SAVE_PATH: 2, READ_PATH: 2, FACE: 3}


def layer_of(module: str) -> str:
    if module.split(".")[0] == "storage_backends":
        return STORAGE
    if module.split(".")[0] == "recovery":
        return READ_PATH
    if module in ("ckpt.errors",) or module.startswith("ckpt.format"):
        return VOCABULARY
    if module.startswith(("ckpt.engine", "ckpt.coordination")):
        return SAVE_PATH
    return FACE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path`` of one of our packages."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base]
        else:
            continue
        found.extend((node.lineno, n) for n in names if n.split(".")[0] in PACKAGES)
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def wrong_arrows() -> list[str]:
    problems = []
    for path in sources():
        source = module_name(path)
        for line, target in imports_of(path):
            a, b = layer_of(source), layer_of(target)
            where = f"{path.relative_to(ROOT)}:{line}: {source} ({a}) imports {target} ({b})"
            if RANK[b] > RANK[a]:
                problems.append(f"{where}: a lower layer imports a higher one")
            elif {a, b} == {SAVE_PATH, READ_PATH}:
                problems.append(f"{where}: the save and read paths never import each other")
    return problems


def private_imports_outside(package: str) -> list[str]:
    """Imports of a private ``package._module`` from any other package."""
    problems = []
    for path in sources():
        source = module_name(path)
        if source.split(".")[0] == package:
            continue
        for line, target in imports_of(path):
            parts = target.split(".")
            if parts[0] == package and any(p.startswith("_") for p in parts[1:]):
                problems.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target}")
    return problems


def test_every_import_points_down_the_layers() -> None:
    assert wrong_arrows() == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_another_ones_private_modules(package: str) -> None:
    assert private_imports_outside(package) == []


def test_tests_and_benchmarks_use_only_public_modules_of_ckpt_and_recovery() -> None:
    """What tests and benchmarks need of ckpt and recovery is what any tool gets. (The
    storage backends' own unit tests may look at their internals, e.g. the S3 error table.)"""
    problems = []
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, target in imports_of(path):
                parts = target.split(".")
                if parts[0] in ("ckpt", "recovery") and any(p.startswith("_") for p in parts[1:]):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
    assert problems == []


def test_the_layer_checker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    """The checker itself: a module of the read path importing the save path is caught."""
    assert layer_of("recovery._loader") == READ_PATH
    assert layer_of("ckpt.engine._engine") == SAVE_PATH
    assert layer_of("ckpt.format._schema") == VOCABULARY
    assert layer_of("ckpt") == FACE
    bad = ROOT / "recovery" / "_layers_probe.py"
    bad.write_text("from ckpt.engine import flatten\nimport ckpt._manager\n")
    try:
        problems = wrong_arrows()
    finally:
        bad.unlink()
    assert any("_layers_probe.py:1" in p and "never import each other" in p for p in problems)
    assert any("_layers_probe.py:2" in p and "lower layer" in p for p in problems)


FIRST_IMPORTS = [
    "import recovery",
    "from recovery import verify_checkpoint",
    "import storage_backends",
    "import ckpt",
    "import ckpt.format",
    "import ckpt.engine",
    "import ckpt.coordination",
    "from ckpt.format import read_manifest",
    "import ckpt.cli",
]


@pytest.mark.parametrize("statement", FIRST_IMPORTS)
def test_each_package_imports_first_in_a_fresh_interpreter(statement: str) -> None:
    """Python runs a package's ``__init__`` before any submodule: an import cycle shows up
    only when the cycle's other end is imported first, which the suite's own imports hide."""
    run = subprocess.run(
        [sys.executable, "-c", statement], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_a_local_job_loads_neither_the_s3_nor_the_redis_client(tmp_path: Path) -> None:
    script = (
        "import sys, torch, ckpt\n"
        f"ckpt.save({{'w': torch.ones(4)}}, {str(tmp_path)!r}, step=1)\n"
        f"ckpt.load({{'w': torch.zeros(4)}}, {str(tmp_path)!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'boto3', 's3transfer', 'redis'))\n"
        "print(loaded)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_format_reader_needs_no_torch() -> None:
    """Tools that only inspect checkpoints read the format without importing torch."""
    script = "import sys, ckpt, ckpt.format\nprint('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"

"""Hostile and damaged checkpoints (issue 10, defects 5 and 12): every malformed sealed
manifest or data file is a ``CorruptCheckpointError``, restore falls back to the older step,
``ckpt verify`` catches everything load refuses, and nothing is allocated beyond the stored
sizes.

Manifests here are *sealed*: each crafted document is re-sealed with the format's own
``seal_manifest``, so the checks behind the seal are what is tested. They are format v1
(every piece in the manifest); tests/ckpt/test_format_v2.py tampers with v2 index files.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from safetensors import safe_open

import ckpt
import ckpt.cli as cli
from ckpt.format import (
    Manifest,
    ShardIndex,
    check_safetensors_header,
    checksum,
    seal_manifest,
)
from tests.support.campaign import CampaignTable
from tests.support.checks import assert_bit_identical
from tests.support.on_disk import manifest_path, read_manifest, save_with, step_dir

CHUNK = 4096
OLD, NEW = 4, 5
ROOT_OF_REPO = Path(__file__).resolve().parents[2]


def make_state(seed: int) -> dict[str, Any]:
    """Raw multi-chunk tensors (two dtypes), a compressed one and plain values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 64, generator=gen),  # 16 KiB: 4 chunks
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "z": torch.arange(4096, dtype=torch.float32) % 7 + seed,  # zstd, 4 frames
        "meta": {"seed": seed, "tags": ["a", "b"]},
    }


def blank() -> dict[str, Any]:
    return {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {}
        for k, v in make_state(0).items()
    }


def make_checkpoint(root: Path) -> None:
    """Step OLD and step NEW (seed = step), with 4 KiB chunks and ``z`` compressed."""
    options = ckpt.SaveOptions(
        chunk_bytes=CHUNK,
        compression=ckpt.Compression(patterns=("z",), min_bytes=0),
        format_version=1,
    )
    for step in (OLD, NEW):
        save_with(make_state(step), root, step, options)
    for step in (OLD, NEW):
        manifest_path(root, step).chmod(0o644)
        for f in (step_dir(root, step) / "data").iterdir():
            f.chmod(0o644)


def body_of(doc: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "manifest_checksum"}).encode()


def sealed(body: bytes) -> bytes:
    return seal_manifest(body)


def write_new(root: Path, data: bytes) -> None:
    manifest_path(root, NEW).write_bytes(data)


def data_path(root: Path, relative: str, step: int = NEW) -> Path:
    return step_dir(root, step) / relative


def piece(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (p,) = doc["tensors"][name]["pieces"]
    return p  # type: ignore[no-any-return]


@contextlib.contextmanager
def quiet_cli() -> Iterator[None]:
    """The CLI's rich console, writing nowhere."""
    saved = cli.console
    cli.console = Console(file=io.StringIO())
    try:
        yield
    finally:
        cli.console = saved


def cli_verify(root: Path, step: int = NEW) -> bool:
    """``ckpt verify --step``: True when it says OK, False when CORRUPT (exit status 1)."""
    with quiet_cli():
        try:
            cli.verify(str(root), step=step, all_steps=False)
        except typer.Exit as exc:
            assert exc.exit_code == 1
            return False
    return True


def assert_restores_old(root: Path) -> None:
    target = blank()
    report = ckpt.restore(target, root)
    assert report.step == OLD, report
    assert [s for s, _ in report.skipped] == [NEW]
    for key, value in make_state(OLD).items():
        if isinstance(value, torch.Tensor):
            assert_bit_identical(target[key], value)


def assert_refused_everywhere(root: Path) -> None:
    """The newest step is refused by the reader, falls back on restore, fails verify, and
    inspect and ls report it without crashing."""
    with pytest.raises(ckpt.CorruptCheckpointError):
        Manifest.from_bytes(manifest_path(root, NEW).read_bytes(), "m")
    assert_restores_old(root)
    assert not cli_verify(root)
    with quiet_cli():
        with pytest.raises(ckpt.CorruptCheckpointError):
            cli.inspect(str(root), step=NEW)
        cli.list_steps(str(root))


# --- crafted manifests (each a reproduction from the issue) -----------------------------

DEEP = 100_000


def _text(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        assert old in body
        return body.replace(old, new, 1)

    return edit


def _doc(change: Callable[[dict[str, Any]], object]) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        doc = json.loads(body)
        change(doc)
        return body_of(doc)

    return edit


def _set(*path: Any, value: Any) -> Callable[[bytes], bytes]:
    def change(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return _doc(change)


def _overlap(doc: dict[str, Any]) -> None:
    """``w``'s rows 0..31 and 16..47: the element count is right, rows 48..63 are missing."""
    p = piece(doc, "w")
    digests = [p["checksums"][i : i + 16] for i in range(0, len(p["checksums"]), 16)]
    row = 64 * 4
    first = dict(p, lengths=[32, 64], byte_length=32 * row, checksums="".join(digests[0:2]))
    second = dict(
        p,
        offsets=[16, 0],
        lengths=[32, 64],
        byte_offset=p["byte_offset"] + 16 * row,
        byte_length=32 * row,
        checksums="".join(digests[1:3]),
    )
    doc["tensors"]["w"]["pieces"] = [first, second]


HOSTILE: dict[str, Callable[[bytes], bytes]] = {
    "5000-digit-int-in-state": _text(b'"seed": 5', b'"seed": [NaN, ' + b"9" * 5000 + b"]"),
    "5000-digit-int-as-step": _text(b'"step": 5', b'"step": ' + b"9" * 5000),
    "5000-digit-int-in-metadata": _text(
        b'"user_metadata": {}', b'"user_metadata": {"n": ' + b"7" * 5000 + b"}"
    ),
    "deep-user-metadata": _text(
        b'"user_metadata": {}', b'"user_metadata": {"x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    ),
    "deep-state": _text(b'"seed": 5', b'"seed": ' + b"[" * DEEP + b"]" * DEEP),
    "deep-state-with-nan": _text(
        b'"seed": 5', b'"seed": [NaN, ' + b"[" * DEEP + b"]" * DEEP + b"]"
    ),
    "state-deeper-than-readers-walk": _text(b'"seed": 5', b'"seed": ' + b"[" * 400 + b"]" * 400),
    "created-unix-nan": _set("created_unix", value=float("nan")),
    "created-unix-infinity": _set("created_unix", value=float("inf")),
    "created-unix-negative": _set("created_unix", value=-1.0),
    "user-metadata-list": _set("user_metadata", value=[1, 2]),
    "format-version-0": _set("format_version", value=0),
    "format-version-negative": _set("format_version", value=-1),
    "format-version-true": _set("format_version", value=True),
    "write-plan-in-v1": _set("plan", value={"key": "0" * 32, "imbalance": 1.0}),
    "overlapping-pieces": _doc(_overlap),
    "piece-outside-shape": _doc(lambda d: piece(d, "w").update(offsets=[1, 0])),
    "ndim-65": _doc(lambda d: d["tensors"]["b"].update(shape=[1] * 65)),
    "ref-to-missing-tensor": _set("state", "meta", "tags", value={"__tensor__": "nope"}),
    "header-of-unlisted-file": _doc(
        lambda d: d["headers"].update({"data/x.safetensors": {"length": 8, "checksum": "0" * 16}})
    ),
    "header-longer-than-file": _doc(
        lambda d: [h.update(length=10**12) for h in d["headers"].values()]
    ),
    "piece-inside-header": _doc(
        lambda d: [h.update(length=h["length"] + 8) for h in d["headers"].values()]
    ),
}


@pytest.mark.parametrize("edit", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_sealed_manifest_is_corrupt_and_restore_falls_back(
    root: Path, edit: Callable[[bytes], bytes]
) -> None:
    make_checkpoint(root)
    body = manifest_path(root, NEW).read_bytes()
    body = b"{" + body[body.index(b",") + 1 :]  # without the seal: a plain JSON object
    write_new(root, sealed(edit(json.dumps(json.loads(body)).encode())))
    assert_refused_everywhere(root)


def _zstd_bomb(doc: dict[str, Any], root: Path, elements: int) -> None:
    """``z`` claims ``elements`` float32 in one chunk; every other size stays consistent:
    chunk_bytes grows to hold it, each piece gets one checksum of its real stored bytes."""
    doc["chunk_bytes"] = 1 << 44
    for name, entry in doc["tensors"].items():
        for p in entry["pieces"]:
            data = data_path(root, p["file"]).read_bytes()
            stored = data[p["byte_offset"] : p["byte_offset"] + p["byte_length"]]
            p["checksums"] = checksum(stored)
            if p["codec"] == "zstd":
                p["chunk_sizes"] = [p["byte_length"]]
            if name == "z":
                entry["shape"] = p["lengths"] = [elements]


@pytest.mark.parametrize("elements", [2 * 10**9, 10**12], ids=["2e9", "1e12"])
def test_shape_bomb_is_refused_before_anything_is_allocated(root: Path, elements: int) -> None:
    """A compressed piece claiming 8 GB (or 4 TB) from a few hundred stored bytes: the
    checker bounds raw sizes by the stored sizes before a reader allocates anything."""
    make_checkpoint(root)
    doc = read_manifest(root, NEW)
    _zstd_bomb(doc, root, elements)
    write_new(root, sealed(body_of(doc)))
    with pytest.raises(ckpt.CorruptCheckpointError, match="cannot hold"):
        Manifest.from_bytes(manifest_path(root, NEW).read_bytes(), "m")
    assert_refused_everywhere(root)


def _rewrite_last_z_frame(root: Path, frame: bytes) -> None:
    """Replace the last zstd frame of ``z`` in its data file, keeping every size and
    checksum of the manifest consistent (re-sealed): only the frame's content is wrong."""
    doc = read_manifest(root, NEW)
    p = piece(doc, "z")
    path = data_path(root, p["file"])
    data = path.read_bytes()
    start = p["byte_offset"] + sum(p["chunk_sizes"][:-1])
    end = p["byte_offset"] + p["byte_length"]
    path.write_bytes(data[:start] + frame + data[end:])
    p["chunk_sizes"][-1] = len(frame)
    p["byte_length"] = sum(p["chunk_sizes"])
    p["checksums"] = p["checksums"][:-16] + checksum(frame)
    doc["files"][p["file"]] = len(data) - (end - start) + len(frame)
    write_new(root, sealed(body_of(doc)))


@pytest.mark.parametrize("content_size", [True, False], ids=["declared", "undeclared"])
def test_zstd_frame_that_decompresses_short_is_caught_by_verify_and_load(
    root: Path, content_size: bool
) -> None:
    make_checkpoint(root)
    short = zstandard.ZstdCompressor(write_content_size=content_size).compress(b"\0" * 1000)
    _rewrite_last_z_frame(root, short)
    Manifest.from_bytes(manifest_path(root, NEW).read_bytes(), "m")  # consistent sizes
    assert not cli_verify(root)
    assert_restores_old(root)
    with pytest.raises(ckpt.CorruptCheckpointError, match="decompress"):
        ckpt.load(blank(), root, step=NEW)


# --- the safetensors header checksum (defect 12) ----------------------------------------


def raw_files(root: Path, step: int = NEW) -> list[Path]:
    return sorted((step_dir(root, step) / "data").glob("*.safetensors"))


def test_manifest_records_each_raw_files_header_and_its_checksum(root: Path) -> None:
    make_checkpoint(root)
    doc = read_manifest(root, NEW)
    files = raw_files(root)
    assert sorted(doc["headers"]) == sorted(f"data/{f.name}" for f in files)
    for f in files:
        record = doc["headers"][f"data/{f.name}"]
        data = f.read_bytes()
        assert record["length"] == 8 + int.from_bytes(data[:8], "little")
        assert record["checksum"] == checksum(data[: record["length"]])
    assert not any(name.endswith(".zst") for name in doc["headers"])


def test_every_flipped_header_byte_is_caught_by_verify_and_full_load(root: Path) -> None:
    """Was 40/40 unnoticed by verify (and 37/40 left files safetensors cannot read)."""
    make_checkpoint(root)
    (path,) = raw_files(root)
    original = path.read_bytes()
    length = 8 + int.from_bytes(original[:8], "little")
    for at in random.Random(0).sample(range(length), 40):
        data = bytearray(original)
        data[at] ^= 1 << (at % 8)
        path.write_bytes(bytes(data))
        assert not cli_verify(root), at
        with pytest.raises(ckpt.ChecksumMismatchError, match="safetensors header"):
            ckpt.load(blank(), root, step=NEW)
    path.write_bytes(original)
    assert cli_verify(root)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"w", "b"}


def test_header_rewritten_with_a_matching_checksum_is_caught_by_verify(root: Path) -> None:
    """A hostile header re-summed in a re-sealed manifest: verify checks that the header
    describes the manifest's pieces, so the raw file stays a faithful safetensors file."""
    make_checkpoint(root)
    (path,) = raw_files(root)
    data = path.read_bytes()
    length = 8 + int.from_bytes(data[:8], "little")
    header = data[:length].replace(b'"shape":[64,64]', b'"shape":[32,128]')
    assert header != data[:length]
    path.write_bytes(header + data[length:])
    doc = read_manifest(root, NEW)
    doc["headers"][f"data/{path.name}"]["checksum"] = checksum(header)
    write_new(root, sealed(body_of(doc)))
    assert not cli_verify(root)


def test_manifest_without_header_records_stays_readable(root: Path) -> None:
    """Manifests written before the header checksum carry no 'headers': still loaded, verified."""
    make_checkpoint(root)
    doc = read_manifest(root, NEW)
    del doc["headers"]
    write_new(root, sealed(body_of(doc)))
    assert Manifest.from_bytes(manifest_path(root, NEW).read_bytes(), "m").headers == {}
    assert cli_verify(root)
    assert ckpt.load(blank(), root) == NEW


def test_check_safetensors_header_refuses_gaps_and_foreign_tensors() -> None:
    header = b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    header += b" " * (-len(header) % 8)
    data = len(header).to_bytes(8, "little") + header
    at = len(data)
    check_safetensors_header(data, at + 8, [("t", "float32", (2,), at, 8)], "f")
    with pytest.raises(ckpt.CorruptCheckpointError):
        check_safetensors_header(data, at + 16, [("t", "float32", (2,), at, 8)], "f")
    with pytest.raises(ckpt.CorruptCheckpointError):
        check_safetensors_header(data, at + 8, [("u", "float32", (2,), at, 8)], "f")
    with pytest.raises(ckpt.CorruptCheckpointError):
        check_safetensors_header(data[:-1], at + 8, [("t", "float32", (2,), at, 8)], "f")


def test_a_tensor_named_like_the_safetensors_metadata_is_refused_at_save(root: Path) -> None:
    with pytest.raises(ckpt.InvalidStateError, match="__metadata__"):
        ckpt.save({"__metadata__": torch.zeros(2)}, root, step=1)
    assert not manifest_path(root, 1).exists()


# --- random byte flips over every byte class --------------------------------------------


def _regions(root: Path) -> dict[str, list[tuple[Path, int, int]]]:
    """(file, first, end) ranges of each byte class of step NEW."""
    doc = read_manifest(root, NEW)
    classes: dict[str, list[tuple[Path, int, int]]] = {
        "raw data": [],
        "zstd data": [],
        "safetensors header": [],
    }
    for entry in doc["tensors"].values():
        for p in entry["pieces"]:
            kind = "raw data" if p["codec"] == "raw" else "zstd data"
            first = p["byte_offset"]
            classes[kind].append((data_path(root, p["file"]), first, first + p["byte_length"]))
    for name, record in doc["headers"].items():
        classes["safetensors header"].append((data_path(root, name), 0, record["length"]))
    manifest = manifest_path(root, NEW)
    classes["manifest"] = [(manifest, 0, manifest.stat().st_size)]
    return classes


def _shard_index(root: Path) -> bytes:
    m = Manifest.from_bytes(manifest_path(root, NEW).read_bytes(), "m")
    index = ShardIndex(rank=0, tensors=m.tensors, files=m.files, state=m.state, headers=m.headers)
    return index.to_bytes()


def flip_campaign(root: Path, trials: int, seed: int = 0) -> dict[str, tuple[int, int, int]]:
    """Flip one random bit pattern of one random byte of each class, ``trials`` times in all;
    each flip must be caught (verify CORRUPT and restore falling back; a shard index refused
    by ``ShardIndex.from_bytes``). Returns class -> (trials, detected, escapes)."""
    rng = random.Random(seed)
    regions = _regions(root)
    report = _shard_index(root)
    ShardIndex.from_bytes(report, "index", CHUNK)
    names = [*regions, "shard index"]
    table = {name: [0, 0, 0] for name in names}
    for i in range(trials):
        name = names[i % len(names)]
        mask = rng.randrange(1, 256)
        row = table[name]
        row[0] += 1
        if name == "shard index":
            data = bytearray(report)
            data[rng.randrange(len(data))] ^= mask
            try:
                ShardIndex.from_bytes(bytes(data), "index", CHUNK)
            except ckpt.CorruptCheckpointError:
                row[1] += 1
            except Exception:
                row[2] += 1
            continue
        path, first, end = rng.choice(regions[name])
        original = path.read_bytes()
        data = bytearray(original)
        data[rng.randrange(first, end)] ^= mask
        path.write_bytes(bytes(data))
        try:
            caught = not cli_verify(root)
            target = blank()
            restored = ckpt.restore(target, root).step
            if caught and restored == OLD:
                row[1] += 1
        except Exception:
            row[2] += 1
        finally:
            path.write_bytes(original)
    return {name: (t, d, e) for name, (t, d, e) in table.items()}


@pytest.mark.campaign
def test_random_byte_flips_in_every_class_are_all_detected(
    root: Path, full: bool, campaign_table: CampaignTable
) -> None:
    make_checkpoint(root)
    trials = 1000 if full else 60
    table = flip_campaign(root, trials)
    for name, (t, d, e) in table.items():
        campaign_table.record(
            f"byte flips: {name}", trials=t, detected=d, missed=t - d - e, escapes=e
        )
    assert sum(t for t, _, _ in table.values()) == trials
    for name, (t, d, e) in table.items():
        assert e == 0 and d == t, (name, table)


# --- structural fuzzing of sealed manifests, under a memory limit ------------------------

_BIG_INT = "@@BIG_INT@@"
_DEEP = "@@DEEP@@"

_HOSTILE_VALUES: st.SearchStrategy[Any] = st.sampled_from(
    [
        None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, 10**12, 2 * 10**9, -(2**63),
        float("nan"), float("inf"), float("-inf"), 1e300, 0.5, "", "x", "../x", "/etc/passwd",
        "data/../../x", "a\\b", "\x00", [], {}, [1, 2], {"a": 1}, [[[[1]]]],
        {"__tensor__": "w"}, {"__tensor__": 3}, {"__items__": 1}, {"__bytes__": "!!"},
        {"__dtype__": "float128"}, {"__tuple__": {}}, _BIG_INT, _DEEP, [10**12], [2 * 10**9],
        [0, 0, 0], list(range(70)),
    ]
)  # fmt: skip


def _key_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _key_paths(v, (*prefix, k))
    elif isinstance(node, list) and len(node) <= 8:
        for i, v in enumerate(node):
            out += _key_paths(v, (*prefix, i))
    return out


def mutate(doc: dict[str, Any], path: tuple[Any, ...], action: str, value: Any) -> bytes:
    """The sealed manifest ``doc`` with ``path`` replaced by ``value``, removed, or given an
    extra key; huge integers and deep nesting are spliced into the text."""
    mutated = copy.deepcopy(doc)
    mutated.pop("manifest_checksum", None)
    node = mutated
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if action == "remove" and isinstance(node, dict):
        del node[last]
    elif action == "extra" and isinstance(node[last], dict):
        node[last]["__extra__"] = value
    else:
        node[last] = value
    text = json.dumps(mutated)
    text = text.replace(f'"{_BIG_INT}"', "9" * 5000)
    text = text.replace(f'"{_DEEP}"', "[" * DEEP + "]" * DEEP)
    return sealed(text.encode())


def check_mutation(root: Path, doc: dict[str, Any], data: bytes) -> str:
    """Run every reader over a mutated newest manifest; only CheckpointError may escape.
    Returns 'refused' (restore fell back to the older step) or 'accepted' (it loaded)."""
    write_new(root, data)
    try:
        Manifest.from_bytes(data, "m")
        refused = False
    except ckpt.CheckpointError:
        refused = True
    with quiet_cli():
        exported = root.parent / "exported"
        commands: list[Callable[[], None]] = [
            lambda: cli.verify(str(root), step=NEW, all_steps=False),
            lambda: cli.inspect(str(root), step=NEW),
            lambda: cli.list_steps(str(root)),
            lambda: cli.convert(str(root), str(exported), step=NEW, to="safetensors"),
            lambda: cli.gc(str(root), keep_last=2, dry_run=True),
            lambda: cli.gc(str(root), keep_last=2),
        ]
        outside = _outside_snapshot(root, exported)
        for command in commands:
            try:
                command()
            except (ckpt.CheckpointError, typer.Exit):
                pass
        shutil.rmtree(exported, ignore_errors=True)
        assert _outside_snapshot(root, exported) == outside, "something outside the root changed"
    target = blank()
    try:
        step = ckpt.restore(target, root).step
    except ckpt.StateMismatchError:
        assert not refused  # a valid manifest that does not fit the state
        return "accepted"
    if refused:
        assert step == OLD
        for key, value in make_state(OLD).items():
            if isinstance(value, torch.Tensor):
                assert_bit_identical(target[key], value)
    return "refused" if refused else "accepted"


def _outside_snapshot(root: Path, *ignored: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file beside ``root`` (the fuzz directory), for proving that
    the commands touched nothing outside the checkpoint root."""
    skip = {root, *ignored}
    out: dict[str, tuple[int, int]] = {}
    for path in root.parent.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        st = path.lstat()
        out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def fuzz(root: Path, examples: int) -> dict[str, int]:
    make_checkpoint(root)
    doc = read_manifest(root, NEW)
    paths = [p for p in _key_paths(doc) if p[0] != "manifest_checksum"]
    counts = {"refused": 0, "accepted": 0}

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        path=st.sampled_from(paths),
        action=st.sampled_from(["replace", "remove", "extra"]),
        value=_HOSTILE_VALUES,
    )
    def run(path: tuple[Any, ...], action: str, value: Any) -> None:
        counts[check_mutation(root, doc, mutate(doc, path, action, value))] += 1

    run()
    return counts


def fuzz_worker(root: str, examples: int, headroom: int) -> None:
    """Entry point of the subprocess: warm up, cap the address space, fuzz."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    warm = path / "warm"
    warm.mkdir()
    make_checkpoint(warm)
    ckpt.restore(blank(), warm)
    with quiet_cli():
        cli.verify(str(warm), step=NEW, all_steps=False)
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))
    counts = fuzz(path / "fuzz", examples)
    print(json.dumps({"counts": counts, "limit_bytes": vm + headroom}))


@pytest.mark.campaign
def test_fuzzed_sealed_manifests_raise_only_checkpoint_errors_within_a_memory_cap(
    tmp_path: Path, full: bool, campaign_table: CampaignTable
) -> None:
    """Structural mutations of a sealed manifest (types, huge, negative and NaN numbers,
    deep nesting, removed and extra keys, paths): only CheckpointError escapes from the
    reader, restore (falling back to the older step when the reader refuses), verify,
    inspect and ls; all in a subprocess whose address space is capped at what it used after
    a warm-up load plus 1 GiB, so an allocation sized from a hostile manifest fails."""
    examples = 600 if full else 40
    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=str(ROOT_OF_REPO))
    code = (
        "import sys; from tests.ckpt.test_hostile_manifests import fuzz_worker; "
        "fuzz_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fuzz"), str(examples), str(1 << 30)],
        cwd=ROOT_OF_REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600 if full else 240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    campaign_table.record(
        "hostile manifests (hypothesis): load, restore, ls, inspect, verify, convert, gc",
        trials=sum(summary["counts"].values()),
        refused_fell_back=summary["counts"]["refused"],
        still_valid=summary["counts"]["accepted"],
        escapes=0,
        outside=0,
        hangs=0,
    )
    assert sum(summary["counts"].values()) >= examples // 2
    assert summary["counts"]["refused"] > 0


def test_fuzz_worker_memory_cap_stops_a_large_allocation(tmp_path: Path) -> None:
    """The cap the fuzz runs under is real: a 4 GiB allocation fails inside it."""
    code = (
        "import resource, torch\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
        "if l.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))\n"
        "try:\n    torch.empty(1 << 32, dtype=torch.uint8).fill_(1)\n"
        "except (RuntimeError, MemoryError):\n    print('refused')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "refused", result.stderr[-2000:]


def test_a_state_nested_deeper_than_readers_accept_is_refused_at_save(root: Path) -> None:
    """Save refuses what readers would refuse, so no step is committed that cannot load."""
    deep: Any = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(ckpt.InvalidStateError, match="deep"):
        ckpt.save({"w": torch.zeros(2), "deep": deep}, root, step=1)
    assert not manifest_path(root, 1).exists()
    ckpt.save({"w": torch.zeros(2)}, root, step=2)
    assert ckpt.load({"w": torch.ones(2)}, root) == 2


def test_the_deepest_state_save_accepts_loads_back(root: Path) -> None:
    """100 nested dicts with integer keys (3 JSON levels each) are within the readers' bound,
    and the stored tree walks back without running out of stack."""
    deep: Any = 1
    for _ in range(99):
        deep = {0: deep}
    ckpt.save({"w": torch.zeros(2), "deep": deep}, root, step=1)
    target: dict[str, Any] = {"w": torch.ones(2), "deep": {}}
    assert ckpt.load(target, root) == 1
    assert target["deep"] == deep

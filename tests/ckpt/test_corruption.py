"""Corrupt, truncated, missing and hostile checkpoints: clear ckpt errors and restore fallback.

The checkpoints here are format v1 (every piece in the manifest, where these tests tamper
with them); tests/ckpt/test_format_v2.py tampers with v2's index files."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from tests.support.checks import assert_bit_identical
from tests.support.on_disk import (
    data_file,
    flip_byte,
    manifest_path,
    piece_of,
    read_manifest,
    save_with,
    step_dir,
    write_manifest,
)

CHUNK = 4096
STEP = 5


def make_state(seed: int = 0) -> dict[str, Any]:
    """A small state: a multi-chunk weight, a bias, a 0-dim tensor and plain values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 64, generator=gen),  # 16 KiB = 4 chunks of 4 KiB
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "s": torch.tensor(seed, dtype=torch.int64),
        "meta": {"seed": seed, "name": "run"},
    }


def blank_like(state: dict[str, Any]) -> dict[str, Any]:
    """A load target with the same tensors zeroed and the plain values emptied."""
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {} for k, v in state.items()}


def save(root: Path, step: int = STEP, *, seed: int = 0, compress: bool = False) -> dict[str, Any]:
    """Save ``make_state(seed)`` with 4 KiB chunks (optionally zstd) and return it."""
    state = make_state(seed)
    compression = ckpt.Compression(patterns=("w",), min_bytes=0) if compress else None
    options = ckpt.SaveOptions(chunk_bytes=CHUNK, compression=compression, format_version=1)
    save_with(state, root, step, options)
    return state


def assert_loaded(target: dict[str, Any], state: dict[str, Any]) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert_bit_identical(target[key], value)
        else:
            assert target[key] == value


def edit_manifest(root: Path, edit: Callable[[dict[str, Any]], None], step: int = STEP) -> None:
    doc = read_manifest(root, step)
    edit(doc)
    write_manifest(root, step, doc)


def load_step(root: Path, step: int = STEP) -> int:
    return ckpt.load(blank_like(make_state()), root, step=step)


# --- checksums ----------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("chunk_index", [0, 2])
def test_flipped_byte_raises_checksum_mismatch_naming_tensor_file_and_range(
    root: Path, compress: bool, chunk_index: int
) -> None:
    """One flipped byte inside a tensor's data names the tensor, the file and the chunk's byte range."""
    save(root, compress=compress)
    piece = piece_of(root, STEP, "w")
    if compress:
        sizes = piece["chunk_sizes"]
        first = piece["byte_offset"] + sum(sizes[:chunk_index])
        last = first + sizes[chunk_index] - 1
    else:
        first = piece["byte_offset"] + chunk_index * CHUNK
        last = first + CHUNK - 1
    flip_byte(data_file(root, STEP, piece["file"]), (first + last) // 2)

    with pytest.raises(ckpt.ChecksumMismatchError) as info:
        load_step(root)
    err = info.value
    assert isinstance(err, ckpt.CorruptCheckpointError)
    assert err.tensor == "w"
    assert err.file == piece["file"]
    assert err.byte_range == (first, last)
    message = str(err)
    assert "'w'" in message and piece["file"] in message and f"{first}..{last}" in message


def test_flipped_byte_in_a_zero_dim_tensor_is_detected(root: Path) -> None:
    """Even an 8-byte scalar carries a checksum."""
    save(root)
    piece = piece_of(root, STEP, "s")
    flip_byte(data_file(root, STEP, piece["file"]), piece["byte_offset"])
    with pytest.raises(ckpt.ChecksumMismatchError) as info:
        load_step(root)
    assert info.value.tensor == "s"


def test_every_chunk_is_verified_on_a_full_load(root: Path) -> None:
    """A flipped byte in any chunk of any tensor fails the load; no corruption slips through."""
    state = save(root)
    doc = read_manifest(root, STEP)
    for name, entry in doc["tensors"].items():
        (piece,) = entry["pieces"]
        path = data_file(root, STEP, piece["file"])
        for offset in range(
            piece["byte_offset"], piece["byte_offset"] + piece["byte_length"], 1500
        ):
            flip_byte(path, offset)
            with pytest.raises(ckpt.ChecksumMismatchError) as info:
                load_step(root)
            assert info.value.tensor == name
            flip_byte(path, offset)  # repair
    target = blank_like(state)
    ckpt.load(target, root, step=STEP)
    assert_loaded(target, state)


# --- data files ---------------------------------------------------------------------


@pytest.mark.parametrize("change", ["truncate", "extend", "delete"])
def test_damaged_data_file_raises_corrupt_naming_the_file(root: Path, change: str) -> None:
    """A truncated, extended or deleted data file fails verification and is named."""
    save(root)
    relative = piece_of(root, STEP, "w")["file"]
    path = data_file(root, STEP, relative)
    path.chmod(0o644)
    if change == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif change == "extend":
        path.write_bytes(path.read_bytes() + b"\0")
    else:
        path.unlink()
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        load_step(root)
    assert not isinstance(info.value, ckpt.ChecksumMismatchError)
    assert relative in str(info.value)
    assert ("missing" if change == "delete" else "bytes") in str(info.value)


# --- the manifest -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"not json at all", b"\xff\xfe\x00", b"[1, 2, 3]", b"null", b'"text"'],
    ids=["empty", "truncated", "garbage", "binary", "array", "null", "string"],
)
def test_manifest_that_is_not_a_json_object_is_corrupt(root: Path, content: bytes) -> None:
    """A manifest that does not parse to a JSON object raises CorruptCheckpointError naming it."""
    save(root)
    path = manifest_path(root, STEP)
    path.chmod(0o644)
    path.write_bytes(content)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        load_step(root)
    assert "manifest.json" in str(info.value)


def test_a_changed_plain_value_in_the_manifest_fails_its_checksum(root: Path) -> None:
    """Plain values live only in the manifest: its own checksum catches a change to one."""
    save(root)
    path = manifest_path(root, STEP)
    data = path.read_bytes()
    assert b'"step":' in data
    tampered = data.replace(b'"step":', b'"stap":', 1)
    path.chmod(0o644)
    path.write_bytes(tampered)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"manifest\.json: checksum mismatch"):
        load_step(root)


_REQUIRED = [
    "format",
    "format_version",
    "step",
    "generation",
    "world_size",
    "checksum_algorithm",
    "chunk_bytes",
    "files",
    "tensors",
    "state",
]


@pytest.mark.parametrize("field", _REQUIRED)
def test_manifest_missing_a_field_is_corrupt(root: Path, field: str) -> None:
    """Each required top-level field, when absent, gives a CorruptCheckpointError."""
    save(root)
    edit_manifest(root, lambda doc: doc.pop(field))
    with pytest.raises(ckpt.CorruptCheckpointError):
        load_step(root)


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets ``doc[path[0]]...[path[-1]] = value``; 'PIECE' stands for w's piece."""

    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        keys = [
            k
            for part in path
            for k in (("tensors", "w", "pieces", 0) if part == "PIECE" else (part,))
        ]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


WRONG_TYPES: dict[str, Callable[[dict[str, Any]], None]] = {
    "format-name": _set("format", value="safetensors"),
    "version-string": _set("format_version", value="1"),
    "step-string": _set("step", value="5"),
    "step-negative": _set("step", value=-5),
    "step-bool": _set("step", value=True),
    "step-other": _set("step", value=6),
    "world-size-zero": _set("world_size", value=0),
    "chunk-bytes-zero": _set("chunk_bytes", value=0),
    "chunk-bytes-float": _set("chunk_bytes", value=4096.0),
    "files-list": _set("files", value=[]),
    "file-size-string": lambda doc: doc["files"].update({k: "1" for k in doc["files"]}),
    "tensors-list": _set("tensors", value=[]),
    "tensor-not-object": _set("tensors", "w", value=5),
    "dtype-unknown": _set("tensors", "w", "dtype", value="float128"),
    "dtype-list": _set("tensors", "w", "dtype", value=["float32"]),
    "shape-string": _set("tensors", "w", "shape", value="64x64"),
    "shape-negative": _set("tensors", "w", "shape", value=[-64, -64]),
    "pieces-object": _set("tensors", "w", "pieces", value={}),
    "pieces-missing": _set("tensors", "w", "pieces", value=[]),
    "piece-not-object": _set("tensors", "w", "pieces", 0, value="piece"),
    "offsets-missing": _set("PIECE", "offsets", value=None),
    "offsets-rank": _set("PIECE", "offsets", value=[0]),
    "lengths-rank": _set("PIECE", "lengths", value=[64, 64, 1]),
    "offset-negative": _set("PIECE", "byte_offset", value=-1),
    "length-string": _set("PIECE", "byte_length", value="16384"),
    "length-short": _set("PIECE", "byte_length", value=16000),
    "checksums-int": _set("PIECE", "checksums", value=123),
    "checksums-short": _set("PIECE", "checksums", value="00"),
    "file-int": _set("PIECE", "file", value=7),
    "file-unlisted": _set("PIECE", "file", value="data/other.safetensors"),
    "chunk-sizes": _set("PIECE", "codec", value="zstd"),
    "state-list": _set("state", value=[]),
    "generation-int": _set("generation", value=1),
}


@pytest.mark.parametrize("edit", list(WRONG_TYPES.values()), ids=list(WRONG_TYPES))
def test_manifest_with_wrong_field_types_is_corrupt(
    root: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    """Fields of the wrong type or value raise CorruptCheckpointError, never KeyError/TypeError."""
    save(root)
    edit_manifest(root, edit)
    with pytest.raises(ckpt.CorruptCheckpointError):
        load_step(root)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_set("format_version", value=99), "format version 99"),
        (_set("checksum_algorithm", value="md5"), "checksum algorithm"),
        (_set("PIECE", "codec", value="lz4"), "codec"),
    ],
    ids=["version-99", "checksum-md5", "codec-lz4"],
)
def test_newer_or_unknown_format_raises_unsupported(
    root: Path, edit: Callable[[dict[str, Any]], None], words: str
) -> None:
    """A format version, checksum or codec this reader does not know raises UnsupportedFormatError."""
    save(root)
    edit_manifest(root, edit)
    with pytest.raises(ckpt.UnsupportedFormatError) as info:
        load_step(root)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("offsets", "lengths"),
    [([0, 1], [64, 64]), ([64, 0], [1, 64]), ([0, 0], [65, 64])],
    ids=["shifted", "past-end", "too-long"],
)
def test_piece_outside_the_shape_is_corrupt(
    root: Path, offsets: list[int], lengths: list[int]
) -> None:
    """A piece that does not lie inside its tensor's global shape is refused."""
    save(root)

    def edit(doc: dict[str, Any]) -> None:
        doc["tensors"]["w"]["pieces"][0].update(offsets=offsets, lengths=lengths)

    edit_manifest(root, edit)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        load_step(root)
    assert "outside the shape" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../../x",
        "data/../../x",
        "..",
        "data\\..\\x",
        "./data/x",
    ],
)
@pytest.mark.parametrize("where", ["files", "piece"])
def test_file_path_leaving_the_prefix_is_refused(root: Path, bad: str, where: str) -> None:
    """A path in the manifest that is absolute, climbs out or is not normalised is never read."""
    save(root)
    original = piece_of(root, STEP, "w")["file"]

    def edit(doc: dict[str, Any]) -> None:
        if where == "files":
            doc["files"][bad] = doc["files"][original]
        else:
            doc["tensors"]["w"]["pieces"][0]["file"] = bad

    edit_manifest(root, edit)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        load_step(root)
    assert "leave the checkpoint prefix" in str(info.value)
    assert repr(bad) in str(info.value)


def test_byte_range_beyond_the_file_is_corrupt(root: Path) -> None:
    """A piece whose bytes would lie past the end of its file is refused before reading."""
    save(root)
    size = read_manifest(root, STEP)["files"][piece_of(root, STEP, "w")["file"]]
    edit_manifest(root, _set("PIECE", "byte_offset", value=size - 100))
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        load_step(root)
    assert "past the end" in str(info.value)


HOSTILE_TREES: dict[str, tuple[str, Any, type[ckpt.CheckpointError]]] = {
    "items-not-list": ("meta", {"__items__": 5}, ckpt.CorruptCheckpointError),
    "items-bad-pair": ("meta", {"__items__": [[1]]}, ckpt.CorruptCheckpointError),
    "items-unhashable-key": ("meta", {"__items__": [[[1], 2]]}, ckpt.CorruptCheckpointError),
    "tuple-not-list": ("meta", {"__tuple__": 3}, ckpt.CorruptCheckpointError),
    "bytes-not-base64": ("meta", {"__bytes__": "!!!x"}, ckpt.CorruptCheckpointError),
    "bytes-not-text": ("meta", {"__bytes__": 5}, ckpt.CorruptCheckpointError),
    "dtype-not-text": ("meta", {"__dtype__": ["float32"]}, ckpt.CorruptCheckpointError),
    "dtype-unknown": ("meta", {"__dtype__": "float128"}, ckpt.CorruptCheckpointError),
    # A manifest referring to a tensor it does not store is inconsistent: corrupt, so that
    # restore falls back (and ckpt verify, which has no target state, catches it too).
    "ref-unknown-tensor": ("meta", {"x": {"__tensor__": "nope"}}, ckpt.CorruptCheckpointError),
    "ref-not-text": ("meta", {"__tensor__": ["w"]}, ckpt.CorruptCheckpointError),
    "tensor-became-value": ("w", 3, ckpt.StateMismatchError),
    "tensor-became-dict": ("w", {"a": 1}, ckpt.StateMismatchError),
}


@pytest.mark.parametrize(
    ("key", "tree", "error"), list(HOSTILE_TREES.values()), ids=list(HOSTILE_TREES)
)
def test_malformed_state_tree_raises_a_checkpoint_error(
    root: Path, key: str, tree: Any, error: type[ckpt.CheckpointError]
) -> None:
    """A state tree with broken markers, or a value where the state has a tensor, is refused by name."""
    save(root)
    edit_manifest(root, _set("state", key, value=tree))
    with pytest.raises(error) as info:
        load_step(root)
    assert repr(key) in str(info.value) or f"'{key}." in str(info.value)


def test_optimizer_tree_that_torch_refuses_is_a_state_mismatch(root: Path) -> None:
    """An optimizer state that load_state_dict rejects surfaces as StateMismatchError, not a torch error."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save({"optim": opt}, root, step=STEP, options=ckpt.SaveOptions(format_version=1))
    edit_manifest(root, _set("state", "optim", "param_groups", value="garbage"))
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load({"optim": torch.optim.SGD(model.parameters(), lr=0.1)}, root, step=STEP)
    assert "'optim'" in str(info.value)


# --- restore fallback ---------------------------------------------------------------


def _flip_w(root: Path, step: int) -> None:
    piece = piece_of(root, step, "w")
    flip_byte(data_file(root, step, piece["file"]), piece["byte_offset"] + 10)


def _garble_manifest(root: Path, step: int) -> None:
    path = manifest_path(root, step)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:50])


def _delete_data(root: Path, step: int) -> None:
    data_file(root, step, piece_of(root, step, "w")["file"]).unlink()


def _future_version(root: Path, step: int) -> None:
    edit_manifest(root, _set("format_version", value=99), step=step)


CORRUPTIONS: dict[str, Callable[[Path, int], None]] = {
    "flipped-byte": _flip_w,
    "garbled-manifest": _garble_manifest,
    "deleted-data": _delete_data,
    "future-version": _future_version,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_restore_falls_back_to_the_previous_committed_step(
    root: Path, corrupt: Callable[[Path, int], None], caplog: pytest.LogCaptureFixture
) -> None:
    """The newest step fails verification: restore loads the one before, says which it skipped, logs why."""
    states = {step: save(root, step, seed=step) for step in (1, 2, 3)}
    corrupt(root, 3)
    target = blank_like(states[1])
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        report = ckpt.restore(target, root)
    assert report.step == 2
    assert [s for s, _ in report.skipped] == [3]
    assert report.skipped[0][1]
    assert_loaded(target, states[2])
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("ckpt")
    ]
    assert any("step 3" in r.getMessage() for r in warnings)
    # Asking for the corrupt step by number never falls back.
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.load(blank_like(states[1]), root, step=3)
    # load(step=None) takes the same fallback.
    assert ckpt.load(blank_like(states[1]), root) == 2


def test_restore_skips_several_corrupt_steps(root: Path) -> None:
    """Fallback continues past more than one bad step, newest first."""
    states = {step: save(root, step, seed=step) for step in (1, 2, 3)}
    _flip_w(root, 3)
    _garble_manifest(root, 2)
    target = blank_like(states[1])
    report = ckpt.restore(target, root)
    assert report.step == 1
    assert [s for s, _ in report.skipped] == [3, 2]
    assert_loaded(target, states[1])


def test_every_committed_step_corrupt_raises_corrupt(root: Path) -> None:
    """When no committed step verifies, restore raises CorruptCheckpointError naming each step."""
    for step in (1, 2):
        save(root, step, seed=step)
        _flip_w(root, step)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        ckpt.restore(blank_like(make_state()), root)
    assert "step 1" in str(info.value) and "step 2" in str(info.value)


def test_no_checkpoint_raises_not_found(root: Path) -> None:
    """An empty root, or a step that was never saved, raises CheckpointNotFoundError."""
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.restore(blank_like(make_state()), root)
    save(root, 1)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load(blank_like(make_state()), root, step=2)


def test_prefix_without_manifest_is_never_picked(root: Path) -> None:
    """An abandoned partial save (data, no manifest) is invisible, even when it is the newest."""
    committed = save(root, 1, seed=1)
    save(root, 9, seed=9)
    manifest_path(root, 9).unlink()
    assert (step_dir(root, 9) / "data").is_dir()
    target = blank_like(committed)
    report = ckpt.restore(target, root)
    assert report.step == 1 and report.skipped == ()
    assert_loaded(target, committed)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load(blank_like(committed), root, step=9)


# --- fuzzing ------------------------------------------------------------------------


_FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _model_and_optimizer(seed: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    return model, opt


def _fuzz_checkpoint(root: Path) -> dict[str, Any]:
    """Save tensors (one compressed), values, a module and an optimizer with moments."""
    state = make_state()
    state["model"], state["optim"] = _model_and_optimizer(0, steps=1)
    options = ckpt.SaveOptions(
        chunk_bytes=CHUNK,
        compression=ckpt.Compression(patterns=("w",), min_bytes=0),
        format_version=1,
    )
    save_with(state, root, STEP, options)
    manifest_path(root, STEP).chmod(0o644)
    return state


def _check_outcome(root: Path, state: dict[str, Any], mutated: bytes) -> None:
    """Load with a mutated manifest: correct tensors or a CheckpointError, nothing else."""
    manifest_path(root, STEP).write_bytes(mutated)
    target = blank_like(make_state())
    target["model"], target["optim"] = _model_and_optimizer(1, steps=0)
    try:
        ckpt.load(target, root, step=STEP)
    except ckpt.CheckpointError:
        return
    # Tensor bytes are covered by checksums; plain values in the manifest are not.
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert_bit_identical(target[key], value)
    for key, value in state["model"].state_dict().items():
        assert_bit_identical(target["model"].state_dict()[key], value)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def test_fuzzed_manifest_bytes_give_correct_data_or_a_checkpoint_error(root: Path) -> None:
    """Random byte edits of a real manifest never escape as a non-ckpt exception or wrong tensors."""
    state = _fuzz_checkpoint(root)
    original = manifest_path(root, STEP).read_bytes()

    @_FUZZ
    @given(
        edits=st.lists(
            st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)),
            min_size=1,
            max_size=4,
        ),
        cut=st.none() | st.integers(0, len(original)),
    )
    def check(edits: list[tuple[int, int]], cut: int | None) -> None:
        data = bytearray(original)
        for at, value in edits:
            data[at] = value
        _check_outcome(root, state, bytes(data[:cut] if cut is not None else data))

    check()


def test_fuzzed_manifest_fields_give_correct_data_or_a_checkpoint_error(root: Path) -> None:
    """Any field of a real manifest replaced by any JSON value, or removed, gives a ckpt error or correct data."""
    state = _fuzz_checkpoint(root)
    doc = read_manifest(root, STEP)
    paths = _paths(doc)

    @_FUZZ
    @given(path=st.sampled_from(paths), value=_JSON_VALUES, remove=st.booleans())
    def check(path: tuple[Any, ...], value: Any, remove: bool) -> None:
        mutated = copy.deepcopy(doc)
        node = mutated
        for key in path[:-1]:
            node = node[key]
        if remove and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = value
        _check_outcome(root, state, json.dumps(mutated).encode())

    check()

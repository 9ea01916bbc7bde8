"""The on-storage format v1: step prefixes, safetensors data, JSON manifest, zstd chunks, values."""

from __future__ import annotations

import json
import math
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from safetensors import safe_open

import ckpt
from ckpt.coordination import LocalCoordinator
from tests.support.checks import assert_bit_identical, bits
from tests.support.on_disk import data_file, read_manifest, save_with, step_dir

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

FLOAT8 = [
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d
]
DTYPES: list[torch.dtype] = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    *FLOAT8,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs, infinities and denormals included for floats)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def all_dtype_state() -> dict[str, torch.Tensor]:
    """One tensor per supported dtype in several shapes: 2-D, 0-dim and 0-size."""
    state: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        name = str(dtype).removeprefix("torch.")
        state[f"{name}.matrix"] = random_tensor(dtype, (5, 7), seed=i)
        state[f"{name}.scalar"] = random_tensor(dtype, (), seed=100 + i)
        state[f"{name}.empty"] = torch.empty((0, 3), dtype=dtype)
    return state


def data_files(root: Path, step: int) -> list[Path]:
    return sorted(p for p in (step_dir(root, step) / "data").rglob("*") if p.is_file())


def compressible(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Highly compressible data: a short repeating ramp."""
    return (torch.arange(n) % 17).to(dtype)


# --- safetensors data files -------------------------------------------------------------


def test_uncompressed_data_files_are_safetensors_holding_identical_tensors(root: Path) -> None:
    """With compression off every data file opens with safe_open and holds the exact bytes saved."""
    state = all_dtype_state()
    save_with(state, root, 1)
    files = data_files(root, 1)
    assert files and all(p.suffix == ".safetensors" for p in files)
    seen: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                stored = f.get_tensor(key)
                original = state[key]
                if original.is_complex():
                    original = torch.view_as_real(original)  # complex is stored as its real view
                assert_bit_identical(stored, original)
                seen.add(key)
    # Every non-empty tensor is stored; 0-size ones need no bytes.
    assert seen == {k for k, t in state.items() if t.numel() > 0}


def test_all_dtypes_round_trip_bit_identically(root: Path) -> None:
    """Every supported dtype, 0-dim and 0-size tensors included, loads back bit for bit."""
    state = all_dtype_state()
    ckpt.save(state, root, step=1)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    assert ckpt.load(target, root, step=1) == 1
    for key, value in state.items():
        assert_bit_identical(target[key], value)


def test_manifest_is_versioned_json_listing_files_and_tensors(root: Path) -> None:
    """The manifest is a JSON object with format, version, step, files and per-tensor entries."""
    state = {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "n": 5}
    save_with(state, root, 7)
    doc = read_manifest(root, 7)
    assert doc["format"] == "ckpt"
    assert doc["format_version"] == 2
    assert doc["step"] == 7
    assert doc["checksum_algorithm"] == "xxh3_64"
    assert set(doc["tensors"]) == {"w", "b"}
    assert doc["tensors"]["w"]["dtype"] == "float32"
    assert doc["tensors"]["w"]["shape"] == [4, 3]
    assert doc["tensors"]["b"]["dtype"] == "bfloat16"
    assert doc["state"]["n"] == 5
    on_disk = {str(p.relative_to(step_dir(root, 7))): p.stat().st_size for p in data_files(root, 7)}
    (writer,) = doc["writers"]
    on_disk[writer["index"]] = (step_dir(root, 7) / writer["index"]).stat().st_size
    assert doc["files"] == on_disk


def test_each_step_has_its_own_prefix(root: Path) -> None:
    """Steps live in zero-padded ``step-NNNNNNNNN`` prefixes, each with its own manifest."""
    for step in (3, 12):
        save_with({"t": torch.full((2,), float(step))}, root, step)
    assert sorted(p.name for p in root.iterdir()) == ["step-000000003", "step-000000012"]
    for step in (3, 12):
        assert read_manifest(root, step)["step"] == step


def test_manifest_is_written_after_every_data_file(root: Path) -> None:
    """The manifest, the commit point, is the last object published for a step."""
    from storage_backends import LocalBackend

    events: list[str] = []

    class Recording(LocalBackend):
        def open_stream(self, path: str) -> Any:
            stream = super().open_stream(path)
            commit = stream.commit

            def recorded_commit() -> None:
                commit()
                events.append(path)

            stream.commit = recorded_commit  # type: ignore[method-assign]
            return stream

        def put_if_absent(self, path: str, data: Any) -> bool:
            events.append(path)
            return super().put_if_absent(path, data)

    backend = Recording(root)
    state = {"a": torch.randn(64), "b": torch.randn(8, 8), "z": compressible(1 << 15)}
    options = ckpt.SaveOptions(compression=ckpt.Compression(patterns=("z",), min_bytes=0))
    snap = ckpt.Snapshotter(options)
    try:
        snap.async_save(state, backend, 2, LocalCoordinator()).result()
    finally:
        snap.close()
        backend.close()
    # Data files, then (format v2) this rank's index file naming them, then the manifest.
    assert events[-1] == "step-000000002/manifest.json"
    assert "/index/" in events[-2]
    assert len(events) >= 4 and all("/data/" in e for e in events[:-2])


def test_paths_in_the_manifest_are_relative_to_the_step_prefix(root: Path) -> None:
    """Every file the manifest names is relative, normalised and exists inside the step prefix."""
    state = {"a": torch.randn(32), "z": compressible(1 << 14)}
    options = ckpt.SaveOptions(compression=ckpt.Compression(patterns=("z",), min_bytes=0))
    save_with(state, root, 4, options)
    doc = read_manifest(root, 4)
    paths = set(doc["files"])
    paths |= {p["file"] for entry in doc["tensors"].values() for p in entry["pieces"]}
    paths |= {w["index"] for w in doc["writers"]}
    assert len(paths) == 3  # two data files and the rank's index file
    for path in paths:
        assert not path.startswith("/") and "\\" not in path
        assert posixpath.normpath(path) == path and not path.startswith("..")
        assert data_file(root, 4, path).is_file()


def test_no_pickle_manifest_is_json_and_data_is_safetensors_or_zstd(root: Path) -> None:
    """Every stored file is JSON, safetensors or zstd frames, even for RNG state and odd values."""
    state = {
        "rng": ckpt.RNGState(),
        "values": {"ints": (1, 2), "raw": b"\x00\x80", "dtype": torch.float16, 3: "three"},
        "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
        "raw": torch.randn(16),
        "packed": compressible(1 << 14),
    }
    options = ckpt.SaveOptions(compression=ckpt.Compression(patterns=("packed",), min_bytes=0))
    save_with(state, root, 1, options)
    doc = read_manifest(root, 1)
    kinds = set()
    for path in sorted(p for p in step_dir(root, 1).rglob("*") if p.is_file()):
        rel = str(path.relative_to(step_dir(root, 1)))
        head = path.read_bytes()[:4]
        assert head[:1] != b"\x80", f"{rel} starts like a pickle"
        if rel == "manifest.json" or rel.startswith("index/"):
            json.loads(path.read_bytes())
            kinds.add("json")
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert set(f.keys())
            kinds.add("safetensors")
        else:
            assert path.suffix == ".zst" and head == _ZSTD_MAGIC, rel
            kinds.add("zstd")
        assert rel == "manifest.json" or rel in doc["files"]
    assert kinds == {"json", "safetensors", "zstd"}


# --- compression ------------------------------------------------------------------------


def test_compression_is_off_by_default(root: Path) -> None:
    """Without options every piece is stored raw in safetensors files."""
    ckpt.save({"z": compressible(1 << 16)}, root, step=1)
    doc = read_manifest(root, 1)
    assert {p["codec"] for e in doc["tensors"].values() for p in e["pieces"]} == {"raw"}
    assert all(p.suffix == ".safetensors" for p in data_files(root, 1))


def test_compression_round_trips_and_shrinks_compressible_data(root: Path) -> None:
    """Compressed checkpoints load bit-identically and take fewer bytes than the raw data."""
    state = {
        "ramp": compressible(1 << 16),
        "bf16": compressible(1 << 15, torch.bfloat16),
        "noise": random_tensor(torch.float32, (1 << 12,), seed=3),  # incompressible
        "ints": compressible(5000, torch.int64),
    }
    options = ckpt.SaveOptions(compression=ckpt.Compression(level=3, min_bytes=0))
    save_with(state, root, 1, options)
    raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
    stored = sum(p.stat().st_size for p in data_files(root, 1))
    assert stored < raw_bytes / 4
    assert all(p.suffix == ".zst" for p in data_files(root, 1))
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(target, root, step=1)
    for key, value in state.items():
        assert_bit_identical(target[key], value)


def test_compressed_pieces_are_independent_zstd_frames_per_chunk(root: Path) -> None:
    """Each chunk of a compressed piece is one zstd frame that decompresses to that chunk's bytes."""
    chunk = 4096
    value = compressible(3 * 1024 + 25)  # 12388 bytes: 3 full chunks and a short one
    options = ckpt.SaveOptions(chunk_bytes=chunk, compression=ckpt.Compression(min_bytes=0))
    save_with({"v": value}, root, 1, options)
    (piece,) = read_manifest(root, 1)["tensors"]["v"]["pieces"]
    assert piece["codec"] == "zstd"
    assert len(piece["chunk_sizes"]) == 4 and len(piece["checksums"]) == 4 * 16
    stored = data_file(root, 1, piece["file"]).read_bytes()
    raw = bytes(bits(value).numpy())
    at = piece["byte_offset"]
    for i, size in enumerate(piece["chunk_sizes"]):
        frame = stored[at : at + size]
        assert frame[:4] == _ZSTD_MAGIC
        assert zstandard.ZstdDecompressor().decompress(frame) == raw[i * chunk : (i + 1) * chunk]
        at += size


def test_compression_selects_tensors_by_pattern_and_size(root: Path) -> None:
    """Only tensors matching a pattern and above min_bytes are compressed; the rest stay safetensors."""
    state = {
        "model.big": compressible(1 << 14),
        "model.small": compressible(8),
        "optim.big": compressible(1 << 14),
    }
    options = ckpt.SaveOptions(compression=ckpt.Compression(patterns=("model.*",), min_bytes=1024))
    save_with(state, root, 1, options)
    doc = read_manifest(root, 1)
    codecs = {name: e["pieces"][0]["codec"] for name, e in doc["tensors"].items()}
    assert codecs == {"model.big": "zstd", "model.small": "raw", "optim.big": "raw"}
    raw_files = [p for p in data_files(root, 1) if p.suffix == ".safetensors"]
    assert len(raw_files) == 1
    with safe_open(str(raw_files[0]), framework="pt") as f:
        assert set(f.keys()) == {"model.small", "optim.big"}
        assert_bit_identical(f.get_tensor("optim.big"), state["optim.big"])
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(target, root, step=1)
    for key, value in state.items():
        assert_bit_identical(target[key], value)


@pytest.mark.parametrize("compression", [None, ckpt.Compression(min_bytes=0)], ids=["raw", "zstd"])
@pytest.mark.parametrize("numel", [1023, 1024, 3 * 1024 + 25, 4 * 1024 + 1])
def test_chunks_that_do_not_divide_the_tensor_round_trip(
    root: Path, compression: ckpt.Compression | None, numel: int
) -> None:
    """A tensor split over several 4 KiB chunks (the last one short or not) loads bit for bit."""
    chunk = 4096
    value = random_tensor(torch.float32, (numel,), seed=numel)
    if compression is not None:
        value[: numel // 2] = 1.0  # half compressible, half noise
    options = ckpt.SaveOptions(chunk_bytes=chunk, compression=compression)
    save_with({"v": value, "bf": random_tensor(torch.bfloat16, (numel,), seed=1)}, root, 1, options)
    doc = read_manifest(root, 1)
    assert doc["chunk_bytes"] == chunk
    (piece,) = doc["tensors"]["v"]["pieces"]
    assert len(piece["checksums"]) == 16 * math.ceil(numel * 4 / chunk)
    target = {"v": torch.zeros(numel), "bf": torch.zeros(numel, dtype=torch.bfloat16)}
    ckpt.load(target, root, step=1)
    assert_bit_identical(target["v"], value)
    assert_bit_identical(target["bf"], random_tensor(torch.bfloat16, (numel,), seed=1))


@pytest.mark.parametrize("compression", [None, ckpt.Compression(min_bytes=0)], ids=["raw", "zstd"])
def test_multi_chunk_tensors_of_a_module_round_trip(
    root: Path, compression: ckpt.Compression | None
) -> None:
    """A module whose weights span many 4 KiB chunks restores exactly, raw or compressed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.Linear(48, 5, dtype=torch.float64)
    )
    options = ckpt.SaveOptions(chunk_bytes=4096, compression=compression)
    save_with({"model": model}, root, 1, options)
    torch.manual_seed(1)
    other = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.Linear(48, 5, dtype=torch.float64)
    )
    ckpt.load({"model": other}, root, step=1)
    for key, value in model.state_dict().items():
        assert_bit_identical(other.state_dict()[key], value)


# --- plain values -----------------------------------------------------------------------


def test_plain_values_round_trip(root: Path) -> None:
    """Numbers (inf, nan, big ints), None, str, tuples, int-keyed dicts, bytes, dtypes and numpy."""
    values: dict[str, Any] = {
        "ints": [0, -1, 2**62, True, False],
        "floats": [1.5, -0.0, float("inf"), float("-inf")],
        "nan": float("nan"),
        "none": None,
        "text": 'héllo ✓ "quoted" \\ \n',
        "nested": [1, (2, [3, (4,)]), {"k": (5, 6)}],
        "int_keys": {0: "zero", 1: {2: [3]}, -5: None},
        "mixed_keys": {"a": 1, 7: 2},
        "marker_key": {"__tensor__": "not a tensor", "__bytes__": 1},
        "blob": b"\x00\xffbinary",
        "dtypes": [torch.bfloat16, torch.int8, torch.complex64],
        "np_scalars": [np.float32(1.25), np.int64(-3), np.bool_(True)],
        "empty": {"list": [], "dict": {}, "tuple": ()},
    }
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "f64": np.linspace(0, 1, 5),
        "i32": np.arange(12, dtype=np.int32).reshape(3, 4),
        "u8": np.array([1, 2, 255], dtype=np.uint8),
        "bool": np.array([True, False]),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
    }
    ckpt.save({"values": dict(values), "arrays": dict(arrays), "top": (1, "x")}, root, step=1)
    target: dict[str, Any] = {"values": {}, "arrays": {}, "top": None}
    ckpt.load(target, root, step=1)
    got = target["values"]
    assert math.isnan(got.pop("nan"))
    expected = dict(values)
    expected.pop("nan")
    expected["np_scalars"] = [1.25, -3, True]
    assert got == expected
    assert isinstance(got["nested"][1], tuple) and isinstance(got["nested"][1][1][1], tuple)
    assert isinstance(got["blob"], bytes)
    assert math.copysign(1.0, got["floats"][1]) == -1.0
    assert target["top"] == (1, "x")
    assert set(target["arrays"]) == set(arrays)
    for key, array in arrays.items():
        loaded = target["arrays"][key]
        assert isinstance(loaded, np.ndarray) and loaded.dtype == array.dtype
        np.testing.assert_array_equal(loaded, array)


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"cfg": {"inner": [1, lambda: 0]}}, "cfg.inner.1"),
        ({"obj": _Opaque()}, "obj"),
        ({"cfg": {"tags": {"a", "b"}}}, "cfg.tags"),
        ({"cfg": {"arr": np.array([object()])}}, "cfg.arr"),
        ({"cfg": {(1, 2): "tuple key"}}, "cfg"),
        ({"fnuz": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}, "fnuz"),
    ],
    ids=["lambda", "object", "set", "object-array", "tuple-key", "unsupported-dtype"],
)
def test_unsupported_values_raise_invalid_state_naming_the_path(
    root: Path, state: dict[str, Any], path: str
) -> None:
    """Values that would need pickle are refused before anything is written, naming their path."""
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save(state, root, step=1)
    assert repr(path) in str(info.value)
    assert list(root.iterdir()) == []
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.load({}, root)

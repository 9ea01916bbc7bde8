"""Bad input to save and load: a clear CheckpointError naming the key, before anything is
written or modified; legitimate but unusual values round-trip bit for bit."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from tests.support.checks import assert_bit_identical


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _nested(depth: int) -> dict[str, Any]:
    top: dict[str, Any] = {}
    inner = top
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return top


# --- tensors the format stores after resolving a view flag ------------------------------


def test_conjugated_complex_tensor_round_trips_bit_exact(root: Path) -> None:
    """A conjugate view is saved as the values it shows (the conj bit resolved)."""
    base = torch.randn(4, 3, dtype=torch.complex64)
    conj = base.conj()
    neg = base.conj().imag  # a view with the negative bit
    assert conj.is_conj() and neg.is_neg()
    ckpt.save({"c": conj, "n": neg, "row": conj[1]}, root, step=1)
    target = {
        "c": torch.zeros(4, 3, dtype=torch.complex64),
        "n": torch.zeros(4, 3),
        "row": torch.zeros(3, dtype=torch.complex64),
    }
    ckpt.load(target, root)
    assert_bit_identical(target["c"], conj.resolve_conj())
    assert_bit_identical(target["n"], neg.resolve_neg())
    assert_bit_identical(target["row"], conj[1].resolve_conj())
    assert base.is_conj() is False and conj.is_conj()  # the caller's tensors are untouched


# --- tensors the format cannot store ----------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.empty(3, device="meta"), "is a meta tensor"),
        (lambda: torch.eye(3).to_sparse(), "is a sparse COO tensor; call .to_dense()"),
        (lambda: torch.eye(3).to_sparse_csr(), "is a sparse CSR tensor; call .to_dense()"),
        (
            lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
            "is a nested tensor",
        ),
        (
            lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8),
            "is a quantized tensor",
        ),
        (lambda: torch.zeros(3, dtype=torch.complex32), "dtype torch.complex32 cannot be"),
    ],
    ids=["meta", "sparse-coo", "sparse-csr", "nested", "quantized", "complex32"],
)
def test_tensor_the_format_cannot_store_is_refused_by_name(
    root: Path, make: Any, expected: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested and sparse CSR tensors are prototypes
        value = make()
    state = {"model": {"w": value, "ok": torch.ones(2)}}
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save(state, root, step=1)
    assert "'model.w'" in str(info.value) and expected in str(info.value)
    assert _files(root) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.array(["a", "b"]), "numpy arrays of dtype <U1"),
        (np.array([object()]), "numpy arrays of dtype object"),
        (np.longdouble(1.5), "numpy longdouble values"),
        (torch.device("cpu"), "values of type torch.device"),
    ],
    ids=["ndarray-str", "ndarray-object", "longdouble", "device"],
)
def test_value_the_format_cannot_store_is_refused_by_name(
    root: Path, value: Any, expected: str
) -> None:
    if isinstance(value, np.longdouble) and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is a plain double on this platform")
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save({"extra": [1, value]}, root, step=1)
    assert "'extra.1'" in str(info.value) and expected in str(info.value)
    assert _files(root) == []


# --- state trees that are too deep or contain themselves --------------------------------


def test_deeply_nested_state_is_refused_with_its_path(root: Path) -> None:
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save({"deep": _nested(500)}, root, step=1)
    message = str(info.value)
    assert "'deep.a.a." in message and "more than 100 deep" in message
    assert _files(root) == []


def test_nesting_up_to_the_limit_round_trips(root: Path) -> None:
    state: dict[str, Any] = {"deep": _nested(100)}
    ckpt.save(state, root, step=1)
    target: dict[str, Any] = {"deep": {}}
    ckpt.load(target, root)
    assert target == state


@pytest.mark.parametrize("kind", ["dict", "list", "deeper"])
def test_state_that_contains_itself_is_refused(root: Path, kind: str) -> None:
    loop: Any
    if kind == "dict":
        loop = {"x": 1}
        loop["self"] = loop
        where = "'cfg.self' refers back to 'cfg'"
    elif kind == "list":
        loop = [1]
        loop.append(loop)
        where = "'cfg.1' refers back to 'cfg'"
    else:
        loop = {"a": {"b": []}}
        loop["a"]["b"].append(loop["a"])
        where = "'cfg.a.b.0' refers back to 'cfg.a'"
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save({"cfg": loop}, root, step=1)
    assert where in str(info.value) and "break the cycle" in str(info.value)
    assert _files(root) == []


def test_the_same_object_twice_is_not_a_cycle(root: Path) -> None:
    shared = {"lr": 0.1}
    state: dict[str, Any] = {"a": [shared, shared], "b": (shared,)}
    ckpt.save(state, root, step=1)
    target: dict[str, Any] = {"a": [], "b": ()}
    ckpt.load(target, root)
    assert target == state


# --- the step number ----------------------------------------------------------------


@pytest.mark.parametrize(
    "step",
    [np.int64(5), np.uint32(5), torch.tensor(5)],
    ids=["numpy-int64", "numpy-uint32", "torch-0d"],
)
def test_any_integer_type_is_a_step(root: Path, step: Any) -> None:
    result = ckpt.save({"n": 1}, root, step=step)
    assert result.step == 5 and type(result.step) is int
    assert ckpt.load({"n": 0}, root) == 5


@pytest.mark.parametrize(
    "step",
    [True, np.bool_(False), -1, 1.0, "3", None, 2**63],
    ids=["bool", "numpy-bool", "negative", "float", "str", "none", "too-large"],
)
def test_bad_step_is_refused_before_anything_is_written(root: Path, step: Any) -> None:
    with pytest.raises(ckpt.InvalidStateError, match="step must be an integer from 0"):
        ckpt.save({"n": 1}, root, step=step)
    assert _files(root) == []


# --- plain values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["value", "list", "dict-key"],
)
def test_integer_too_long_for_json_is_refused_before_any_data_is_written(
    root: Path, where: str
) -> None:
    huge = 10**5000
    value: Any = {"value": huge, "list": [1, huge], "dict-key": {huge: 1}}[where]
    state = {"w": torch.ones(1000), "big": value}
    with pytest.raises(ckpt.InvalidStateError) as info:
        ckpt.save(state, root, step=1)
    assert "'big" in str(info.value) and "4300 decimal digits" in str(info.value)
    assert _files(root) == []


def test_user_metadata_json_cannot_hold_is_refused_before_any_data_is_written(
    root: Path,
) -> None:
    with pytest.raises(ckpt.InvalidStateError, match="user_metadata"):
        ckpt.save({"w": torch.ones(10)}, root, step=1, user_metadata={"n": 10**5000})
    with pytest.raises(ckpt.InvalidStateError, match="user_metadata"):
        ckpt.save({"w": torch.ones(10)}, root, step=1, user_metadata={"d": object()})
    assert _files(root) == []


def test_large_integers_nan_and_infinities_round_trip(root: Path) -> None:
    state: dict[str, Any] = {
        "ints": [2**70, -(2**200), 10**4299, np.int64(-5), np.uint64(2**64 - 1)],
        "floats": [math.nan, math.inf, -math.inf, -0.0, np.float32(math.nan)],
        "keys": {1: math.nan, 2**80: "big key"},
    }
    ckpt.save(state, root, step=1)
    target: dict[str, Any] = {"ints": [], "floats": [], "keys": {}}
    ckpt.load(target, root)
    assert target["ints"] == [2**70, -(2**200), 10**4299, -5, 2**64 - 1]
    assert math.isnan(target["floats"][0]) and math.isnan(target["floats"][4])
    assert target["floats"][1:3] == [math.inf, -math.inf]
    assert math.copysign(1.0, target["floats"][3]) == -1.0
    assert math.isnan(target["keys"][1]) and target["keys"][2**80] == "big key"


# --- loading into a state whose tensors meet values of another kind ----------------------


@pytest.mark.parametrize(
    ("saved", "target", "expected"),
    [
        ([1], torch.ones(3), "'model.w' is a tensor in the state but a list in the checkpoint"),
        (torch.ones(3), [0], "'model.w' is a tensor in the checkpoint but a list in the state"),
        (torch.ones(3), 7, "'model.w' is a tensor in the checkpoint but a int in the state"),
        (
            {"a": 1},
            torch.ones(3),
            "'model.w' is a tensor in the state but a dict in the checkpoint",
        ),
        (
            torch.ones(3),
            {"a": 1},
            "'model.w' is a tensor in the checkpoint but a dict in the state",
        ),
        (
            3,
            {"a": torch.ones(3)},
            "'model.w' is a dict holding tensors in the state but a int in the checkpoint",
        ),
        (
            (1, 2),
            [torch.ones(3)],
            "'model.w.0' is a tensor in the state but a int in the checkpoint",
        ),
    ],
    ids=[
        "list-for-tensor",
        "tensor-for-list",
        "tensor-for-int",
        "dict-for-tensor",
        "tensor-for-dict",
        "int-for-dict-of-tensors",
        "tuple-of-ints-for-list-of-tensors",
    ],
)
def test_tensor_meeting_another_kind_is_a_mismatch_and_nothing_is_loaded(
    root: Path, saved: Any, target: Any, expected: str
) -> None:
    ckpt.save({"model": {"w": saved, "v": torch.arange(3.0)}, "n": 5}, root, step=1)
    v = torch.zeros(3)
    inner: dict[str, Any] = {"w": target, "v": v}
    state: dict[str, Any] = {"model": inner, "n": 0}
    with pytest.raises(ckpt.StateMismatchError) as info:
        ckpt.load(state, root)
    assert expected in str(info.value)
    # Nothing was applied: not the other tensor, not the plain values.
    assert state["model"] is inner and inner["w"] is target and inner["v"] is v
    assert torch.equal(v, torch.zeros(3)) and state["n"] == 0


def test_without_strict_the_state_keeps_its_tensor_and_the_key_is_logged(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt.save({"model": {"w": [1], "v": torch.arange(3.0)}, "n": 5}, root, step=1)
    w, v = torch.ones(3), torch.zeros(3)
    inner = {"w": w, "v": v}
    state: dict[str, Any] = {"model": inner, "n": 0}
    with caplog.at_level(logging.WARNING):
        assert ckpt.load(state, root, strict=False) == 1
    assert state["model"] is inner and inner["w"] is w and torch.equal(w, torch.ones(3))
    assert torch.equal(v, torch.arange(3.0)) and state["n"] == 5
    assert "'model.w' is a tensor in the state but a list" in caplog.text


def test_tensor_deep_in_the_state_that_the_checkpoint_lacks_is_missing(root: Path) -> None:
    ckpt.save({"m": {"sub": {}, "x": 1}}, root, step=1)
    w = torch.ones(2)
    state: dict[str, Any] = {"m": {"sub": {"deeper": {"w": w}}, "x": 0}}
    with pytest.raises(
        ckpt.StateMismatchError, match=r"missing from the checkpoint: m\.sub\.deeper\.w"
    ):
        ckpt.load(state, root)
    assert state["m"]["x"] == 0
    ckpt.load(state, root, strict=False)  # kept, not dropped
    assert state["m"]["sub"]["deeper"]["w"] is w and state["m"]["x"] == 1


def test_stored_tensor_fills_a_none_placeholder_and_replaces_an_array(root: Path) -> None:
    ckpt.save({"extra": {"best": torch.arange(4), "arr": np.arange(3.0)}}, root, step=1)
    state: dict[str, Any] = {"extra": {"best": None, "arr": np.zeros(5)}}
    ckpt.load(state, root)
    assert torch.equal(state["extra"]["best"], torch.arange(4))
    assert np.array_equal(state["extra"]["arr"], np.arange(3.0))


def test_shape_mismatch_leaves_every_tensor_untouched(root: Path) -> None:
    ckpt.save({"a": torch.ones(3), "b": torch.ones(4)}, root, step=1)
    a, b = torch.zeros(3), torch.zeros(5)
    for strict in (True, False):
        with pytest.raises(ckpt.StateMismatchError, match="'b': shape"):
            ckpt.load({"a": a, "b": b}, root, strict=strict)
        assert torch.equal(a, torch.zeros(3)) and torch.equal(b, torch.zeros(5))

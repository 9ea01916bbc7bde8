"""Bit-for-bit comparisons of tensors: same dtype, same shape, same bytes.

Bytes, not values: NaN payloads, -0.0 and fp8 compare exactly, and a restore that is
"close" is a failing restore.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``tensor`` as a flat uint8 tensor (complex as its real pairs)."""
    t = tensor.detach().contiguous()
    if t.is_complex():
        t = torch.view_as_real(t).contiguous()
    return t.reshape(-1).view(torch.uint8)


def difference(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when bit for bit equal (dtype, shape, bytes), else what differs."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return f"{actual.dtype}{list(actual.shape)} vs {expected.dtype}{list(expected.shape)}"
    if not torch.equal(bits(actual), bits(expected)):
        wrong = int((bits(actual) != bits(expected)).sum())
        return f"{wrong} of {actual.numel() * actual.element_size()} bytes differ"
    return None


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bytes."""
    why = difference(actual, expected)
    assert why is None, why


def assert_all_bit_identical(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """The same names, and every tensor bit for bit equal to the expected one."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    differ = {
        name: why
        for name in expected
        if (why := difference(actual[name], expected[name])) is not None
    }
    assert not differ, f"tensors differ: {differ}"

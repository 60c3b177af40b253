"""core.values: finiteness by bit pattern and byte equality, against torch's own answers."""
import math

import pytest
import torch

from core.values import all_finite, bits_equal

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_finite_agrees_with_torch_on_every_special_value(dtype):
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(4097, generator=g) * 100).to(dtype)
    assert all_finite(base)
    wide = base.float()
    specials = [float("inf"), -float("inf"), float("nan"), -float("nan")]
    for value in specials:
        for position in (0, 2048, 4096):
            spoiled = wide.clone()
            spoiled[position] = value
            spoiled = spoiled.to(dtype)
            expected = bool(torch.isfinite(spoiled.float()).all())  # e4m3fn has no Inf: a cast saturates
            assert all_finite(spoiled) is expected, (dtype, value, position)
            assert expected is (dtype == torch.float8_e4m3fn and math.isinf(value))
    if dtype.itemsize > 1:
        info = torch.finfo(dtype)
        edge = torch.tensor([info.max, -info.max, -0.0, 0.0, info.tiny / 4, -info.tiny / 4], dtype=dtype)
        assert all_finite(edge)
    assert all_finite(base.reshape(17, 241)[:, ::3])  # not contiguous
    assert all_finite(torch.empty(0, dtype=dtype))


def test_bits_equal_is_byte_equality():
    a = torch.randn(33, 7)
    assert bits_equal(a, a.clone())
    assert bits_equal(a, a.T.contiguous().T)  # same values, other strides
    b = a.clone()
    b[32, 6] = torch.nextafter(b[32, 6], torch.tensor(float("inf")))  # one ulp in the last element
    assert not bits_equal(a, b)
    assert not bits_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    nan = torch.tensor([float("nan")])
    assert bits_equal(nan, nan.clone())
    assert not bits_equal(a, a.half().float().reshape(7, 33))  # another shape
    assert not bits_equal(a.half(), a.half().to(torch.bfloat16))  # another dtype

"""The shape of the weight a layer changes, from its factors, with a check that they chain.

LoHa and factored LoKr store conv layers flattened (``[r, in·kh·kw]``); the kernel then comes from
the layer's name (a table of the conv modules of SD-family UNets), else the layer stays 2-D, which
ComfyUI reshapes on load anyway.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from ..errors import LoraError

# Canonical-name patterns of conv weights in SD1.5/SDXL UNets, with their kernel size.
_CONV_KERNELS: tuple[tuple[str, int], ...] = (
    (r"\.in_layers\.2$", 3), (r"\.out_layers\.3$", 3), (r"\.op$", 3), (r"\.conv$", 3),
    (r"^diffusion_model\.input_blocks\.0\.0$", 3), (r"^diffusion_model\.out\.2$", 3),
    (r"\.skip_connection$", 1),
)


def conv_kernel(name: str) -> int | None:
    """Kernel size of a known UNet conv weight, or None for linear / unknown layers."""
    for pattern, kernel in _CONV_KERNELS:
        if re.search(pattern, name):
            return kernel
    return None


def _fail(problem: str, label: str, prefix: str) -> LoraError:
    return LoraError(problem, file=label, layer=prefix,
                     fix="the factors do not belong together; the file is corrupt or was merged wrongly")


def _chain(a: torch.Tensor, b: torch.Tensor, what: str, label: str, prefix: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise _fail(f"{what} do not chain: {tuple(a.shape)} × {tuple(b.shape)}", label, prefix)


def _dims(t: torch.Tensor, allowed: tuple[int, ...], what: str, label: str, prefix: str) -> None:
    """A factor of the wrong rank (a 1-D LoKr half, a 6-D down) would fail deep inside the maths."""
    if t.dim() not in allowed:
        expected = f"{allowed[0]}-D" if len(allowed) == 1 else f"{allowed[0]}-D to {allowed[-1]}-D"
        if len(allowed) == 2 and allowed[1] != allowed[0] + 1:
            expected = f"{allowed[0]}-D or {allowed[1]}-D"
        raise _fail(f"{what} has shape {tuple(t.shape)}: {t.dim()}-D, expected {expected}", label, prefix)


def _tucker_core(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str, label: str, prefix: str) -> None:
    """LyCORIS' Tucker core t [r_a, r_b, kh, kw] between a [r_a, out] and b [r_b, in]."""
    _dims(t, (4,), what, label, prefix)
    _dims(a, (2,), f"{what}'s first factor", label, prefix)
    _dims(b, (2,), f"{what}'s second factor", label, prefix)
    if t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
        raise _fail(f"Tucker core {what} {tuple(t.shape)} does not chain with {tuple(a.shape)} and "
                    f"{tuple(b.shape)}", label, prefix)


def _unflatten(shape: tuple[int, int], name: str) -> tuple[int, ...]:
    kernel = conv_kernel(name)
    if kernel and kernel > 1 and shape[1] % (kernel * kernel) == 0:
        return (shape[0], shape[1] // (kernel * kernel), kernel, kernel)
    return shape


def _lora_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
    up, down = f["up"], f["down"]
    _dims(up, (2, 3, 4, 5), "up", label, prefix)
    _dims(down, (2, 3, 4, 5), "down", label, prefix)
    if "mid" in f:
        mid = f["mid"]
        if mid.dim() != 4 or up.shape[1] != mid.shape[0] or mid.shape[1] != down.shape[0]:
            raise _fail(f"Tucker factors do not chain: up {tuple(up.shape)}, mid {tuple(mid.shape)}, "
                        f"down {tuple(down.shape)}", label, prefix)
        return (up.shape[0], down.shape[1], *mid.shape[2:])
    if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0] or math.prod(up.shape[2:]) != 1:
        raise _fail(f"up {tuple(up.shape)} and down {tuple(down.shape)} do not chain", label, prefix)
    return (up.shape[0], *down.shape[1:])


def _loha_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
    if "t1" in f or "t2" in f:
        if "t1" not in f or "t2" not in f:
            raise _fail("Tucker LoHa needs both hada_t1 and hada_t2", label, prefix)
        t1, t2 = f["t1"], f["t2"]
        # LyCORIS Tucker LoHa: w*_a [r, out], w*_b [r, in], t* [r, r, kh, kw]
        _tucker_core(t1, f["w1a"], f["w1b"], "hada_t1", label, prefix)
        _tucker_core(t2, f["w2a"], f["w2b"], "hada_t2", label, prefix)
        shapes = {(f["w1a"].shape[1], f["w1b"].shape[1], *t1.shape[2:]),
                  (f["w2a"].shape[1], f["w2b"].shape[1], *t2.shape[2:])}
        if len(shapes) != 1 or t1.shape[0] != f["w1a"].shape[0] or t1.shape[1] != f["w1b"].shape[0]:
            raise _fail("Tucker LoHa halves do not match", label, prefix)
        return shapes.pop()
    _chain(f["w1a"], f["w1b"], "LoHa w1_a and w1_b", label, prefix)
    _chain(f["w2a"], f["w2b"], "LoHa w2_a and w2_b", label, prefix)
    first = (f["w1a"].shape[0], f["w1b"].shape[1])
    if first != (f["w2a"].shape[0], f["w2b"].shape[1]):
        raise _fail("LoHa halves have different shapes", label, prefix)
    return _unflatten(first, name)


def _lokr_half(f: Mapping[str, torch.Tensor], n: str, label: str, prefix: str) -> tuple[int, ...]:
    if f"w{n}" in f:
        full = f[f"w{n}"]
        _dims(full, (2,) if n == "1" else (2, 4), f"lokr_w{n}", label, prefix)
        return tuple(full.shape)
    if f"w{n}a" not in f or f"w{n}b" not in f:
        raise _fail(f"LoKr half {n} is missing (needs lokr_w{n} or lokr_w{n}_a + lokr_w{n}_b)", label, prefix)
    a, b = f[f"w{n}a"], f[f"w{n}b"]
    if f"t{n}" in f:
        t = f[f"t{n}"]
        _tucker_core(t, a, b, f"lokr_t{n}", label, prefix)
        return (a.shape[1], b.shape[1], *t.shape[2:])
    _chain(a, b, f"LoKr w{n}_a and w{n}_b", label, prefix)
    return (a.shape[0], b.shape[1])


def _lokr_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
    w1 = _lokr_half(f, "1", label, prefix)
    w2 = _lokr_half(f, "2", label, prefix)
    shape = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return _unflatten(shape, name) if len(shape) == 2 else shape


def _full_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
    _dims(f["diff"], (2, 3, 4, 5), "diff", label, prefix)
    return tuple(f["diff"].shape)


_SHAPES = {"lora": _lora_shape, "loha": _loha_shape, "lokr": _lokr_shape, "full": _full_shape}
_REQUIRED = {"lora": ("up", "down"), "loha": ("w1a", "w1b", "w2a", "w2b"), "lokr": (), "full": ("diff",)}


def layer_shape(kind: str, factors: Mapping[str, torch.Tensor], name: str, arch: str, *, prefix: str,
                label: str) -> tuple[int, ...]:
    """Shape of ΔW for this layer, raising LoraError if factors are missing or do not chain."""
    missing = [role for role in _REQUIRED[kind] if role not in factors]
    if missing:
        raise _fail(f"{kind} layer is missing its {', '.join(missing)} factor(s)", label, prefix)
    return tuple(int(d) for d in _SHAPES[kind](factors, name, label, prefix))


# The factors that carry ΔW's output rows, per kind (LoKr: its first Kronecker factor's rows).
_OUTPUT_SIDE = {"lora": ("up",), "loha": ("w1a", "w2a"), "lokr": ("w1", "w1a"), "full": ("diff", "diff_b")}


def swap_output_halves(kind: str, factors: Mapping[str, torch.Tensor], label: str, prefix: str
                       ) -> dict[str, torch.Tensor]:
    """Factors whose ΔW has its two halves of output rows swapped (an exact row permutation).

    For LoKr, ΔW = w1 ⊗ w2: swapping the halves of its rows is swapping the halves of w1's rows."""
    out = dict(factors)
    for role in _OUTPUT_SIDE[kind]:
        if role not in out:
            continue
        rows = out[role].shape[0]
        if rows % 2:
            raise _fail(f"{kind} factor {role} has {rows} rows: its output halves cannot be swapped exactly",
                        label, prefix)
        out[role] = torch.roll(out[role], rows // 2, dims=0)
    return out

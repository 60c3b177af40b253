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
    if a.dim() < 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
        raise _fail(f"{what} do not chain: {tuple(a.shape)} × {tuple(b.shape)}", label, prefix)


def _unflatten(shape: tuple[int, int], name: str) -> tuple[int, ...]:
    kernel = conv_kernel(name)
    if kernel and kernel > 1 and shape[1] % (kernel * kernel) == 0:
        return (shape[0], shape[1] // (kernel * kernel), kernel, kernel)
    return shape


def _lora_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
    up, down = f["up"], f["down"]
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
    if "t1" in f:
        t1, t2 = f["t1"], f["t2"]
        # LyCORIS Tucker LoHa: w*_a [r, out], w*_b [r, in], t* [r, r, kh, kw]
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
        return tuple(f[f"w{n}"].shape)
    if f"w{n}a" not in f or f"w{n}b" not in f:
        raise _fail(f"LoKr half {n} is missing (needs lokr_w{n} or lokr_w{n}_a + lokr_w{n}_b)", label, prefix)
    a, b = f[f"w{n}a"], f[f"w{n}b"]
    if f"t{n}" in f:
        t = f[f"t{n}"]
        return (a.shape[1], b.shape[1], *t.shape[2:])
    _chain(a, b, f"LoKr w{n}_a and w{n}_b", label, prefix)
    return (a.shape[0], b.shape[1])


def _lokr_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
    w1 = _lokr_half(f, "1", label, prefix)
    w2 = _lokr_half(f, "2", label, prefix)
    shape = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return _unflatten(shape, name) if len(shape) == 2 else shape


def _full_shape(f: Mapping[str, torch.Tensor], name: str, label: str, prefix: str) -> tuple[int, ...]:
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

"""Exact ΔW of a layer in fp32, with the producers' maths (and ComfyUI's weight adapters' results).

Used by tests, by the dense path of the resizer (LoHa, LoKr, full diffs) and by DoRA. Factored
LoRA layers are never expanded by the resizer itself: see ``core.decompose``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .model import Layer


def _f32(t: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


def effective_down(layer: Layer) -> torch.Tensor:
    """A as [r, in·kh·kw] in fp32; a Tucker ``lora_mid`` is folded in (exact)."""
    down = layer.factors["down"].to(torch.float32)
    if "mid" not in layer.factors:
        return down.flatten(1)
    mid = layer.factors["mid"].to(torch.float32)
    # ΔW[i, j, k, l] = Σ up[i, m] mid[m, n, k, l] down[n, j]  ->  A_eff[m, j, k, l]
    return torch.einsum("m n k l, n j -> m j k l", mid, down.flatten(1)).flatten(1)


def _lora_product(f: dict, device) -> torch.Tensor:
    up = _f32(f["up"], device).flatten(1)
    down = _f32(f["down"], device)
    if "mid" in f:
        # Tucker LoCon: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1] (LyCORIS / ComfyUI maths)
        mid = _f32(f["mid"], device)
        return torch.einsum("m n ..., i m, n j -> i j ...", mid, up, down.flatten(1))
    return up @ down.flatten(1)


def tucker_half(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS CP/Tucker: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa).contiguous()


def _loha_product(f: dict, device) -> torch.Tensor:
    g = {k: _f32(v, device) for k, v in f.items()}
    if "t1" in g:
        m1 = tucker_half(g["t1"], g["w1a"], g["w1b"])
        m2 = tucker_half(g["t2"], g["w2a"], g["w2b"])
    else:
        m1 = g["w1a"] @ g["w1b"]
        m2 = g["w2a"] @ g["w2b"]
    return m1 * m2


def _lokr_product(f: dict, device) -> torch.Tensor:
    g = {k: _f32(v, device) for k, v in f.items()}
    w1 = g["w1"] if "w1" in g else g["w1a"] @ g["w1b"]
    if "w2" in g:
        w2 = g["w2"]
    elif "t2" in g:
        w2 = tucker_half(g["t2"], g["w2a"], g["w2b"])
    else:
        w2 = g["w2a"] @ g["w2b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


_PRODUCTS: dict[str, Callable[[dict, Optional[torch.device]], torch.Tensor]] = {
    "lora": _lora_product,
    "loha": _loha_product,
    "lokr": _lokr_product,
    "full": lambda f, device: _f32(f["diff"], device),
}


def delta_weight(layer: Layer, device: Optional[torch.device] = None) -> torch.Tensor:
    """scale · product of the factors, shaped like the weight (slice) it changes, fp32.

    DoRA is not applied here: its result depends on the base weight (see :func:`dora_delta`).
    """
    product = _PRODUCTS[layer.kind](layer.factors, device)
    return (product * layer.scale).reshape(layer.shape)


def dora_weight_norm(weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """Norm of ``weight`` along the axis ``dora_scale`` is laid out on, shaped to broadcast."""
    if dora_scale.shape[0] == weight.shape[0]:  # magnitude per output channel
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    flat = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return flat.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def dora_delta(layer: Layer, base_weight: torch.Tensor) -> torch.Tensor:
    """Effective ΔW of a DoRA layer on ``base_weight``: m · (W + ΔW) / ‖W + ΔW‖ − W (LyCORIS, PEFT)."""
    weight = base_weight.to(torch.float32)
    merged = weight + delta_weight(layer, weight.device)
    magnitude = layer.dora_scale.to(device=weight.device, dtype=torch.float32)
    magnitude = magnitude.reshape(dora_weight_norm(merged, magnitude).shape)
    return merged * (magnitude / (dora_weight_norm(merged, magnitude) + torch.finfo(torch.float32).eps)) - weight

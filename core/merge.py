"""Weighted merges that are exact: concatenation of factors gives the sum of the ΔW's.

Σ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …], so a merge of LoRAs of any ranks, alphas and
signs is one LoRA of the summed rank with scale 1. "join" is the same concatenation with each
source's rank segment recorded, so its contribution can be scaled or switched off later
(``set_join_toggles``, after cloneofsimo/lora's ``set_lora_diag``).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from .delta import delta_weight, effective_down
from .errors import LoraError
from .formats.reader import layer_key
from .formats.writer import fuse_slices
from .model import Layer, LoraFile

JOIN_KEY = "lora_resize_join"


def _as_plain_lora(layer: Layer) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(s·B [out, r], A [r, in_features]) in fp32, or None for dense kinds."""
    if layer.kind != "lora":
        return None
    up = layer.factors["up"].to(torch.float32).flatten(1) * layer.scale
    return up, effective_down(layer)


def _normalise_slices(loras: Sequence[LoraFile]) -> list[LoraFile]:
    """If one source changes a whole fused weight and another only row slices of it, fuse the slices."""
    whole = {layer.name for lora in loras for layer in lora if layer.offset is None}
    out = []
    for lora in loras:
        sliced = defaultdict(list)
        layers = {}
        for key, layer in lora.layers.items():
            if layer.offset is not None and layer.name in whole:
                sliced[layer.name].append(layer)
            else:
                layers[key] = layer
        for name, group in sliced.items():
            layers[name] = fuse_slices(name, group, lora.architecture)
        out.append(LoraFile(layers, lora.architecture, lora.family, lora.metadata, lora.path, lora.unknown_keys,
                            passthrough=lora.passthrough))
    return out


def merge(sources: Sequence[tuple[LoraFile, float]], *, join: bool = False) -> LoraFile:
    """Exact weighted sum of LoRAs (negative weights allowed). Layers that only some sources have
    are kept; dense kinds (LoHa/LoKr/full) in a merged layer make that layer a full diff."""
    if not sources:
        raise LoraError("nothing to merge", fix="give at least one LoRA")
    archs = {lora.architecture for lora, _ in sources} - {"unknown"}
    if len(archs) > 1:
        names = ", ".join(f"{lora.label} ({lora.architecture})" for lora, _ in sources)
        raise LoraError(f"cannot merge LoRAs of different architectures: {names}",
                        fix="merge only LoRAs made for the same base model")
    weights = [_finite_weight(lora, w) for lora, w in sources]
    loras = _normalise_slices([lora for lora, _ in sources])
    keys: dict[str, None] = {}
    for lora in loras:
        keys.update(dict.fromkeys(lora.layers))
    layers: dict[str, Layer] = {}
    segments: list[dict[str, list[int]]] = [dict() for _ in loras]
    for key in keys:
        present = [(i, lora.layers[key]) for i, lora in enumerate(loras) if key in lora.layers]
        layer = _merge_layer(key, present, weights, segments)
        if layer is not None:
            layers[key] = layer
    first = loras[0]
    metadata = dict(first.metadata)
    if join:
        metadata[JOIN_KEY] = json.dumps({"sources": [
            {"file": lora.label, "weight": weight, "segments": segments[i]}
            for i, (lora, weight) in enumerate(zip(loras, weights))]})
    return LoraFile(layers, archs.pop() if archs else "unknown", "merge", metadata, None, [],
                    passthrough=_merge_passthrough(loras, weights))


def _merge_passthrough(loras: Sequence[LoraFile], weights: list[float]) -> dict[str, torch.Tensor]:
    """Entries carried as they are (norm diffs, lone bias diffs, set_weight): diffs add up with their weights
    (exact in fp32, stored at the first source's dtype); a lone source at weight 1 keeps its bytes."""
    merged: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for lora in loras for k in lora.passthrough):
        present = [(weights[i], lora.passthrough[key]) for i, lora in enumerate(loras) if key in lora.passthrough]
        if len(present) == 1 and present[0][0] == 1.0:
            merged[key] = present[0][1]
            continue
        if key.endswith(".set_weight"):
            raise LoraError("a replaced weight (set_weight) cannot be weighted or summed", layer=key,
                            fix="merge it at weight 1 from one LoRA only")
        shapes = {tuple(t.shape) for _, t in present}
        if len(shapes) > 1:
            raise LoraError(f"sources change this entry with different shapes {sorted(shapes)}", layer=key,
                            fix="the LoRAs were made for different base models; merge only matching LoRAs")
        total = sum(weight * tensor.float() for weight, tensor in present)
        merged[key] = total.to(present[0][1].dtype)
    return merged


def _finite_weight(lora: LoraFile, weight) -> float:
    """A merge weight as a float; NaN or ±Inf would make every merged factor non-finite (and end in a
    LinAlgError deep in the decomposition), so they are refused here, naming the file."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise LoraError(f"merge weight {weight!r} is not a number", file=lora.label,
                        fix="give a finite number, e.g. 0.7 or -0.3") from None
    if not math.isfinite(value):
        raise LoraError(f"merge weight {weight!r} is not a finite number", file=lora.label,
                        fix="give a finite number, e.g. 0.7 or -0.3")
    return value


def _merge_layer(key: str, present: list[tuple[int, Layer]], weights: list[float],
                 segments: list[dict[str, list[int]]]) -> Optional[Layer]:
    first = present[0][1]
    shapes = {layer.shape for _, layer in present}
    if len(shapes) > 1:
        raise LoraError(f"sources change this weight with different shapes {sorted(shapes)}", layer=key,
                        fix="the LoRAs were made for different base models; merge only matching LoRAs")
    if any(layer.dora_scale is not None for _, layer in present) and len(present) > 1:
        raise LoraError("DoRA layers cannot be summed exactly (their magnitude is not additive)", layer=key,
                        fix="merge DoRA LoRAs only with a base checkpoint applied, or resize them separately")
    bias = None
    if any(layer.bias_diff is not None for _, layer in present):
        bias = sum(weights[i] * layer.bias_diff.float() for i, layer in present if layer.bias_diff is not None)
    factored = [(i, _as_plain_lora(layer)) for i, layer in present]
    if all(f is not None for _, f in factored):
        ups, downs, col = [], [], 0
        for i, (up, down) in factored:
            ups.append(up * weights[i])
            downs.append(down)
            segments[i][key] = [col, col + down.shape[0]]
            col += down.shape[0]
        up = torch.cat(ups, dim=1)
        down = torch.cat(downs, dim=0)
        if first.is_conv:
            up = up.reshape(*up.shape, 1, 1)
            down = down.reshape(down.shape[0], *first.shape[1:])
        return Layer(name=first.name, kind="lora", factors={"up": up, "down": down}, shape=first.shape,
                     alpha=float(col), offset=first.offset, dora_scale=first.dora_scale, bias_diff=bias,
                     source_key=first.source_key, verbatim=first.verbatim, suffixes=first.suffixes)
    diff = sum(weights[i] * delta_weight(layer) for i, layer in present)
    for i, _ in present:
        segments[i][key] = []  # dense layers have no rank segment to toggle
    return Layer(name=first.name, kind="full", factors={"diff": diff}, shape=first.shape, offset=first.offset,
                 dora_scale=first.dora_scale, bias_diff=bias, source_key=first.source_key, verbatim=first.verbatim)


def join_sources(lora: LoraFile) -> list[dict]:
    raw = lora.metadata.get(JOIN_KEY)
    if not raw:
        raise LoraError("this LoRA was not made by a join", file=lora.label, fix="merge with mode join first")
    return json.loads(raw)["sources"]


def set_join_toggles(lora: LoraFile, toggles: Sequence[float]) -> LoraFile:
    """Scale each joined source's rank segment by its toggle (1 on, 0 off, anything between)."""
    sources = join_sources(lora)
    if len(toggles) != len(sources):
        raise LoraError(f"{len(toggles)} toggles for {len(sources)} joined sources", file=lora.label,
                        fix="give one value per source")
    layers = {}
    for key, layer in lora.layers.items():
        if layer.kind != "lora":
            layers[key] = layer
            continue
        up = layer.factors["up"].clone()
        for toggle, source in zip(toggles, sources):
            segment = source["segments"].get(key)
            if segment:
                up[:, segment[0]:segment[1]] *= float(toggle)
        layers[key] = layer.with_factors({**layer.factors, "up": up})
    return LoraFile(layers, lora.architecture, lora.family, dict(lora.metadata), lora.path, list(lora.unknown_keys),
                    passthrough=dict(lora.passthrough))


__all__ = ["merge", "set_join_toggles", "join_sources", "layer_key"]

"""``pad=N``: every kept layer zero-padded to rank N after selection, so a set of LoRAs has one rank.

Hot-swapping adapters (diffusers' ``hotswap``, a ``torch.compile``d model) needs every file to have the same
factor shapes. Zero columns of up and zero rows of down add nothing to ΔW = scale·up·down, and alpha = N
keeps ComfyUI's scale alpha/rank at 1, as for every rebuilt layer. Layers that keep nothing stay dropped.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .errors import LoraError
from .formats.reader import layer_key
from .model import Layer


def pad_layer(layer: Layer, rank: int) -> Layer:
    """``layer`` (a rebuilt plain LoRA of scale 1) at rank ``rank``; a layer already above it is refused."""
    up, down = layer.factors["up"], layer.factors["down"]
    kept = int(down.shape[0])
    if kept > rank:
        raise LoraError(f"the recipe keeps {kept} values in this layer, more than pad={rank}",
                        layer=layer_key(layer), fix=f"cap the selection with rank={rank},pad={rank}, or raise pad=")
    if layer.scale != 1.0:
        raise ValueError(f"pad_layer expects a rebuilt layer of scale 1, not {layer.scale}")
    if kept < rank:
        extra = rank - kept
        up = torch.cat([up, up.new_zeros((up.shape[0], extra, *up.shape[2:]))], dim=1)
        down = torch.cat([down, down.new_zeros((extra, *down.shape[1:]))], dim=0)
    return replace(layer, factors={**layer.factors, "up": up, "down": down}, alpha=float(rank))


def pad_result(result, rank: "int | None"):
    """The ResizeResult with every layer padded (in place), and a note saying so; unchanged without pad=."""
    if rank is None:
        return result
    layers = result.lora.layers
    for key, layer in list(layers.items()):
        layers[key] = pad_layer(layer, rank)
    result.notes.append(f"every layer zero-padded to rank {rank} (ΔW unchanged)")
    return result

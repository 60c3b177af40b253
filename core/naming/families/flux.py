"""Flux.1: BFL paths (fused ``img_attn.qkv``, ``linear1``), diffusers names as row slices (``core.naming.flux``),
CLIP-L as ``lora_te1_``, T5 as ``lora_te3_`` (sd-scripts' lora_flux.py) or ``lora_te2_`` (OneTrainer); ComfyUI maps
both for a model with CLIP-L."""
from __future__ import annotations

from typing import Optional

from .. import flux
from ..target import Parts, Target
from . import _classic
from .base import Family, Shapes, root

# diffusers double-block names Flux shares with SD3 and Qwen-Image (decided by width, single blocks, tables)
SHARED_DOUBLE = root(r"transformer_blocks[._]\d+[._](attn[._](add_[qkv]_proj|to_add_out)|ff_context|norm1_context)")
WIDTH = 3072  # Flux.1's hidden size


class Flux(Family):
    name = "flux"
    title = "Flux.1"
    marks = ((r"double_blocks|single_blocks", 10), (r"single_transformer_blocks", 30), (SHARED_DOUBLE, 10))
    metadata = ("flux",)
    encoders = {"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "t5xxl", "lora_te3_": "t5xxl",
                "text_encoder.": "clip_l", "text_encoder_2.": "t5xxl"}
    encoder_out = {"kohya": {"clip_l": "lora_te1_", "t5xxl": "lora_te3_"},  # as sd-scripts writes it
                   "peft": {"clip_l": "text_encoder.", "t5xxl": "text_encoder_2."}}
    outputs = ("kohya", "comfy", "peft")
    diffusers_classes = ("FluxTransformer2DModel",)

    def unet_target(self, path: str) -> Optional[Target]:
        return _classic.unet_target(path, "flux")

    def unet_prefix(self, path: str, convention: str) -> str:
        return _classic.unet_prefix(path, "flux", convention)

    def split_parts(self, path: str, convention: str) -> Optional[Parts]:
        if convention != "peft":
            return None
        found = flux.parts(path)
        return [(f"transformer.{p}", part) for p, part in found] if found else None

    def swapped(self, path: str, convention: str, shape: Optional[tuple[int, ...]] = None) -> bool:
        return convention == "peft" and path in flux.SWAPPED.values()

    def score(self, names, shapes: Shapes) -> float:
        wide = any(shape[1] == WIDTH for shape in shapes.values())
        return super().score(names, shapes) + (15 if wide else 0)


FAMILY = Flux()

"""Chroma: Flux's layout without per-block modulation, plus ``distilled_guidance_layer``; only T5 (which ComfyUI
maps from ``lora_te1_`` when there is no CLIP). ComfyUI's Chroma is a Flux model, so Flux's diffusers names load."""
from __future__ import annotations

import re

from . import flux
from .base import Family
from .flux import Flux

# T5 (``encoder_block_N``) under lora_te1_/lora_te_: ComfyUI maps T5 there only for a model without CLIP-L, and
# of the models with Flux's block names only Chroma has none.
T5_FIRST = re.compile(r"^lora_te1?_encoder_(block|final_layer_norm)")


class Chroma(Flux):
    name = "chroma"
    title = "Chroma"
    roots = ("distilled_guidance_layer.",)
    atoms = ("distilled_guidance_layer", "in_proj", "out_proj", "in_layer", "out_layer")
    marks = ((r"distilled_guidance_layer", 60),)
    metadata = ("chroma",)
    encoders = {"lora_te1_": "t5xxl", "lora_te_": "t5xxl", "text_encoder.": "t5xxl"}
    encoder_out = {"kohya": {"t5xxl": "lora_te1_"}, "peft": {"t5xxl": "text_encoders.t5xxl.transformer."}}
    diffusers_classes = ("ChromaTransformer2DModel",)

    def unet_target(self, path: str):
        if path.startswith(self.roots):
            return super(Flux, self).unet_target(path)
        return super().unet_target(path)

    def score(self, names, shapes) -> float:
        own = Family.score(self, names, shapes)
        if any(T5_FIRST.match(n) for n in names) and Family.score(flux.FAMILY, names, shapes) > 0:
            own += flux.FAMILY.score(names, shapes) + 1  # Flux's layout, and a T5 only Chroma loads there
        return own


FAMILY = Chroma()

"""Chroma: Flux's layout without per-block modulation, plus ``distilled_guidance_layer``; only T5 (which ComfyUI
maps from ``lora_te1_`` when there is no CLIP). ComfyUI's Chroma is a Flux model, so Flux's diffusers names load."""
from __future__ import annotations

from .flux import Flux


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
        return super(Flux, self).score(names, shapes)


FAMILY = Chroma()

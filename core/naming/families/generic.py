"""No family detected ("unknown"): the SD/Flux rules that read every classic name, and ComfyUI's generic
``diffusion_model.``/``lora_unet_`` names for the rest. Not registered: ``--arch`` cannot ask for it."""
from __future__ import annotations

from typing import Optional

from ..target import Target
from . import _classic
from .base import Family
from .sd15 import SD15


class Generic(Family):
    name = "unknown"
    title = "an unknown model"
    encoders = SD15.encoders
    encoder_out = {"kohya": {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te2_"},
                   "peft": SD15.encoder_out["peft"]}
    outputs = ("kohya", "comfy", "peft")

    def unet_target(self, path: str) -> Optional[Target]:
        return _classic.unet_target(path, self.name)

    def unet_prefix(self, path: str, convention: str) -> str:
        return _classic.unet_prefix(path, self.name, convention)


GENERIC = Generic()

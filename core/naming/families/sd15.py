"""Stable Diffusion 1.x: SGM UNet paths, diffusers block names by rule (``unet_sd``), CLIP-L as ``lora_te_``."""
from __future__ import annotations

from typing import Optional

from ..target import Target
from . import _classic
from .base import Family


class SD15(Family):
    name = "sd15"
    title = "SD 1.5"
    # attention at level 0 (down_blocks.0 / up_blocks.3 / input_blocks.1-2 / output_blocks.9-11): SD1.x only
    marks = ((r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
              r"|input_blocks[._]10[._]", 10),)
    metadata = ("sd_v1", "stable-diffusion-v1")
    encoders = {"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "clip_g", "text_encoder.": "clip_l",
                "text_encoder_2.": "clip_g"}
    encoder_out = {"kohya": {"clip_l": "lora_te_", "clip_g": "lora_te2_", "t5xxl": "lora_te2_"},
                   "peft": {"clip_l": "text_encoder.", "clip_g": "text_encoder_2.", "t5xxl": "text_encoder_2."}}
    outputs = ("kohya", "comfy", "peft")
    diffusers_classes = ("StableDiffusionPipeline",)
    kohya_diffusers = True  # sd-scripts names SD1.5 UNet layers by their diffusers blocks

    def unet_target(self, path: str) -> Optional[Target]:
        return _classic.unet_target(path, self.name)

    def unet_prefix(self, path: str, convention: str) -> str:
        return _classic.unet_prefix(path, self.name, convention, kohya_diffusers=self.kohya_diffusers)


FAMILY = SD15()

"""SDXL base: SGM UNet paths (three levels), CLIP-L and OpenCLIP bigG as ``lora_te1_``/``lora_te2_``."""
from __future__ import annotations

from .sd15 import SD15


class SDXL(SD15):
    name = "sdxl"
    title = "SDXL"
    marks = (("lora_te2_|text_encoder_2\\.|clip_g\\.|up_blocks[._]0[._]attentions|label_emb", 10),
             # a second transformer in a block: SDXL's depth 2/10 (SD1.x has one), under a UNet block
             (r"(attentions[._]\d+|blocks[._]\d+[._]1)[._]transformer_blocks[._][1-9]", 10))
    metadata = ("sdxl", "stable-diffusion-xl")
    encoder_out = {"kohya": {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te2_"},
                   "peft": SD15.encoder_out["peft"]}
    diffusers_classes = ("StableDiffusionXLPipeline",)
    kohya_diffusers = False


FAMILY = SDXL()

"""SDXL Refiner: the SDXL UNet layout at four levels with attention only in the middle two, and only CLIP-G
(which ComfyUI maps from ``lora_te_`` and ``text_encoder.`` when there is no CLIP-L)."""
from __future__ import annotations

from .sd15 import SD15


class SDXLRefiner(SD15):
    name = "sdxl_refiner"
    title = "SDXL Refiner"
    marks = ((r"up_blocks[._]2[._]attentions|output_blocks[._][678][._]1[._]", 12),  # attention at level 2
             # four levels (SDXL base has three)
             (r"down_blocks[._]3[._]|up_blocks[._]3[._]|input_blocks[._]1[01][._]|output_blocks[._](9|10|11)[._]", 12),
             # level-0 attention is SD1.x's; two text encoders are SDXL base's
             (r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
              r"|output_blocks[._](9|10|11)[._]1[._]", -100),
             (r"^(lora_te[12]_|text_encoder_2\.|text_encoders\.clip_l\.)", -100))
    metadata = ("sdxl_refiner", "stable-diffusion-xl-v1-refiner")
    encoders = {"lora_te_": "clip_g", "lora_te1_": "clip_g", "lora_te2_": "clip_g", "text_encoder.": "clip_g"}
    encoder_out = {"kohya": {"clip_g": "lora_te_"}, "peft": {"clip_g": "text_encoder."}}
    outputs = ("kohya", "comfy")
    unloadable = "it maps their diffusers attention keys only as ...processor.to_q"
    diffusers_classes = ("StableDiffusionXLImg2ImgPipeline",)
    kohya_diffusers = False


FAMILY = SDXLRefiner()

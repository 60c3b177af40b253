"""Wan 2.1 / 2.2 (T2V, I2V with ``cross_attn.k_img``/``v_img``, TI2V 5B, VACE): ComfyUI's paths are the original
ones (``blocks.N.self_attn.q``, ``ffn.0``, VACE's ``vace_blocks.N``), which musubi-tuner writes under ``lora_unet_``
with ``_`` and ai-toolkit/lightx2v under ``diffusion_model.``. ComfyUI 0.3.64 maps no diffusers Wan names
(``attn1.to_q``): they are read (table below) and
written as ComfyUI's, and PEFT output is refused; UMT5 LoRAs keep ComfyUI's generic ``text_encoders.umt5xxl.`` names."""
from __future__ import annotations

import re
from typing import Optional

from ..target import Target
from .base import Family, root

# diffusers WanTransformer3DModel block suffix -> ComfyUI's (ComfyUI 0.3.64 itself maps none of these; we read
# them so a converted file loads)
DIFFUSERS = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
             "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
             "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
             "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


class Wan(Family):
    name = "wan"
    title = "Wan 2.1/2.2"
    roots = ("blocks.", "vace_blocks.", "head.", "patch_embedding", "text_embedding.", "time_embedding.",
             "time_projection.", "img_emb.", "vace_patch_embedding", "ref_conv", "casual_audio_encoder.")
    atoms = ("self_attn", "cross_attn", "k_img", "v_img", "norm_k_img", "norm_q", "norm_k", "vace_blocks",
             "before_proj", "after_proj", "patch_embedding", "text_embedding", "time_embedding", "time_projection",
             "img_emb", "vace_patch_embedding", "ref_conv", "emb_pos")
    marks = ((root(r"(vace_)?blocks[._]\d+[._](self_attn|cross_attn|ffn|norm3|modulation|attn1|attn2)"), 60),
             (root(r"(patch_embedding|text_embedding|time_embedding|time_projection|img_emb|head[._]head)"), 30))
    metadata = ("wan",)
    diffusers_classes = ("WanTransformer3DModel",)

    def unet_target(self, path: str) -> Optional[Target]:
        m = _BLOCK.fullmatch(path)
        if m and m[2] in DIFFUSERS:
            return Target(f"diffusion_model.blocks.{m[1]}.{DIFFUSERS[m[2]]}")
        return super().unet_target(path)


FAMILY = Wan()

"""Wan 2.1 / 2.2 (T2V, I2V with ``cross_attn.k_img``/``v_img``, TI2V 5B, VACE): ComfyUI's paths are the original
ones (``blocks.N.self_attn.q``, ``ffn.0``, VACE's ``vace_blocks.N``), which musubi-tuner writes under ``lora_unet_``
with ``_`` and ai-toolkit/lightx2v under ``diffusion_model.``. ComfyUI 0.3.64 maps no diffusers Wan names
(``attn1.to_q``), so PEFT output is refused; UMT5 LoRAs keep ComfyUI's generic ``text_encoders.umt5xxl.`` names."""
from __future__ import annotations

from .base import Family, root


class Wan(Family):
    name = "wan"
    title = "Wan 2.1/2.2"
    roots = ("blocks.", "vace_blocks.", "head.", "patch_embedding", "text_embedding.", "time_embedding.",
             "time_projection.", "img_emb.", "vace_patch_embedding", "ref_conv", "casual_audio_encoder.")
    atoms = ("self_attn", "cross_attn", "k_img", "v_img", "norm_k_img", "norm_q", "norm_k", "vace_blocks",
             "before_proj", "after_proj", "patch_embedding", "text_embedding", "time_embedding", "time_projection",
             "img_emb", "vace_patch_embedding", "ref_conv", "emb_pos")
    marks = ((root(r"(vace_)?blocks[._]\d+[._](self_attn|cross_attn|ffn|norm3|modulation)"), 60),
             (root(r"(patch_embedding|text_embedding|time_embedding|time_projection|img_emb|head[._]head)"), 30))
    metadata = ("wan",)
    diffusers_classes = ("WanTransformer3DModel",)


FAMILY = Wan()

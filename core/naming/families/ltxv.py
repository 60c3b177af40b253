"""LTX-Video: ComfyUI's paths are diffusers' (``transformer_blocks.N.attn1.to_q``, ``ff.net.0.proj``); ComfyUI
0.3.64 maps them only under ``diffusion_model.`` or ``lora_unet_`` (no ``transformer.`` branch), so PEFT output is
refused. T5 is ComfyUI's only CLIP here, mapped from ``lora_te1_``."""
from __future__ import annotations

from .base import Family, root


class LTXV(Family):
    name = "ltxv"
    title = "LTX-Video"
    roots = ("transformer_blocks.", "adaln_single.", "caption_projection.", "patchify_proj", "proj_out")
    atoms = ("adaln_single", "caption_projection", "patchify_proj", "scale_shift_table", "q_norm", "k_norm")
    # attn1 at the root (not inside an SD UNet's attentions.N); attn2 cancels SD3.5's x_block attn2 mark
    marks = ((root(r"transformer_blocks[._]\d+[._]attn1[._]"), 40),
             (root(r"transformer_blocks[._]\d+[._]attn2[._]"), 20),
             (root(r"(adaln_single|caption_projection|patchify_proj)"), 40))
    metadata = ("ltx",)
    encoders = {"lora_te1_": "t5xxl", "lora_te_": "t5xxl"}
    encoder_out = {"kohya": {"t5xxl": "lora_te1_"}}
    diffusers_classes = ("LTXVideoTransformer3DModel",)


FAMILY = LTXV()

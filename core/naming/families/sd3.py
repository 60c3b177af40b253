"""SD3 / SD3.5 (MMDiT): ``joint_blocks.N.x_block`` / ``context_block`` with fused ``attn.qkv``; diffusers names
by ComfyUI's own ``comfy.utils.mmdit_to_diffusers`` (re-expressed as the tables below); CLIP-L, CLIP-G and T5 as
``lora_te1_``/``lora_te2_``/``lora_te3_`` (kohya sd-scripts and ComfyUI's clip key map)."""
from __future__ import annotations

import re
from typing import Optional

from ..target import Parts, Target
from .base import Family, root
from .flux import SHARED_DOUBLE

# diffusers block suffix -> (MMDiT block suffix, (start, length) of a q/k/v slice of the fused qkv or None)
BLOCK: dict[str, tuple[str, Optional[tuple[int, int]]]] = {
    "attn.to_q": ("x_block.attn.qkv", (0, 1)), "attn.to_k": ("x_block.attn.qkv", (1, 1)),
    "attn.to_v": ("x_block.attn.qkv", (2, 1)),
    "attn.add_q_proj": ("context_block.attn.qkv", (0, 1)), "attn.add_k_proj": ("context_block.attn.qkv", (1, 1)),
    "attn.add_v_proj": ("context_block.attn.qkv", (2, 1)),
    "attn2.to_q": ("x_block.attn2.qkv", (0, 1)), "attn2.to_k": ("x_block.attn2.qkv", (1, 1)),
    "attn2.to_v": ("x_block.attn2.qkv", (2, 1)),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None), "ff_context.net.2": ("context_block.mlp.fc2", None),
    "attn.norm_q": ("x_block.attn.ln_q", None), "attn.norm_k": ("x_block.attn.ln_k", None),
    "attn.norm_added_q": ("context_block.attn.ln_q", None), "attn.norm_added_k": ("context_block.attn.ln_k", None),
    "attn2.norm_q": ("x_block.attn2.ln_q", None), "attn2.norm_k": ("x_block.attn2.ln_k", None),
}
BASIC = {"context_embedder": "context_embedder", "pos_embed.proj": "x_embedder.proj",
         "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
         "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
         "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}  # scale, shift vs shift, scale
# The last block's context_block is "pre_only": its adaLN has 2 x width rows (shift, scale), which diffusers
# stores swapped like norm_out; the other blocks' have 6 x width rows, unswapped.
PRE_ONLY_ROWS = 2
_PRE_ONLY = re.compile(r"joint_blocks\.\d+\.context_block\.adaLN_modulation\.1")
WIDTHS = (1536, 2432)  # SD3/SD3.5 Medium, SD3.5 Large (hidden = 64 x depth)
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_JOINT = re.compile(r"joint_blocks\.(\d+)\.(.+)")


class SD3(Family):
    name = "sd3"
    title = "SD3/SD3.5"
    roots = ("joint_blocks.", "context_embedder", "x_embedder.", "t_embedder.", "y_embedder.", "final_layer.")
    atoms = ("joint_blocks", "x_block", "context_block", "adaLN_modulation", "t_embedder", "x_embedder",
             "y_embedder", "pos_embed", "ln_q", "ln_k")
    marks = ((r"joint_blocks|x_block|context_block", 60), (r"^(lora_te3_|text_encoders\.t5xxl)", 5),
             (SHARED_DOUBLE, 10), (root(r"transformer_blocks[._]\d+[._]attn2[._]"), 20))  # SD3.5's x_block attn2
    metadata = ("sd3", "stable-diffusion-3", "stable-diffusion-v3")
    encoders = {"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "clip_g", "lora_te3_": "t5xxl",
                "text_encoder.": "clip_l", "text_encoder_2.": "clip_g", "text_encoder_3.": "t5xxl"}
    encoder_out = {"kohya": {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"},
                   # diffusers trains no T5 LoRA; ComfyUI's generic name loads it
                   "peft": {"clip_l": "text_encoder.", "clip_g": "text_encoder_2.",
                            "t5xxl": "text_encoders.t5xxl.transformer."}}
    outputs = ("kohya", "comfy", "peft")
    diffusers_classes = ("SD3Transformer2DModel",)

    def score(self, names, shapes) -> float:
        wide = any(shape[1] in WIDTHS for shape in shapes.values())
        return super().score(names, shapes) + (15 if wide else 0)

    def unet_target(self, path: str) -> Optional[Target]:
        if path in BASIC:
            return Target(f"diffusion_model.{BASIC[path]}")
        if path in SWAPPED:
            return Target(f"diffusion_model.{SWAPPED[path]}", swap_halves=True)
        m = _BLOCK.fullmatch(path)
        if m:
            entry = BLOCK.get(m[2])
            if entry is None:
                return None
            name = f"joint_blocks.{m[1]}.{entry[0]}"
            return Target(f"diffusion_model.{name}", entry[1],
                          swap_if_rows=PRE_ONLY_ROWS if _PRE_ONLY.fullmatch(name) else None)
        return super().unet_target(path)

    def peft_path(self, path: str) -> Optional[str]:
        for diffusers, mmdit in (*BASIC.items(), *SWAPPED.items()):
            if mmdit == path:
                return diffusers
        m = _JOINT.fullmatch(path)
        if m:
            for diffusers, (mmdit, part) in BLOCK.items():
                if mmdit == m[2] and part is None:
                    return f"transformer_blocks.{m[1]}.{diffusers}"
        return None

    def split_parts(self, path: str, convention: str) -> Optional[Parts]:
        m = _JOINT.fullmatch(path)
        if convention != "peft" or not m:
            return None
        found = [(f"transformer.transformer_blocks.{m[1]}.{diffusers}", part)
                 for diffusers, (mmdit, part) in BLOCK.items() if mmdit == m[2] and part is not None]
        return found or None

    def swapped(self, path: str, convention: str, shape: Optional[tuple[int, ...]] = None) -> bool:
        if convention != "peft":
            return False
        if _PRE_ONLY.fullmatch(path):
            return shape is not None and Target(path, swap_if_rows=PRE_ONLY_ROWS).swaps(shape)
        return path in SWAPPED.values()


FAMILY = SD3()

"""Qwen-Image (and Edit): ComfyUI's paths are diffusers' (``transformer_blocks.N.attn.to_q``, ``img_mlp``,
``img_mod.1``), so musubi's ``lora_unet_`` + ``_``, DiffSynth's and Lightning's bare paths, and diffusers/PEFT's
``transformer.`` all name the same weights; ComfyUI maps ``transformer.`` and bare paths, so PEFT output loads."""
from __future__ import annotations

import re
from typing import Optional

from .base import Family, root
from .flux import SHARED_DOUBLE, WIDTH

# Qwen-Image has 60 blocks at Flux's width; Flux has 19 double blocks: a block index past 18 at that width is Qwen's
FLUX_DOUBLE_BLOCKS = 19
_BLOCK_INDEX = re.compile(root(r"transformer_blocks[._](\d+)[._]"))


class QwenImage(Family):
    name = "qwen_image"
    title = "Qwen-Image"
    roots = ("transformer_blocks.", "img_in", "txt_in", "txt_norm", "norm_out.", "proj_out", "time_text_embed.")
    atoms = ("img_mlp", "txt_mlp", "img_mod", "txt_mod", "txt_norm", "norm_added_q", "norm_added_k")
    marks = ((root(r"transformer_blocks[._]\d+[._](img|txt)_(mlp|mod)"), 60), (SHARED_DOUBLE, 10),
             (root(r"txt_norm"), 30))
    metadata = ("qwen-image", "qwen_image", "qwenimage")
    outputs = ("kohya", "comfy", "peft")
    diffusers_classes = ("QwenImageTransformer2DModel",)

    def score(self, names, shapes) -> float:
        wide = any(shape[1] == WIDTH for shape in shapes.values())
        deep = any((m := _BLOCK_INDEX.match(n)) and int(m[1]) >= FLUX_DOUBLE_BLOCKS for n in names)
        return super().score(names, shapes) + (20 if wide and deep else 0)

    def peft_path(self, path: str) -> Optional[str]:
        return path


FAMILY = QwenImage()

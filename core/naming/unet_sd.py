"""SD1.5 / SDXL UNet: diffusers block names <-> SGM (ComfyUI, checkpoint) block names, by rule.

The rule is the one of ComfyUI's ``comfy.utils.unet_to_diffusers`` for two res blocks per level:
down level x, res block i -> ``input_blocks.{1 + 3x + i}``; up level x, block i ->
``output_blocks.{3x + i}``. Only the upsampler's slot depends on the architecture (after an
attention block it is ``.2``, else ``.1``), so smaller test UNets of the same shape map too.
"""
from __future__ import annotations

import re
from typing import Optional

RES_BLOCKS = 2  # per level, both SD1.5 and SDXL
# Does up level x have attention blocks (decides the upsampler's slot)?
UP_ATTENTION = {"sd15": (False, True, True, True), "sdxl": (True, True, False),
                "sdxl_refiner": (False, True, True, False)}

RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
RESNET_BACK = {v: k for k, v in RESNET.items()}
BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
         "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
BASIC_BACK = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "out.0": "conv_norm_out",
              "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
DIFFUSERS_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.") + tuple(BASIC)
SGM_ROOTS = ("input_blocks.", "output_blocks.", "middle_block.", "out.", "time_embed.", "label_emb.")


def _resnet_part(rest: str) -> Optional[str]:
    return RESNET.get(rest)


def to_sgm(name: str, arch: str) -> Optional[str]:
    """diffusers UNet module path -> SGM path; None if it is not a UNet module we know."""
    if name in BASIC:
        return BASIC[name]
    up_attention = UP_ATTENTION.get(arch, UP_ATTENTION["sd15"])
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", name)
    if m:
        x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + (RES_BLOCKS + 1) * x
        if kind == "downsamplers":
            return f"input_blocks.{n + RES_BLOCKS}.0.op" if rest == "conv" and i == 0 else None
        if i >= RES_BLOCKS:
            return None
        if kind == "resnets":
            part = _resnet_part(rest)
            return f"input_blocks.{n + i}.0.{part}" if part else None
        return f"input_blocks.{n + i}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = (RES_BLOCKS + 1) * x
        if kind == "upsamplers":
            if rest != "conv" or i != 0:
                return None
            slot = 2 if x < len(up_attention) and up_attention[x] else 1
            return f"output_blocks.{n + RES_BLOCKS}.{slot}.conv"
        if i > RES_BLOCKS:
            return None
        if kind == "resnets":
            part = _resnet_part(rest)
            return f"output_blocks.{n + i}.0.{part}" if part else None
        return f"output_blocks.{n + i}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}" if i == 0 else None
        part = _resnet_part(rest)
        return f"middle_block.{0 if i == 0 else 2}.{part}" if part and i in (0, 1) else None
    return None


def to_diffusers(name: str) -> Optional[str]:
    """SGM UNet module path -> diffusers path; None if there is no diffusers equivalent."""
    if name in BASIC_BACK:
        return BASIC_BACK[name]
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", name)
    if m:
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        x, i = divmod(n - 1, RES_BLOCKS + 1)
        if i == RES_BLOCKS:
            return f"down_blocks.{x}.downsamplers.0.conv" if slot == 0 and rest == "op" else None
        if slot == 0:
            part = RESNET_BACK.get(rest)
            return f"down_blocks.{x}.resnets.{i}.{part}" if part else None
        return f"down_blocks.{x}.attentions.{i}.{rest}" if slot == 1 else None
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", name)
    if m:
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        x, i = divmod(n, RES_BLOCKS + 1)
        if slot == 0:
            part = RESNET_BACK.get(rest)
            return f"up_blocks.{x}.resnets.{i}.{part}" if part else None
        if rest == "conv" and i == RES_BLOCKS:
            return f"up_blocks.{x}.upsamplers.0.conv"
        return f"up_blocks.{x}.attentions.{i}.{rest}" if slot == 1 else None
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", name)
    if m:
        slot, rest = int(m[1]), m[2]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        part = RESNET_BACK.get(rest)
        return f"mid_block.resnets.{0 if slot == 0 else 1}.{part}" if part and slot in (0, 2) else None
    return None

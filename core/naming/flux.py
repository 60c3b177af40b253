"""Flux: diffusers transformer names <-> BFL (ComfyUI, checkpoint) names, with fused-weight parts.

BFL fuses q, k, v into ``img_attn.qkv`` / ``txt_attn.qkv`` and q, k, v, mlp into
``single_blocks.N.linear1``; diffusers keeps them apart. A diffusers layer of a fused weight is a
row slice of it: ``(start_units, length_units)`` in units of the slice's own height (as in
ComfyUI's ``flux_to_diffusers``).
"""
from __future__ import annotations

import re
from typing import Optional

Part = Optional[tuple[int, int]]

DOUBLE = {  # diffusers suffix -> (BFL suffix, part)
    "attn.to_q": ("img_attn.qkv", (0, 1)), "attn.to_k": ("img_attn.qkv", (1, 1)),
    "attn.to_v": ("img_attn.qkv", (2, 1)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1)), "attn.add_k_proj": ("txt_attn.qkv", (1, 1)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1)),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
}
SINGLE = {
    "attn.to_q": ("linear1", (0, 1)), "attn.to_k": ("linear1", (1, 1)), "attn.to_v": ("linear1", (2, 1)),
    "proj_mlp": ("linear1", (3, 4)), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
BASIC = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "controlnet_x_embedder": "pos_embed_input",
}
# diffusers modules whose output rows are BFL's with the two halves swapped (scale, shift vs shift, scale;
# ComfyUI's swap_scale_shift): exact as a row permutation of the factors on the output side
SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}
BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.", "pos_embed_input")
DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.") + tuple(BASIC) + tuple(SWAPPED)


# BFL-style names of row slices (ComfyUI's key map: single_blocks.N.linear1_qkv = q, k, v rows of linear1)
BFL_SLICES = {"linear1_qkv": ("linear1", (0, 3))}


def bfl_slice(name: str) -> tuple[str, Part]:
    """A BFL path, resolving slice aliases such as ``single_blocks.0.linear1_qkv``."""
    head, _, last = name.rpartition(".")
    if last in BFL_SLICES:
        base, part = BFL_SLICES[last]
        return f"{head}.{base}", part
    return name, None


def to_bfl(name: str) -> Optional[tuple[str, Part]]:
    """diffusers Flux module path -> (BFL path, part); None if unknown."""
    if name in BASIC:
        return BASIC[name], None
    m = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", name)
    if not m:
        return None
    table, block = (SINGLE, "single_blocks") if m[1] == "single_transformer_blocks" else (DOUBLE, "double_blocks")
    entry = table.get(m[3])
    if entry is None:
        return None
    return f"{block}.{m[2]}.{entry[0]}", entry[1]


def to_diffusers(name: str) -> Optional[str]:
    """BFL path of an unfused weight -> diffusers path; None for fused weights (see parts) or unknown."""
    for diffusers, bfl in (*BASIC.items(), *SWAPPED.items()):
        if bfl == name:
            return diffusers
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", name)
    if not m:
        return None
    table, block = (DOUBLE, "transformer_blocks") if m[1] == "double_blocks" else (SINGLE, "single_transformer_blocks")
    for diffusers, (bfl, part) in table.items():
        if bfl == m[3] and part is None:
            return f"{block}.{m[2]}.{diffusers}"
    return None


def parts(name: str) -> Optional[list[tuple[str, tuple[int, int]]]]:
    """The diffusers layers a fused BFL weight splits into, with their parts; None if not fused."""
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", name)
    if not m:
        return None
    table, block = (DOUBLE, "transformer_blocks") if m[1] == "double_blocks" else (SINGLE, "single_transformer_blocks")
    found = [(f"{block}.{m[2]}.{diffusers}", part) for diffusers, (bfl, part) in table.items()
             if bfl == m[3] and part is not None]
    return found or None

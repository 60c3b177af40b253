"""Lumina 2 (and Z-Image, which shares its layout): ``layers.N.attention.qkv`` fused (grouped-query: q rows, then
k and v rows of the kv heads), ``feed_forward.w1/w2/w3``, noise and context refiners; kohya sd-scripts writes
``lora_unet_`` + path with ``_``. ComfyUI 0.3.64 maps no diffusers Lumina names (split ``attn.to_q``), so PEFT
output is refused; Gemma keeps ComfyUI's generic ``text_encoders.gemma2_2b.`` names."""
from __future__ import annotations

import re
from typing import Optional, Sequence

from ..target import Target
from .base import Family, root

# diffusers block suffix -> ComfyUI suffix: Lumina2Transformer2DModel (diffusers' convert_lumina2_to_diffusers)
# and Z-Image's ZImageTransformer2DModel (``attention.to_*``: later ComfyUI's z_image_to_diffusers)
DIFFUSERS = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
             "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
             "attention.to_out.0": "attention.out", "attention.norm_q": "attention.q_norm",
             "attention.norm_k": "attention.k_norm"}
# q, k, v of the fused qkv: q as wide as the model (its input), then k and v of the kv heads (equal heights)
QKV = {"attn.to_q": (0, 0), "attn.to_k": (1, 0), "attn.to_v": (1, 1),
       "attention.to_q": (0, 0), "attention.to_k": (1, 0), "attention.to_v": (1, 1)}
_BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)")


class Lumina2(Family):
    name = "lumina2"
    title = "Lumina 2 / Z-Image"
    roots = ("layers.", "noise_refiner.", "context_refiner.", "cap_embedder.", "t_embedder.", "x_embedder",
             "final_layer.", "norm_final")
    atoms = ("noise_refiner", "context_refiner", "feed_forward", "cap_embedder", "t_embedder", "x_embedder",
             "q_norm", "k_norm", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "norm_final")
    marks = ((root(r"(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|adaLN_modulation)"),
              60), (root(r"(noise_refiner|context_refiner|cap_embedder)"), 30),
             (root(r"layers[._]\d+[._]attn[._]to_[qkv]"), 40))  # diffusers' split q/k/v
    metadata = ("lumina", "z-image", "z_image")
    diffusers_classes = ("Lumina2Transformer2DModel", "ZImageTransformer2DModel")

    def unet_target(self, path: str) -> Optional[Target]:
        m = _BLOCK.fullmatch(path)
        if m and m[3] in QKV:
            return Target(f"diffusion_model.{m[1]}.{m[2]}.attention.qkv", rows_after=QKV[m[3]])
        if m and m[3] in DIFFUSERS:
            return Target(f"diffusion_model.{m[1]}.{m[2]}.{DIFFUSERS[m[3]]}")
        return super().unet_target(path)

    def fused_rows(self, path: str, offsets: Sequence[tuple[int, int, int]], columns: int) -> Optional[int]:
        """q rows = the model width (``columns``); k and v rows = the kv heads', known from either of them."""
        if not path.endswith("attention.qkv"):
            return None
        kv = {length for _, start, length in offsets if start >= columns}
        return columns + 2 * kv.pop() if len(kv) == 1 else None


FAMILY = Lumina2()

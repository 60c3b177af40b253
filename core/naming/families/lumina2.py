"""Lumina 2 (and Z-Image, which shares its layout): ``layers.N.attention.qkv`` fused (grouped-query: q rows, then
k and v rows of the kv heads), ``feed_forward.w1/w2/w3``, noise and context refiners; kohya sd-scripts writes
``lora_unet_`` + path with ``_``. ComfyUI 0.3.64 maps no diffusers Lumina names (split ``attn.to_q``), so PEFT
output is refused; Gemma keeps ComfyUI's generic ``text_encoders.gemma2_2b.`` names."""
from __future__ import annotations

from .base import Family, root


class Lumina2(Family):
    name = "lumina2"
    title = "Lumina 2 / Z-Image"
    roots = ("layers.", "noise_refiner.", "context_refiner.", "cap_embedder.", "t_embedder.", "x_embedder",
             "final_layer.", "norm_final")
    atoms = ("noise_refiner", "context_refiner", "feed_forward", "cap_embedder", "t_embedder", "x_embedder",
             "q_norm", "k_norm", "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "norm_final")
    marks = ((root(r"(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|adaLN_modulation)"),
              60), (root(r"(noise_refiner|context_refiner|cap_embedder)"), 30))
    metadata = ("lumina", "z-image", "z_image")
    diffusers_classes = ("Lumina2Transformer2DModel", "ZImageTransformer2DModel")


FAMILY = Lumina2()

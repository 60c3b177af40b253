"""HiDream-I1: ``double_stream_blocks.N.block`` / ``single_stream_blocks.N.block`` with MoE feed-forwards; ComfyUI
maps SimpleTuner's ``transformer.`` + path and LyCORIS ``lycoris_`` + path with ``_``, so PEFT output loads. Its
Llama/T5/CLIP encoders keep ComfyUI's generic ``text_encoders.`` names."""
from __future__ import annotations

from typing import Optional

from .base import Family


class HiDream(Family):
    name = "hidream"
    title = "HiDream"
    roots = ("double_stream_blocks.", "single_stream_blocks.", "caption_projection.", "p_embedder.", "t_embedder.",
             "x_embedder.", "final_layer.")
    atoms = ("double_stream_blocks", "single_stream_blocks", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "ff_i",
             "ff_t", "shared_experts", "q_rms_norm", "k_rms_norm", "q_rms_norm_t", "k_rms_norm_t",
             "caption_projection", "p_embedder", "pooled_embedder", "t_embedder", "x_embedder")
    marks = ((r"double_stream_blocks|single_stream_blocks", 60),)
    metadata = ("hidream",)
    outputs = ("kohya", "comfy", "peft")
    diffusers_classes = ("HiDreamImageTransformer2DModel",)

    def peft_path(self, path: str) -> Optional[str]:
        return path


FAMILY = HiDream()

"""HunyuanVideo: ComfyUI's paths are Flux-like (``double_blocks.N.img_attn.qkv``, ``img_mod.lin``, ``img_mlp.0``);
the original Tencent names that diffusion-pipe and musubi-tuner write (``img_attn_qkv``, ``img_mod.linear``,
``img_mlp.fc1``, ``modulation.linear``) are renamed back by the table below, the reverse of ComfyUI's own
"diffusion-pipe lora format" rule, which is also what PEFT output writes (``transformer.`` + original names)."""
from __future__ import annotations

from typing import Optional

from .base import Family, root

# (original, ComfyUI) path pieces, in the order ComfyUI's model_lora_keys_unet replaces them
ORIGINAL = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
            ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear."))


class HunyuanVideo(Family):
    name = "hunyuan_video"
    title = "HunyuanVideo"
    roots = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.")
    atoms = ("individual_token_refiner", "c_embedder", "t_embedder", "input_embedder", "self_attn_qkv",
             "self_attn_proj", "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj")
    renames = ((r"_attn_(qkv|proj)(?=\.|$)", r"_attn.\1"), (r"_mod\.linear$", "_mod.lin"),
               (r"(^|\.)modulation\.linear$", r"\1modulation.lin"), (r"mlp\.fc1$", "mlp.0"), (r"mlp\.fc2$", "mlp.2"))
    # the original names (dotted: Flux's kohya names share the underscored ones) and the text-token refiner
    marks = ((r"\.(img|txt)_attn_(qkv|proj)$|_mod[._]linear$|(img|txt)_mlp[._]fc[12]$|modulation[._]linear$", 60),
             (r"individual_token_refiner|txt_in[._]c_embedder", 60), (root(r"(double|single)_blocks"), 10))
    metadata = ("hunyuan-video", "hunyuan_video", "hunyuanvideo")
    # Tencent's release names (and Kijai's safetensors of them), renamed exactly as ComfyUI's HunyuanVideo
    # process_unet_state_dict (comfy/supported_models.py) does when UNETLoader loads such a file
    original_base = r"(^|\.)double_blocks\.\d+\.img_attn_qkv\.weight$"
    original_base_renames = (
        ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
        ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
        ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
        ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
        ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
        ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"), ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
        (".q_norm.weight", ".norm.query_norm.scale"), (".k_norm.weight", ".norm.key_norm.scale"),
        ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
        ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."))
    outputs = ("kohya", "comfy", "peft")
    diffusers_classes = ("HunyuanVideoTransformer3DModel",)

    def peft_path(self, path: str) -> Optional[str]:
        """diffusion-pipe's names (ComfyUI maps ``transformer.`` + them for HunyuanVideo)."""
        key = f"{path}."
        for comfy_name, original in ORIGINAL:
            key = key.replace(comfy_name, original)
        return key[:-1]


FAMILY = HunyuanVideo()

"""Small but structurally real ComfyUI models of the DiT/video families issue 9 names, with their real key maps.

Each builder takes the family's class from ``comfy.supported_models`` (the one ComfyUI's model detection picks
for a real checkpoint of that family), fills the unet config that ``comfy.model_detection`` would derive, with
widths and depths shrunk (hidden 32-64, two blocks of each kind) and every other structural switch as the real
model has it (qk norms, I2V image cross-attention, x_block self-attention, Chroma's approximator ...). The host's
key maps (``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``) run on the built model, so they are
the maps ComfyUI 0.3.64 uses for that family. No weight files.

Text encoders are built only where they are cheap CLIP/T5 stacks (SD3: CLIP-L, CLIP-G, T5; SDXL Refiner: CLIP-G;
Chroma and LTX-Video: T5). Wan's UMT5-XXL, Qwen-Image's Qwen2.5-VL 7B, HunyuanVideo's Llama (+CLIP-L), HiDream's
Llama/T5/CLIP stack and Lumina 2's Gemma 2 2B are skipped: their LoRAs are trained on the diffusion model (musubi,
ai-toolkit and diffusion-pipe do not train those encoders), and the host maps them only by the generic
``text_encoders.<name>.`` rule.

Z-Image is not built: ComfyUI 0.3.64 has no Z-Image model class (its Lumina 2 class is NextDiT with fused qkv and
no ``z_image_to_diffusers`` key map), so only Lumina 2 stands for that line here.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Callable

import torch

from tests.host.comfy_models import _SMALL_CLIP, _SMALL_T5, HostModel, _clip, _key_map, _patcher, import_comfy

BUILD_SECONDS: dict[str, float] = {}  # family -> seconds its last build took (the report and a sanity test)

_WAN_COMMON = {"image_model": "wan2.1", "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "out_dim": 16,
               "text_dim": 32, "freq_dim": 32, "patch_size": (1, 2, 2), "window_size": (-1, -1), "qk_norm": True,
               "cross_attn_norm": True, "eps": 1e-6}

# family -> (comfy.supported_models class name, unet config as comfy.model_detection would give it, shrunk)
UNET_CONFIGS: dict[str, tuple[str, dict]] = {
    "wan21_t2v": ("WAN21_T2V", dict(_WAN_COMMON, model_type="t2v", in_dim=16)),
    "wan21_i2v": ("WAN21_I2V", dict(_WAN_COMMON, model_type="i2v", in_dim=36)),
    "wan22_ti2v_5b": ("WAN22_T2V", dict(_WAN_COMMON, model_type="t2v", in_dim=48, out_dim=48)),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
                                 "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                                 "axes_dims_rope": (4, 6, 6)}),
    # MMDiT ties its width to depth (hidden = 64·depth) and the host's diffusers map assumes num_blocks == depth:
    # depth 2 gives hidden 128. SD3.5 switches: RMS qk norm, x_block self-attention (attn2) in block 0.
    "sd3": ("SD3", {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
                    "adm_in_channels": 64, "num_patches": 64, "pos_embed_max_size": 8, "qk_norm": "rms",
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 32, "out_features": 128}},
                    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0]}),
    "hunyuan_video": ("HunyuanVideo", {"image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2],
                                       "out_channels": 16, "vec_in_dim": 32, "axes_dim": [4, 6, 6], "meanflow": False,
                                       "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2,
                                       "depth": 2, "depth_single_blocks": 2, "theta": 256, "qkv_bias": True,
                                       "byt5": False, "guidance_embed": True}),
    "ltxv": ("LTXV", {"image_model": "ltxv", "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                      "cross_attention_dim": 32, "caption_channels": 32, "in_channels": 128}),
    "hidream": ("HiDream", {"image_model": "hidream", "attention_head_dim": 16, "axes_dims_rope": [8, 4, 4],
                            "caption_channels": [32, 32], "max_resolution": [16, 16], "in_channels": 16,
                            "llama_layers": [0, 1, 2, 3, 3], "num_attention_heads": 2, "num_routed_experts": 4,
                            "num_activated_experts": 2, "num_layers": 2, "num_single_layers": 2, "out_channels": 16,
                            "patch_size": 2, "text_emb_dim": 32}),
    "lumina2": ("Lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 32,
                            "cap_feat_dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                            "qk_norm": True, "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512],
                            "multiple_of": 16}),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
                          "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
                          "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True,
                          "in_dim": 64, "out_dim": 32, "hidden_dim": 64, "n_layers": 2}),
    # The Refiner's real layout (levels 1,2,4,4; transformers only in the middle two levels) at 32 channels and one
    # transformer per level (the real one has four).
    "sdxl_refiner": ("SDXLRefiner", {"use_checkpoint": False, "image_size": 32, "out_channels": 4,
                                     "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
                                     "adm_in_channels": 2560, "dtype": torch.float32, "in_channels": 4,
                                     "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
                                     "transformer_depth": [0, 0, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                                     "transformer_depth_middle": 1, "use_linear_in_transformer": True,
                                     "context_dim": 48, "num_head_channels": 16, "num_heads": -1,
                                     "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                                     "use_temporal_attention": False, "use_temporal_resblock": False}),
}

_CLIP_G = dict(_SMALL_CLIP, hidden_act="gelu", hidden_size=48, intermediate_size=96, num_hidden_layers=3)
_CLIP_L = _SMALL_CLIP


def _t5_encoder():
    import comfy.text_encoders.t5

    return (_SMALL_T5, {"model_class": comfy.text_encoders.t5.T5, "special_tokens": {"end": 1, "pad": 0}})


def _encoders(family: str) -> dict | None:
    """The small text encoders named as the family's real ones, or None where they are not built (see above)."""
    if family == "sd3":
        return {"clip_l": (_CLIP_L, {"layer": "hidden", "layer_idx": -2, "layer_norm_hidden_state": False,
                                     "return_projected_pooled": False}),
                "clip_g": (_CLIP_G, {"layer": "hidden", "layer_idx": -2, "layer_norm_hidden_state": False}),
                "t5xxl": _t5_encoder()}
    if family == "sdxl_refiner":
        return {"clip_g": (_CLIP_G, {"layer": "hidden", "layer_idx": -2, "layer_norm_hidden_state": False})}
    if family in ("chroma", "ltxv"):
        return {"t5xxl": _t5_encoder()}
    return None


def _unet_key_map(model) -> dict:
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})


def build(family: str) -> HostModel:
    """Builds one family's tiny model (uncached: use the lru-cached ``FAMILY_BUILDERS`` in tests)."""
    import_comfy()
    import comfy.supported_models

    started = time.perf_counter()
    class_name, unet = UNET_CONFIGS[family]
    config = getattr(comfy.supported_models, class_name)(dict(unet))
    with torch.device("cpu"):
        module = config.get_model({})
    model = _patcher(module.to(torch.float32))
    encoders = _encoders(family)
    clip = _clip(encoders, None) if encoders else None
    key_map = _key_map(model, clip) if clip is not None else _unet_key_map(model)
    BUILD_SECONDS[family] = time.perf_counter() - started
    return HostModel(family, model, clip, key_map)


def _cached(family: str) -> Callable[[], HostModel]:
    @lru_cache(maxsize=None)
    def builder() -> HostModel:
        return build(family)

    builder.__name__ = f"tiny_{family}"
    return builder


FAMILY_BUILDERS: dict[str, Callable[[], HostModel]] = {family: _cached(family) for family in UNET_CONFIGS}


def host_state(host: HostModel) -> dict[str, torch.Tensor]:
    """Every tensor the host would patch: diffusion model (``diffusion_model.``) and, where built, the encoders."""
    state = dict(host.model.model.state_dict())
    if host.clip is not None:
        state.update(host.clip.cond_stage_model.state_dict())
    return state

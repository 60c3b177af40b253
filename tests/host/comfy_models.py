"""Small but structurally real ComfyUI models (SDXL, SD1.5, Flux) with their real LoRA key names.

Widths are shrunk; the block structure (levels, res blocks, transformer depths, encoder layer
names) is the real one, so ComfyUI's own key maps (comfy.lora) are the real maps. No weight files.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from functools import lru_cache

import torch
from safetensors.torch import save_file

DEFAULT_COMFYUI = os.path.expanduser("~/.cache/comfyui-lora-resize/ComfyUI")


def comfyui_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parent = os.path.dirname(os.path.dirname(here))  # the pack sitting in ComfyUI/custom_nodes/
    for candidate in (path, parent):
        if candidate and os.path.isfile(os.path.join(candidate, "comfy", "lora.py")):
            return candidate
    return None


def import_comfy() -> None:
    if "comfy.model_patcher" in sys.modules:
        return  # inside a running ComfyUI (the server tests' test-only nodes)
    path = comfyui_path()
    if path is None:
        raise ImportError("ComfyUI not found")
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: the tests never need a GPU


def import_custom_node(name: str, folder: str):
    """A node-pack folder imported as ComfyUI imports it: a package named ``name`` with relative imports."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclasses.dataclass
class HostModel:
    arch: str
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    key_map: dict  # LoRA key prefix -> model key (or (key, offset[, fn]))


_SMALL_CLIP = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
               "num_hidden_layers": 3, "max_position_embeddings": 77, "projection_dim": 32, "vocab_size": 49408,
               "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
               "model_type": "clip_text_model", "architectures": ["CLIPTextModel"]}
_SMALL_T5 = {"d_ff": 64, "d_kv": 8, "d_model": 32, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
             "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 4, "num_layers": 2,
             "relative_attention_num_buckets": 32, "vocab_size": 32128, "pad_token_id": 0, "eos_token_id": 1}


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI builds layers uninitialised (torch.empty): give every parameter seeded values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=g) / fan_in ** 0.5)
    return module


def _patcher(module):
    import comfy.model_patcher

    _seeded(module, 0)

    return comfy.model_patcher.ModelPatcher(module, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def _clip(encoders: dict, tokenizer):
    """A comfy.sd.CLIP around small encoders named like the real ones (clip_l, clip_g, t5xxl)."""
    import comfy.sd
    import comfy.sd1_clip

    class SmallClipModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (config, kwargs) in encoders.items():
                setattr(self, name, comfy.sd1_clip.SDClipModel(textmodel_json_config=config,
                                                               model_options={"model_name": name}, **kwargs))
            self.dtypes = {torch.float32}

    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = SmallClipModel()
    clip.tokenizer = tokenizer
    clip.patcher = _patcher(clip.cond_stage_model)
    clip.layer_idx = None
    clip.use_clip_schedule = False
    clip.apply_hooks_to_conds = None
    clip.tokenizer_options = {}
    return clip


def _key_map(model, clip) -> dict:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)


def _unet_model(config_cls, unet_config: dict, head_channels: int):
    config = config_cls(unet_config)
    config.unet_config["num_head_channels"] = head_channels
    config.unet_config.pop("num_heads", None) if head_channels != -1 else None
    config.unet_config["num_heads"] = -1 if head_channels != -1 else 4
    with torch.device("cpu"):
        model = config.get_model({})
    return _patcher(model.to(torch.float32))


@lru_cache(maxsize=None)
def tiny_sdxl() -> HostModel:
    import_comfy()
    import comfy.supported_models

    unet = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float32,
            "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2],
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_attention": False, "use_temporal_resblock": False}
    model = _unet_model(comfy.supported_models.SDXL, unet, head_channels=16)
    big_g = dict(_SMALL_CLIP, hidden_act="gelu", hidden_size=48, intermediate_size=96, num_hidden_layers=4)
    clip = _clip({"clip_l": (_SMALL_CLIP, {"layer": "hidden", "layer_idx": -2, "layer_norm_hidden_state": False}),
                  "clip_g": (big_g, {"layer": "hidden", "layer_idx": -2, "layer_norm_hidden_state": False})}, None)
    return HostModel("sdxl", model, clip, _key_map(model, clip))


@lru_cache(maxsize=None)
def tiny_sd15() -> HostModel:
    import_comfy()
    import comfy.supported_models

    unet = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4, "model_channels": 32,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # popped from the end
            "use_temporal_attention": False, "use_temporal_resblock": False}
    model = _unet_model(comfy.supported_models.SD15, unet, head_channels=16)
    clip = _clip({"clip_l": (_SMALL_CLIP, {})}, None)
    return HostModel("sd15", model, clip, _key_map(model, clip))


@lru_cache(maxsize=None)
def tiny_flux() -> HostModel:
    import_comfy()
    import comfy.supported_models
    import comfy.text_encoders.t5

    unet = {"image_model": "flux", "in_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
            "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2, "out_channels": 16}
    config = comfy.supported_models.Flux(unet)
    with torch.device("cpu"):
        flux = config.get_model({})
    model = _patcher(flux.to(torch.float32))
    clip = _clip({"clip_l": (_SMALL_CLIP, {"return_projected_pooled": False}),
                  "t5xxl": (_SMALL_T5, {"model_class": comfy.text_encoders.t5.T5,
                                        "special_tokens": {"end": 1, "pad": 0}})}, None)
    return HostModel("flux", model, clip, _key_map(model, clip))


def random_lora(host, rank=4, seed=0, every=7, up_scale=0.1, decay=1.0):
    """A kohya LoRA for the host model: every n-th linear/conv weight the host key map names.
    ``decay`` < 1 gives its directions a geometrically falling spectrum, as trained LoRAs have."""
    g = torch.Generator().manual_seed(seed)
    state = dict(host.model.model.state_dict())
    state.update(host.clip.cond_stage_model.state_dict())
    tensors = {}
    names = sorted(k for k, v in host.key_map.items()
                   if isinstance(v, str) and k.startswith(("lora_unet_", "lora_te1_", "lora_te2_"))
                   and v in state and state[v].dim() >= 2)
    seen = set()
    for prefix in names[::every]:
        if host.key_map[prefix] in seen:
            continue  # the key map names a weight several ways (SGM and diffusers): use one
        seen.add(host.key_map[prefix])
        weight = state[host.key_map[prefix]]
        out, inp = weight.shape[0], weight[0].numel()
        up = torch.randn(out, rank, generator=g) * up_scale * decay ** torch.arange(rank)
        down = torch.randn(rank, inp, generator=g)
        if weight.dim() == 4:
            up, down = up[:, :, None, None], down.reshape(rank, *weight.shape[1:])
        tensors[f"{prefix}.lora_up.weight"] = up.half()
        tensors[f"{prefix}.lora_down.weight"] = down.half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank) / 2).half()
    return tensors


def checkpoint_from_host(host, path):
    """The host's weights as an SGM single-file checkpoint, with CLIP-G in OpenCLIP layout (q,k,v fused)."""
    tensors = {}
    for key, value in host.model.model.state_dict().items():
        tensors["model." + key] = value.contiguous()
    clip_state = host.clip.cond_stage_model.state_dict()
    layers = {}
    for key, value in clip_state.items():
        if key.startswith("clip_l.transformer."):
            tensors["conditioner.embedders.0.transformer." + key[len("clip_l.transformer."):]] = value.contiguous()
        elif key.startswith("clip_g.transformer.text_model.encoder.layers.") and key.endswith(".weight"):
            rest = key[len("clip_g.transformer.text_model.encoder.layers."):]
            index, _, module = rest.partition(".")
            layers.setdefault(int(index), {})[module] = value
    for index, modules in layers.items():
        root = f"conditioner.embedders.1.model.transformer.resblocks.{index}."
        tensors[root + "attn.in_proj_weight"] = torch.cat([modules[f"self_attn.{p}_proj.weight"] for p in "qkv"])
        tensors[root + "attn.out_proj.weight"] = modules["self_attn.out_proj.weight"].contiguous()
        tensors[root + "mlp.c_fc.weight"] = modules["mlp.fc1.weight"].contiguous()
        tensors[root + "mlp.c_proj.weight"] = modules["mlp.fc2.weight"].contiguous()
    save_file(tensors, str(path))


BUILDERS = {"sdxl": tiny_sdxl, "sd15": tiny_sd15, "flux": tiny_flux}

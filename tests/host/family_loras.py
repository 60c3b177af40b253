"""LoRA state dicts with the key names each family's trainers really write, shaped from the tiny family models.

One ``Convention`` per (family, trainer key style). Its writer walks the tiny model's weights (tests/host/
family_models.py), keeps the modules that trainer targets, and names them as that trainer does; factor shapes
come from the model's weight (or, for a fused qkv the host splits, from the host's slice), so the host loads
them. Seeded: the same call gives the same tensors.

Where each name comes from (trainer source, read with the code search; repo/path):
- musubi-tuner (kohya-ss/musubi-tuner): src/musubi_tuner/networks/lora.py names a module
  ``prefix + "." + name + "." + child_name`` with ``.`` -> ``_`` and prefix ``lora_unet``; lora_wan.py targets
  ``WanAttentionBlock`` and excludes ``patch_embedding|text_embedding|time_embedding|time_projection|norm|head``;
  lora_qwen_image.py targets ``QwenImageTransformerBlock`` and excludes ``_mod_`` by default; the HunyuanVideo
  network excludes ``img_mod|txt_mod|modulation``. src/musubi_tuner/convert_lora.py ``--target other`` writes
  ``diffusion_model.<module>.lora_A/B.weight`` with alpha folded into both factors (sqrt each) and no alpha key.
- ai-toolkit / ComfyUI native: ``diffusion_model.<comfy module path>.lora_A/B.weight``, no alpha
  (ComfyUI comfy/lora.py model_lora_keys_unet's generic rule; docs/reference lora_key_conventions.md).
- diffusion-pipe (HunyuanVideo): ``transformer.<original module path>.lora_A/B.weight``: ComfyUI's own
  "diffusion-pipe lora format" branch renames ``_mod.lin.``->``_mod.linear.``, ``_attn.qkv.``->``_attn_qkv.``,
  ``mlp.0.``->``mlp.fc1.`` for exactly this trainer.
- diffusers/PEFT: ``transformer.<diffusers module path>.lora_A/B.weight``; SD3/Chroma names from the host's
  ``mmdit_to_diffusers`` / ``flux_to_diffusers`` tables (the diffusers names by construction), Wan/Lumina 2/LTX
  with diffusers' own module names (``attn1.to_q``, ``ffn.net.0.proj`` ...; PyPI diffusers is not installed in
  the test venv, so these are not produced by diffusers itself here).
- OneTrainer SD3: ``lora_transformer_<diffusers path with _>``; SimpleTuner: ``lycoris_<path with _>`` and
  ``transformer.<path>`` (HiDream, Qwen-Image); DiffSynth Qwen-Image: ``<path>.lora_A.default.weight`` (PEFT's
  adapter name left in); Qwen-Image Lightning: bare ``transformer_blocks.N...lora_down/lora_up/alpha``.
- kohya sd-scripts: SD3 ``lora_unet_joint_blocks_N_x_block_attn_qkv`` + ``lora_te1_``/``lora_te2_``/``lora_te3_``
  (CLIP-L, CLIP-G, T5); Lumina 2 ``lora_unet_layers_N_attention_qkv`` (fused qkv); Chroma as Flux
  ``lora_unet_double_blocks_N_img_attn_qkv``; SDXL-family UNet in diffusers block names
  (``lora_unet_down_blocks_1_attentions_0_...``) and the Refiner's CLIP-G as ``lora_te_``.
- lightx2v distill LoRAs (Wan): ``diffusion_model.blocks.N.<module>.lora_down/lora_up.weight`` without alpha,
  plus full diffs the host applies (key lists in kijai/ComfyUI-WanVideoWrapper #940, #1862): ``.diff_b`` on
  linear biases, ``norm3.diff``/``norm3.diff_b``, ``self_attn.norm_q.diff``, ``cross_attn.norm_k_img.diff``
  (I2V), ``modulation.diff`` and ``head.head.diff_b``.
  Their ``diff_m`` keys are not loaded by ComfyUI 0.3.64 ("lora key not loaded", kijai/ComfyUI-WanVideoWrapper
  #807), so they are not written here.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterable

import torch

from tests.host.comfy_models import HostModel
from tests.host.family_models import FAMILY_BUILDERS, host_state

RANK = 4
ALPHA = 2.0

Target = tuple[str, str]  # (LoRA key prefix, diffusion-model path without "diffusion_model." and ".weight")


@dataclasses.dataclass(frozen=True)
class Convention:
    family: str
    name: str
    trainer: str  # who writes this key style (source cited in the module docstring)
    example: str  # one key it writes
    write: Callable[[HostModel, int], dict]
    host_loads: bool = True  # False: ComfyUI 0.3.64 itself refuses these keys (documented, asserted as such)


# ---------------------------------------------------------------------------------------------------------------
# factors


def _pair(shape: tuple[int, ...], rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of ``shape`` (linear or conv), up small so ΔW is a plausible trained update."""
    out, inp = shape[0], int(torch.Size(shape[1:]).numel())
    down = torch.randn(rank, inp, generator=g) / inp ** 0.5
    up = torch.randn(out, rank, generator=g) * 0.1
    if len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up[:, :, None, None]
    return down, up


def _target_shape(state: dict, target) -> tuple[int, ...]:
    """Shape of what a key-map target patches: a weight, or the (dim, start, length) slice of a fused one."""
    if isinstance(target, str):
        return tuple(state[target].shape)
    key, offset = target[0], target[1]
    shape = list(state[key].shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    return tuple(shape)


def _kohya(prefix: str, down, up, dtype=torch.float16) -> dict:
    return {f"{prefix}.lora_down.weight": down.to(dtype), f"{prefix}.lora_up.weight": up.to(dtype),
            f"{prefix}.alpha": torch.tensor(ALPHA).to(dtype)}


def _peft(prefix: str, down, up, dtype=torch.float16, adapter: str = "") -> dict:
    adapter = f".{adapter}" if adapter else ""
    return {f"{prefix}.lora_A{adapter}.weight": down.to(dtype), f"{prefix}.lora_B{adapter}.weight": up.to(dtype)}


def _write(host: HostModel, seed: int, targets: Iterable[tuple[str, object]], style: str,
           dtype=torch.float16) -> dict:
    """Factors for (LoRA prefix, key-map target) pairs in one key style: kohya | kohya_noalpha | peft |
    peft_default."""
    g = torch.Generator().manual_seed(seed)
    state = host_state(host)
    tensors: dict = {}
    for prefix, target in targets:
        down, up = _pair(_target_shape(state, target), RANK, g)
        if style == "kohya":
            tensors.update(_kohya(prefix, down, up, dtype))
        elif style == "kohya_noalpha":
            tensors.update({k: v for k, v in _kohya(prefix, down, up, dtype).items() if not k.endswith(".alpha")})
        elif style == "peft":
            tensors.update(_peft(prefix, down, up, dtype))
        elif style == "peft_default":
            tensors.update(_peft(prefix, down, up, dtype, adapter="default"))
        else:
            raise ValueError(style)
    return tensors


def _model_paths(host: HostModel, keep: Callable[[str], bool], dims: tuple[int, ...] = (2,)) -> list[str]:
    """Diffusion-model module paths (no prefix, no .weight) of the weights a trainer targets."""
    paths = []
    for key, value in sorted(host.model.model.state_dict().items()):
        if key.startswith("diffusion_model.") and key.endswith(".weight") and value.dim() in dims:
            path = key[len("diffusion_model."):-len(".weight")]
            if keep(path):
                paths.append(path)
    return paths


def _via_map(host: HostModel, names: Iterable[tuple[str, str]]) -> list[tuple[str, object]]:
    """(LoRA prefix, host target) for trainer names; a name the host does not map targets the weight it names."""
    out = []
    for prefix, path in names:
        out.append((prefix, host.key_map.get(prefix, f"diffusion_model.{path}.weight")))
    return out


def _map_entries(host: HostModel, start: str, keep: Callable[[str], bool] = lambda k: True) -> list:
    """Key-map entries under a prefix (diffusers tables the host ships) whose target exists in the model."""
    state = host_state(host)
    out = []
    for prefix, target in sorted(host.key_map.items()):
        key = target if isinstance(target, str) else target[0]
        if prefix.startswith(start) and key in state and state[key].dim() >= 2 and keep(prefix):
            out.append((prefix, target))
    return out


def _underscore(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


# ---------------------------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2

_WAN_MUSUBI_EXCLUDE = re.compile(r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*")


def _wan_paths(host: HostModel) -> list[str]:
    """musubi's Wan target set: every Linear inside a WanAttentionBlock, norms excluded."""
    return _model_paths(host, lambda p: p.startswith("blocks.") and not _WAN_MUSUBI_EXCLUDE.fullmatch(p))


def wan_musubi(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(_underscore("lora_unet_", p), p) for p in _wan_paths(host)]), "kohya",
                  torch.bfloat16)


def wan_comfy(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(f"diffusion_model.{p}", p) for p in _wan_paths(host)]), "peft",
                  torch.bfloat16)


_WAN_DIFFUSERS = [("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
                  ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
                  ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"),
                  ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
                  ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")]


def wan_diffusers(host: HostModel, seed: int = 0) -> dict:
    """diffusers' WanTransformer3DModel names: ComfyUI 0.3.64 maps none of them (comfyanonymous refused new
    diffusers-key formats, Comfy-Org/ComfyUI#6673)."""
    names = []
    for path in _wan_paths(host):
        block, _, module = path.partition(".")[2].partition(".")
        renamed = dict(_WAN_DIFFUSERS)[module]
        names.append((f"transformer.blocks.{block}.{renamed}", path))
    return _write(host, seed, _via_map(host, names), "peft", torch.bfloat16)


def wan_lightx2v(host: HostModel, seed: int = 0) -> dict:
    """lightx2v distill LoRA: kohya factors (no alpha) under ``diffusion_model.`` plus the host-applied diffs."""
    paths = _wan_paths(host) + _model_paths(host, lambda p: p == "head.head")
    tensors = _write(host, seed, _via_map(host, [(f"diffusion_model.{p}", p) for p in paths]), "kohya_noalpha",
                     torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    state = host.model.model.state_dict()
    for key in sorted(state):
        path = key[len("diffusion_model."):]
        extra = None
        if path.endswith(".bias") and path[:-len(".bias")] in paths:
            extra = f"diffusion_model.{path[:-len('.bias')]}.diff_b"
        elif re.fullmatch(r"blocks\.\d+\.norm3\.weight", path) or re.fullmatch(
                r"blocks\.\d+\.(self_attn|cross_attn)\.norm_(q|k|k_img)\.weight", path):
            extra = f"diffusion_model.{path[:-len('.weight')]}.diff"
        elif re.fullmatch(r"blocks\.\d+\.norm3\.bias", path):
            extra = f"diffusion_model.{path[:-len('.bias')]}.diff_b"
        elif re.fullmatch(r"blocks\.\d+\.modulation", path):
            extra = f"diffusion_model.{path}.diff"
        if extra:
            tensors[extra] = (torch.randn(state[key].shape, generator=g) * 1e-3).to(torch.bfloat16)
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Qwen-Image


def _qwen_paths(host: HostModel, with_mod: bool) -> list[str]:
    return _model_paths(host, lambda p: p.startswith("transformer_blocks.") and (with_mod or "_mod." not in p))


def qwen_musubi(host: HostModel, seed: int = 0) -> dict:
    """musubi excludes ``_mod_`` (img_mod/txt_mod) by default."""
    names = [(_underscore("lora_unet_", p), p) for p in _qwen_paths(host, with_mod=False)]
    return _write(host, seed, _via_map(host, names), "kohya", torch.bfloat16)


def qwen_comfy(host: HostModel, seed: int = 0) -> dict:
    names = [(f"diffusion_model.{p}", p) for p in _qwen_paths(host, with_mod=True)]
    return _write(host, seed, _via_map(host, names), "peft", torch.bfloat16)


def qwen_diffusers(host: HostModel, seed: int = 0) -> dict:
    names = [(f"transformer.{p}", p) for p in _qwen_paths(host, with_mod=True)]
    return _write(host, seed, _via_map(host, names), "peft", torch.bfloat16)


def qwen_lightning(host: HostModel, seed: int = 0) -> dict:
    """Qwen-Image-Lightning style: bare diffusers paths with kohya factor names and alpha."""
    names = [(p, p) for p in _qwen_paths(host, with_mod=True)]
    return _write(host, seed, _via_map(host, names), "kohya", torch.bfloat16)


def qwen_diffsynth(host: HostModel, seed: int = 0) -> dict:
    """DiffSynth-Studio: bare paths, PEFT factors with the adapter name ``default`` left in."""
    names = [(p, p) for p in _qwen_paths(host, with_mod=False)]
    return _write(host, seed, _via_map(host, names), "peft_default", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# SD3 / 3.5 (MMDiT)


def _sd3_paths(host: HostModel) -> list[str]:
    return _model_paths(host, lambda p: p.startswith("joint_blocks."))


def _te_names(host: HostModel, prefixes: tuple[str, ...]) -> list[tuple[str, object]]:
    """Text-encoder targets the host maps under kohya prefixes (attention and MLP linears, T5's projections)."""
    return _map_entries(host, prefixes, lambda k: not k.endswith(("text_projection", "shared"))
                        and "relative_attention_bias" not in k and "final_layer_norm" not in k)


def sd3_kohya(host: HostModel, seed: int = 0) -> dict:
    """sd-scripts SD3: MMDiT under lora_unet_ with original names, CLIP-L/G/T5 as lora_te1_/te2_/te3_."""
    names = _via_map(host, [(_underscore("lora_unet_", p), p) for p in _sd3_paths(host)])
    names += _te_names(host, ("lora_te1_text_model_", "lora_te2_text_model_", "lora_te3_encoder_"))
    return _write(host, seed, names, "kohya")


def sd3_kohya_unet(host: HostModel, seed: int = 0) -> dict:
    names = _via_map(host, [(_underscore("lora_unet_", p), p) for p in _sd3_paths(host)])
    return _write(host, seed, names, "kohya")


def sd3_diffusers(host: HostModel, seed: int = 0) -> dict:
    """diffusers SD3 LoRA: ``transformer.transformer_blocks.N.attn.to_q`` ... (to_q/k/v are slices of qkv)."""
    names = _map_entries(host, "transformer.transformer_blocks.", lambda k: ".norm1" not in k)
    return _write(host, seed, names, "peft")


def sd3_onetrainer(host: HostModel, seed: int = 0) -> dict:
    names = _map_entries(host, "lora_transformer_transformer_blocks_", lambda k: "_norm1" not in k)
    return _write(host, seed, names, "kohya")


# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo

_HV_ORIGINAL = [("_mod.lin", "_mod.linear"), ("_attn.qkv", "_attn_qkv"), ("_attn.proj", "_attn_proj"),
                ("mlp.0", "mlp.fc1"), ("mlp.2", "mlp.fc2"), (".modulation.lin", ".modulation.linear")]


def _hv_original(path: str) -> str:
    """ComfyUI's HunyuanVideo path -> the original Tencent/diffusion-pipe/musubi module path."""
    for comfy_name, original in _HV_ORIGINAL:
        path = path.replace(comfy_name, original)
    return path


def _hv_paths(host: HostModel, with_mod: bool = True) -> list[str]:
    return _model_paths(host, lambda p: p.startswith(("double_blocks.", "single_blocks."))
                        and (with_mod or not re.search(r"(img_mod|txt_mod|modulation)", p)))


def hv_diffusion_pipe(host: HostModel, seed: int = 0) -> dict:
    names = [(f"transformer.{_hv_original(p)}", p) for p in _hv_paths(host)]
    return _write(host, seed, _via_map(host, names), "peft", torch.bfloat16)


def hv_musubi_converted(host: HostModel, seed: int = 0) -> dict:
    """musubi convert_lora.py --target other: ``diffusion_model.`` + original path, lora_A/B, no alpha."""
    names = [(f"diffusion_model.{_hv_original(p)}", p) for p in _hv_paths(host, with_mod=False)]
    return _write(host, seed, _via_map(host, names), "peft", torch.bfloat16)


def hv_musubi(host: HostModel, seed: int = 0) -> dict:
    """musubi's own format: ``lora_unet_`` + original path with ``_``; the MLP's ``fc1``/``fc2`` are not ComfyUI's
    ``0``/``2``, so the host leaves those keys unloaded (musubi's docs say: convert with --target other)."""
    names = [(_underscore("lora_unet_", _hv_original(p)), p) for p in _hv_paths(host, with_mod=False)]
    return _write(host, seed, _via_map(host, names), "kohya", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# LTX-Video


def _ltx_paths(host: HostModel) -> list[str]:
    return _model_paths(host, lambda p: p.startswith("transformer_blocks."))


def ltxv_comfy(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(f"diffusion_model.{p}", p) for p in _ltx_paths(host)]), "peft",
                  torch.bfloat16)


def ltxv_diffusers(host: HostModel, seed: int = 0) -> dict:
    """diffusers LTXVideoTransformer3DModel names under ``transformer.``: ComfyUI 0.3.64 has no LTXV branch."""
    return _write(host, seed, _via_map(host, [(f"transformer.{p}", p) for p in _ltx_paths(host)]), "peft",
                  torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# HiDream


def _hidream_paths(host: HostModel) -> list[str]:
    return _model_paths(host, lambda p: p.startswith(("double_stream_blocks.", "single_stream_blocks."))
                        and ".gate" not in p)


def hidream_simpletuner(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(f"transformer.{p}", p) for p in _hidream_paths(host)]), "peft",
                  torch.bfloat16)


def hidream_lycoris(host: HostModel, seed: int = 0) -> dict:
    names = [(_underscore("lycoris_", p), p) for p in _hidream_paths(host)]
    return _write(host, seed, _via_map(host, names), "kohya", torch.bfloat16)


def hidream_comfy(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(f"diffusion_model.{p}", p) for p in _hidream_paths(host)]), "peft",
                  torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Lumina 2


def _lumina_paths(host: HostModel) -> list[str]:
    return _model_paths(host, lambda p: p.startswith(("layers.", "noise_refiner.", "context_refiner."))
                        and "adaLN" not in p)


def lumina_kohya(host: HostModel, seed: int = 0) -> dict:
    names = [(_underscore("lora_unet_", p), p) for p in _lumina_paths(host)]
    return _write(host, seed, _via_map(host, names), "kohya", torch.bfloat16)


def lumina_comfy(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(f"diffusion_model.{p}", p) for p in _lumina_paths(host)]), "peft",
                  torch.bfloat16)


def lumina_diffusers(host: HostModel, seed: int = 0) -> dict:
    """diffusers Lumina2Transformer2DModel splits qkv into ``attn.to_q/to_k/to_v``; 0.3.64 maps none of it."""
    state = host.model.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path in _model_paths(host, lambda p: p.startswith("layers.") and p.endswith("attention.qkv")):
        block = path.split(".")[1]
        rows = state[f"diffusion_model.{path}.weight"].shape[0]
        dim = state[f"diffusion_model.{path}.weight"].shape[1]
        for name, out in (("to_q", dim), ("to_k", (rows - dim) // 2), ("to_v", (rows - dim) // 2)):
            down, up = _pair((out, dim), RANK, g)
            tensors.update(_peft(f"transformer.layers.{block}.attn.{name}", down, up, torch.bfloat16))
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Chroma


def _chroma_paths(host: HostModel) -> list[str]:
    return _model_paths(host, lambda p: p.startswith(("double_blocks.", "single_blocks.")))


def chroma_kohya(host: HostModel, seed: int = 0) -> dict:
    names = [(_underscore("lora_unet_", p), p) for p in _chroma_paths(host)]
    return _write(host, seed, _via_map(host, names), "kohya", torch.bfloat16)


def chroma_kohya_t5(host: HostModel, seed: int = 0) -> dict:
    """sd-scripts' Flux network on Chroma with the text encoder trained: T5 as ``lora_te1_encoder_...`` (ComfyUI
    numbers T5 first when the model has no CLIP-L), no distilled_guidance_layer: nothing but the T5 says Chroma."""
    names = [(_underscore("lora_unet_", p), p) for p in _chroma_paths(host)]
    return _write(host, seed, _via_map(host, names) + _te_names(host, ("lora_te1_encoder_",)), "kohya",
                  torch.bfloat16)


def chroma_comfy(host: HostModel, seed: int = 0) -> dict:
    return _write(host, seed, _via_map(host, [(f"diffusion_model.{p}", p) for p in _chroma_paths(host)]), "peft",
                  torch.bfloat16)


def chroma_diffusers(host: HostModel, seed: int = 0) -> dict:
    """diffusers/ai-toolkit Chroma names (Flux's diffusers names without the norm1 modulation Chroma lacks)."""
    names = _map_entries(host, ("transformer.transformer_blocks.", "transformer.single_transformer_blocks."))
    return _write(host, seed, names, "peft", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# SDXL Refiner


def refiner_kohya(host: HostModel, seed: int = 0) -> dict:
    """sd-scripts names (diffusers block names under lora_unet_): attentions, resnets, upsamplers; CLIP-G as
    ``lora_te_`` (the Refiner has no CLIP-L)."""
    keep = re.compile(r"lora_unet_(down_blocks|mid_block|up_blocks)_\d+_(attentions_\d+_(proj_in|proj_out|"
                      r"transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2))|"
                      r"resnets_\d+_conv[12]|upsamplers_0_conv|downsamplers_0_conv)$")
    names = _map_entries(host, "lora_unet_", lambda k: bool(keep.match(k)))
    names += _te_names(host, ("lora_te_text_model_",))
    return _write(host, seed, names, "kohya")


def refiner_sgm(host: HostModel, seed: int = 0) -> dict:
    """The generic ComfyUI rule on SGM names (``lora_unet_input_blocks_4_1_...``), as ComfyUI-made LoRAs have."""
    paths = _model_paths(host, lambda p: re.search(r"(transformer_blocks\.\d+\.(attn[12]|ff)|proj_in|proj_out)", p)
                         is not None)
    return _write(host, seed, _via_map(host, [(_underscore("lora_unet_", p), p) for p in paths]), "kohya")


# ---------------------------------------------------------------------------------------------------------------

CONVENTIONS: list[Convention] = [
    Convention("wan21_t2v", "musubi", "musubi-tuner lora_wan", "lora_unet_blocks_0_self_attn_q.lora_down.weight",
               wan_musubi),
    Convention("wan21_t2v", "comfy", "ai-toolkit / ComfyUI", "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
               wan_comfy),
    Convention("wan21_t2v", "lightx2v", "lightx2v distill", "diffusion_model.blocks.0.modulation.diff",
               wan_lightx2v),
    Convention("wan21_t2v", "diffusers", "diffusers/PEFT", "transformer.blocks.0.attn1.to_q.lora_A.weight",
               wan_diffusers, host_loads=False),
    Convention("wan21_i2v", "musubi", "musubi-tuner lora_wan", "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight",
               wan_musubi),
    Convention("wan21_i2v", "comfy", "ai-toolkit / ComfyUI", "diffusion_model.blocks.0.cross_attn.v_img.lora_A.weight",
               wan_comfy),
    Convention("wan21_i2v", "lightx2v", "lightx2v distill", "diffusion_model.blocks.0.cross_attn.norm_k_img.diff",
               wan_lightx2v),
    Convention("wan22_ti2v_5b", "musubi", "musubi-tuner lora_wan", "lora_unet_blocks_1_ffn_2.lora_up.weight",
               wan_musubi),
    Convention("wan22_ti2v_5b", "comfy", "ai-toolkit / ComfyUI", "diffusion_model.blocks.1.ffn.0.lora_B.weight",
               wan_comfy),
    Convention("qwen_image", "musubi", "musubi-tuner lora_qwen_image",
               "lora_unet_transformer_blocks_0_attn_add_k_proj.lora_down.weight", qwen_musubi),
    Convention("qwen_image", "comfy", "ai-toolkit / ComfyUI",
               "diffusion_model.transformer_blocks.0.img_mod.1.lora_A.weight", qwen_comfy),
    Convention("qwen_image", "diffusers", "diffusers/PEFT, SimpleTuner",
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", qwen_diffusers),
    Convention("qwen_image", "lightning", "Qwen-Image-Lightning (bare kohya)",
               "transformer_blocks.0.attn.to_out.0.lora_down.weight", qwen_lightning),
    Convention("qwen_image", "diffsynth", "DiffSynth-Studio",
               "transformer_blocks.0.attn.to_q.lora_A.default.weight", qwen_diffsynth),
    Convention("sd3", "kohya", "kohya sd-scripts lora_sd3 (with CLIP-L/G/T5)",
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", sd3_kohya),
    Convention("sd3", "kohya_unet", "kohya sd-scripts lora_sd3 (MMDiT only)",
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", sd3_kohya_unet),
    Convention("sd3", "diffusers", "diffusers/PEFT", "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
               sd3_diffusers),
    Convention("sd3", "onetrainer", "OneTrainer",
               "lora_transformer_transformer_blocks_0_attn_add_q_proj.lora_down.weight", sd3_onetrainer),
    Convention("hunyuan_video", "diffusion_pipe", "diffusion-pipe",
               "transformer.double_blocks.0.img_mod.linear.lora_A.weight", hv_diffusion_pipe),
    Convention("hunyuan_video", "musubi_converted", "musubi-tuner convert_lora.py --target other",
               "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight", hv_musubi_converted),
    Convention("hunyuan_video", "musubi", "musubi-tuner (native)",
               "lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight", hv_musubi, host_loads=False),
    Convention("ltxv", "comfy", "LTX-Video-Trainer (ComfyUI export) / ai-toolkit",
               "diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight", ltxv_comfy),
    Convention("ltxv", "diffusers", "diffusers/PEFT", "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
               ltxv_diffusers, host_loads=False),
    Convention("hidream", "simpletuner", "SimpleTuner (PEFT)",
               "transformer.double_stream_blocks.0.block.ff_i.experts.0.w1.lora_A.weight", hidream_simpletuner),
    Convention("hidream", "lycoris", "SimpleTuner LyCORIS",
               "lycoris_double_stream_blocks_0_block_attn1_to_q_t.lora_down.weight", hidream_lycoris),
    Convention("hidream", "comfy", "ai-toolkit / ComfyUI",
               "diffusion_model.single_stream_blocks.0.block.attn1.to_out.lora_A.weight", hidream_comfy),
    Convention("lumina2", "kohya", "kohya sd-scripts lora_lumina", "lora_unet_layers_0_attention_qkv.lora_down.weight",
               lumina_kohya),
    Convention("lumina2", "comfy", "ai-toolkit / ComfyUI", "diffusion_model.layers.0.feed_forward.w3.lora_A.weight",
               lumina_comfy),
    Convention("lumina2", "diffusers", "diffusers/PEFT", "transformer.layers.0.attn.to_k.lora_A.weight",
               lumina_diffusers, host_loads=False),
    Convention("chroma", "kohya", "kohya sd-scripts (Chroma as Flux)",
               "lora_unet_single_blocks_0_linear1.lora_down.weight", chroma_kohya),
    Convention("chroma", "kohya_t5", "kohya sd-scripts (Chroma as Flux, T5 as lora_te1_)",
               "lora_te1_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight", chroma_kohya_t5),
    Convention("chroma", "comfy", "ai-toolkit / ComfyUI", "diffusion_model.double_blocks.0.txt_mlp.2.lora_A.weight",
               chroma_comfy),
    Convention("chroma", "diffusers", "diffusers/PEFT",
               "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", chroma_diffusers),
    Convention("sdxl_refiner", "kohya", "kohya sd-scripts (diffusers block names, CLIP-G as lora_te_)",
               "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight", refiner_kohya),
    Convention("sdxl_refiner", "sgm", "ComfyUI generic (SGM names)",
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight", refiner_sgm),
]


def convention(family: str, name: str) -> Convention:
    return next(c for c in CONVENTIONS if c.family == family and c.name == name)


def lora_for(family: str, name: str, seed: int = 0) -> dict:
    return convention(family, name).write(FAMILY_BUILDERS[family](), seed)


# ---------------------------------------------------------------------------------------------------------------
# the host's verdict


@dataclasses.dataclass
class HostLoad:
    patches: dict  # model key (or (key, offset[, fn])) -> adapter or ("diff", ...)
    unloaded: list[str]  # LoRA keys the host logged as "lora key not loaded"

    @property
    def lowrank(self) -> int:
        """Patched targets that are low-rank adapters (not full diffs)."""
        return sum(1 for v in self.patches.values() if not isinstance(v, tuple))

    @property
    def diffs(self) -> int:
        return sum(1 for v in self.patches.values() if isinstance(v, tuple))


def host_load(host: HostModel, state_or_path) -> HostLoad:
    """What ComfyUI's LoraLoader does with a file: lora_convert.convert_lora, then load_lora with the model's map."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils

    if isinstance(state_or_path, dict):
        state = dict(state_or_path)
    else:
        state = comfy.utils.load_torch_file(str(state_or_path), safe_load=True)
    state = comfy.lora_convert.convert_lora(state)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    root = logging.getLogger()
    disabled, level = logging.root.manager.disable, root.level
    logging.disable(logging.NOTSET)  # the verdict must not depend on how the caller configured logging
    root.setLevel(logging.WARNING)
    root.addHandler(handler)
    try:
        patches = comfy.lora.load_lora(state, host.key_map)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.disable(disabled)
    unloaded = [m.split(": ", 1)[1] for m in records if m.startswith("lora key not loaded")]
    return HostLoad(patches, unloaded)


def patched_weights(load: HostLoad) -> set[str]:
    """The model weights a file patches (slices of one fused weight count once): "the same patched weights"."""
    return {key if isinstance(key, str) else key[0] for key in load.patches}


def host_delta(host: HostModel, load: HostLoad) -> dict[str, torch.Tensor]:
    """ΔW per model weight as the host's adapters compute it (strength 1, fp32), slices placed at their offsets."""
    state = host_state(host)
    deltas: dict[str, torch.Tensor] = {}
    for key, adapter in load.patches.items():
        model_key, offset, function = (key, None, None) if isinstance(key, str) else (
            key[0], key[1], key[2] if len(key) > 2 else None)
        full = deltas.setdefault(model_key, torch.zeros(state[model_key].shape, dtype=torch.float32))
        target = full if offset is None else full.narrow(offset[0], offset[1], offset[2])
        function = function or (lambda a: a)
        if isinstance(adapter, tuple):
            target += function(adapter[1][0].float().reshape(target.shape))
        else:
            zero = torch.zeros(target.shape, dtype=torch.float32)
            target += adapter.calculate_weight(zero, model_key, 1.0, 1.0, None, function, torch.float32)
    return deltas


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ‖ΔWa − ΔWb‖ / ‖ΔWa‖ over the weights of ``a`` (a weight missing from ``b`` counts as ΔW = 0)."""
    worst = 0.0
    for key, delta in a.items():
        other = b.get(key, torch.zeros_like(delta))
        worst = max(worst, float((delta - other).norm()) / (float(delta.norm()) or 1.0))
    return worst

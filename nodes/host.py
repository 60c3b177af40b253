"""The ComfyUI host, used instead of rewritten: folders, key maps, progress, interrupts, weights.

Everything that touches ComfyUI's modules lives here, so node files stay declarations.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..core.base import StateDictBase
from ..core.model import Layer
from ..core.norms_cache import NormCache
from .host_base import HostBase, HostWeights, host_key_map, placed_layers
from .save_path import resolve_prefix


def lora_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise("loras", name)


def progress_callback(total_hint: int = 1) -> Callable[[str, int, int], None]:
    """A (stage, done, total) callback driving ComfyUI's ProgressBar and honouring Cancel."""
    bar = comfy.utils.ProgressBar(total_hint)

    def update(stage: str, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


def compute_device(model=None) -> torch.device:
    """Where the maths runs: the model's load device (the GPU when ComfyUI has one)."""
    if model is not None and getattr(model, "load_device", None) is not None:
        return torch.device(model.load_device)
    return comfy.model_management.get_torch_device()


def _original_weights(patcher, prefix_filter: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Model keys -> weights as loaded from the checkpoint, never as patched by an applied LoRA.

    ComfyUI patches weights in place when it loads a patched clone and keeps the originals in the
    patcher's ``backup`` (shared by all clones), so a backed-up key's original is taken from there.
    """
    state = patcher.model.state_dict()
    backup = getattr(patcher, "backup", {}) or {}
    out = {}
    for key, tensor in state.items():
        if not key.endswith(".weight") or tensor.dim() < 2:
            continue
        if prefix_filter and not key.startswith(prefix_filter):
            continue
        original = backup.get(key)
        out[key[: -len(".weight")]] = original.weight if original is not None else tensor
    return out


def _fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """Identifies the checkpoint by content: names, shapes and the bytes of a few sampled tensors."""
    digest = hashlib.sha256()
    names = sorted(weights)
    for name in names:
        digest.update(f"{name}:{tuple(weights[name].shape)}:{weights[name].dtype};".encode())
    for name in names[:: max(1, len(names) // 8)][:8]:
        sample = weights[name].flatten()[:4096].detach().to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    return "model:" + digest.hexdigest()


def base_from_host(model=None, clip=None) -> Optional[StateDictBase]:
    """Every weight of the MODEL/CLIP the graph already loaded, keyed by model key (no ``.weight``), as stored.

    A whole-model view for comparing with a checkpoint file; ResizeLoRA uses :func:`host_base`, which
    places layers by the host's key maps and dequantizes one weight at a time."""
    weights: dict[str, torch.Tensor] = {}
    if model is not None:
        weights.update(_original_weights(model, "diffusion_model."))
    if clip is not None:
        weights.update(_original_weights(clip.patcher))
    if not weights:
        return None
    return StateDictBase(weights, fingerprint=_fingerprint(weights), label="the loaded MODEL/CLIP",
                         architecture=host_architecture(model))


# ComfyUI model configs -> our architecture names (subclasses such as SSD1B or FluxSchnell included)
# comfy.supported_models class -> the pack's family (core.naming.ARCHITECTURES); subclasses of another family's
# class that are not that family come first (HunyuanImage 2.1 subclasses HunyuanVideo, and has no table here)
_ARCHITECTURES = (("HunyuanImage21", None), ("HunyuanImage21Refiner", None), ("SDXLRefiner", "sdxl_refiner"),
                  ("SDXL", "sdxl"), ("SD15", "sd15"), ("Flux", "flux"), ("Chroma", "chroma"), ("SD3", "sd3"),
                  ("WAN21_T2V", "wan"), ("QwenImage", "qwen_image"), ("HunyuanVideo", "hunyuan_video"),
                  ("LTXV", "ltxv"), ("HiDream", "hidream"), ("Lumina2", "lumina2"))


def host_architecture(model) -> Optional[str]:
    """The loaded model's family, from its ComfyUI model config; None when it is none of ours."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    if config is None:
        return None
    import comfy.supported_models

    for class_name, architecture in _ARCHITECTURES:
        cls = getattr(comfy.supported_models, class_name, None)
        if cls is not None and isinstance(config, cls):
            return architecture
    return None


def host_base(model=None, clip=None, layers: Sequence[Layer] = ()
              ) -> tuple[Optional[HostBase], dict[str, Layer], list[Layer]]:
    """The connected MODEL/CLIP as the base ComfyUI's own key maps decide (nodes/host_base.py), with each
    LoRA layer placed: (base, layer key -> layer as scored, layers the host places nowhere)."""
    sources = [HostWeights(p, n) for p, n in ((model, "MODEL"), (getattr(clip, "patcher", None), "CLIP"))
               if p is not None]
    if not sources:
        return None, {}, list(layers)
    base = HostBase(sources, host_key_map(model, clip), "the loaded MODEL/CLIP", host_architecture(model))
    placed, missing = placed_layers(base, list(layers))
    return base, placed, missing


# fp32 slices one norm worker holds at once, times the workers on a GPU (core/norms.py) and an SVD's workspace
_SLICES_IN_FLIGHT = 4


def scoring_device(model, base: Optional[HostBase]) -> torch.device:
    """Where base norms are computed: the model's GPU when the largest fp32 base slice fits, a few times over,
    in the VRAM ComfyUI leaves free; else the CPU. Weights go there one layer at a time, never the whole model
    (which stays where ComfyUI keeps it: loaded, or offloaded)."""
    device = compute_device(model)
    if base is None or device.type == "cpu":
        return device
    needed = _SLICES_IN_FLIGHT * 4 * base.largest_slice()
    return device if comfy.model_management.get_free_memory(device) >= needed else torch.device("cpu")


def norms_cache_dir() -> str:
    """Beside the checkpoints folder, so caches survive restarts and follow the models."""
    folders = folder_paths.get_folder_paths("checkpoints")
    return folders[0] if folders else folder_paths.models_dir


def norms_cache() -> NormCache:
    return NormCache.in_folder(norms_cache_dir())


def lora_folders() -> list[str]:
    return folder_paths.get_folder_paths("loras")


def save_folder(prefix: str) -> tuple[str, str]:
    """(folder, file stem) for a save prefix inside the first loras folder (rules: nodes/save_path.py)."""
    return resolve_prefix(lora_folders()[0], prefix)


def refresh_lora_list() -> None:
    """Drop ComfyUI's cached file list so LoraLoader shows the new file without a restart."""
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)
    helper = getattr(folder_paths, "cache_helper", None)
    if helper is not None:
        helper.clear()

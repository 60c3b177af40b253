"""ResizeLoRA: apply a recipe, scoring against the MODEL/CLIP the graph already loaded."""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import torch

from ..core.errors import LoraError
from ..core.formats.writer import encoded_size, verbatim_prefix
from ..core.model import Layer, LoraFile
from ..core.recipe import format_float
from ..core.resize import apply_recipe, check_base_matches, reference_table
from .host import compute_device, host_base, norms_cache, progress_callback, scoring_device
from .host_base import unplaced_error
from .lora_type import CATEGORY, LORA_TYPE, RECIPE_TYPE, ResizableLora

# Numbered blocks of every family ComfyUI loads, longest names first (``blocks`` is Wan's, inside no other)
_NUMBERED = ("single_transformer_blocks", "double_stream_blocks", "single_stream_blocks", "transformer_blocks",
             "context_refiner", "noise_refiner", "double_blocks", "single_blocks", "output_blocks", "input_blocks",
             "joint_blocks", "down_blocks", "up_blocks", "blocks", "layers")
_BLOCK = re.compile(r"(?:^|[._])(?:(" + "|".join(_NUMBERED) + r")[._](\d+)|(middle_block|mid_block))(?=[._]|$)")
# Diffusion-model prefixes of model keys and of file keys no table renamed (ComfyUI, trainers' own)
_DIFFUSION_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "lora_unet_", "lora_transformer_", "lycoris_",
                       "transformer.", "unet.", "base_model.model.")
_TEXT_ENCODER = re.compile(r"text_encoders\.([^.]+)|(lora_te\d*)_|(clip_[lg]|t5xxl|text_encoder(?:_\d)?)\.")
_WORDS = re.compile(r"[A-Za-z]+(?:_[A-Za-z]+)*")


def block_of(name: str) -> str:
    """Chart group of a layer by its model key (or, without a model, its file key): 'input_blocks.4',
    'middle_block', 'blocks.3' (Wan), 'transformer_blocks.0', 'joint_blocks.1', 'double_stream_blocks.2',
    'layers.5' ...; a text encoder is one group ('clip_l', 'umt5xxl', 'lora_te1'); the rest by its first word."""
    encoder = _TEXT_ENCODER.match(name)
    if encoder:
        return next(group for group in encoder.groups() if group)
    rest = next((name[len(p):] for p in _DIFFUSION_PREFIXES if name.startswith(p)), name)
    match = _BLOCK.search(rest)
    if match:
        return "middle_block" if match.group(3) else f"{match.group(1)}.{match.group(2)}"
    words = _WORDS.match(rest)
    return words.group(0) if words else rest.split(".")[0]


# Chart order: text encoders, then the diffusion model from input to output (numbers numerically).
_BLOCK_ORDER = ("clip_l", "clip_g", "t5xxl", "lora_te", "lora_te1", "lora_te2", "lora_te3", "input_blocks",
                "down_blocks", "joint_blocks", "double_blocks", "double_stream_blocks", "transformer_blocks",
                "noise_refiner", "context_refiner", "layers", "blocks", "middle_block", "single_blocks",
                "single_transformer_blocks", "single_stream_blocks", "up_blocks", "output_blocks")


def _block_sort_key(block: str) -> tuple:
    family, _, number = block.partition(".")
    rank = _BLOCK_ORDER.index(family) if family in _BLOCK_ORDER else len(_BLOCK_ORDER)
    return (rank, int(number) if number.isdigit() else -1, block)


def chart_names(placed: Mapping[str, Layer]) -> dict[str, str]:
    """Layer key -> the model key the host patches, text-encoder keys under ``text_encoders.`` (ComfyUI's own
    generic prefix), so every family's blocks group the same way whatever the file's naming."""
    return {key: layer.name if layer.name.startswith("diffusion_model.") else f"text_encoders.{layer.name}"
            for key, layer in placed.items()}


def chart_data(result, size_before: int, size_after: int, names: Optional[Mapping[str, str]] = None) -> dict:
    """Ranks per block; ``names``: layer key -> the model key the host patches (grouped by that when known)."""
    names = names or {}
    blocks: dict[str, list[int]] = {}
    for row in result.layers:
        ranks = blocks.setdefault(block_of(names.get(row["name"], row["name"])), [0, 0])
        ranks[0] += row["old_rank"]
        ranks[1] += row["new_rank"]
    ordered = sorted(blocks.items(), key=lambda item: _block_sort_key(item[0]))
    return {"blocks": [{"block": b, "original": r[0], "kept": r[1]} for b, r in ordered],
            "size_before": size_before, "size_after": size_after, "threshold": result.threshold,
            "error": result.total_error, "recipe": result.recipe.text}


def report_text(result, chart: dict) -> str:
    old = sum(b["original"] for b in chart["blocks"])
    new = sum(b["kept"] for b in chart["blocks"])
    lines = [f"recipe {result.recipe.text}: total rank {old} -> {new}, "
             f"{chart['size_before'] / 2**20:.2f} MiB -> {chart['size_after'] / 2**20:.2f} MiB, "
             f"relative error {100 * result.total_error:.2f}%"
             + ("" if result.threshold is None else f", threshold {format_float(result.threshold, 3)}")]
    lines += [f"  note: {note}" for note in result.notes]
    lines += [f"  {b['block']}: {b['original']} -> {b['kept']}" for b in chart["blocks"]]
    return "\n".join(lines)


# SaveLoRA's precisions: a source in another one (fp8, fp64) is sized as fp16, the smallest SaveLoRA writes
_SIZED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def size_dtype(lora) -> torch.dtype:
    """The precision both chart sizes use: the source's, when SaveLoRA can write it, else fp16."""
    stored = next((t.dtype for layer in lora for t in layer.factors.values() if t.is_floating_point()), None)
    return stored if stored in _SIZED_DTYPES else torch.float16


def size_convention(lora: LoraFile) -> str:
    """The convention sizes are measured in: kohya (SaveLoRA's default) when it can name every layer, else keep
    (names no table knows, as read: what SaveLoRA writes for a Qwen-Image or HiDream diffusers file)."""
    return "kohya" if all(verbatim_prefix(layer, "kohya") is not None for layer in lora if layer.verbatim) else "keep"


def dense_rank_of(recipe) -> Optional[int]:
    """The rank a randomized SVD of dense layers may stop at: only for method=rsvd with a fixed rank
    (thr=, size= and kohya's rules need every singular value), as the CLI decides it."""
    if recipe.method != "rsvd" or recipe.scored or recipe.kohya_rule:
        return None
    return recipe.rank_cap(False)


class ResizeLoRA:
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The resized LoRA (plain LoRA/LoCon factors).", "Ranks, sizes and error per block.")
    FUNCTION = "resize"
    DESCRIPTION = ("Keeps the singular values the recipe scores highest. With MODEL/CLIP connected, base "
                   "norms come from the weights ComfyUI already loaded (never re-read from disk) and are cached.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to resize."}),
            "recipe": (RECIPE_TYPE, {"tooltip": "From a ScoreRecipe node."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The base model the LoRA was made for: needed by spn_ckpt, fro_ckpt "
                                           "and subspace. Its unpatched weights are used."}),
            "clip": ("CLIP", {"tooltip": "The base text encoder(s), for LoRAs with text-encoder layers."}),
        }}

    def resize(self, lora: ResizableLora, recipe, model=None, clip=None):
        base, placed, missing = host_base(model, clip, list(lora.lora.layers.values()))
        if recipe.needs_base:
            if base is None:
                raise LoraError(f"recipe {recipe.text!r} compares with the base model, and no MODEL/CLIP is "
                                "connected", file=lora.label, fix="connect the checkpoint's MODEL and CLIP to "
                                "ResizeLoRA, or use spn_lora/fro_lora/params, rank= or sv_ratio=")
            if missing:  # another family's LoRA says so by name; else the host's verdict, with the count
                check_base_matches((), base, lora.lora.architecture, lora.label)
                raise unplaced_error(missing, len(lora.lora), lora.label, clip is not None)
        device = compute_device(model)
        progress = progress_callback()
        items = lora.decomposition(device=device, progress=lambda d, t: progress("decompose", d, t),
                                   dense_rank=dense_rank_of(recipe), niter=recipe.niter)
        refs = {}
        if base is not None and recipe.needs_base:
            cache = norms_cache()
            # scored under the host's names and slices: the norms cache is keyed by model weight, not file naming
            scored = [dataclasses.replace(item, layer=placed[item.key]) for item in items]
            refs = reference_table(scored, [recipe], base, device=scoring_device(model, base), cache=cache,
                                   progress=lambda d, t: progress("base norms", d, t), label=lora.label)
            cache.save()
        convention = size_convention(lora.lora)
        result = apply_recipe(items, recipe, refs, template=lora.lora, convention=convention, operation=lora.operation,
                              sources=lora.sources, base=base.by_layer_name() if base is not None else None,
                              store_dtype=False)  # fp32 until SaveLoRA picks a dtype
        resized = ResizableLora(result.lora, lora.sources, f"{lora.label} ({recipe.text})", lora.operation)
        resized.recipe_text = recipe.text
        resized.threshold = result.threshold
        # both at the source's precision (fp16 for fp8 sources): the factors stay fp32 until SaveLoRA picks one
        stored = size_dtype(lora.lora)
        as_stored = all(t.dtype in _SIZED_DTYPES for layer in lora.lora for t in layer.factors.values()
                        if t.is_floating_point())
        size_before = encoded_size(lora.lora, convention=convention, dtype=None if as_stored else stored) \
            if lora.lora.layers else 0
        size_after = encoded_size(result.lora, convention=convention, dtype=stored) if result.lora.layers else 0
        chart = chart_data(result, size_before, size_after, chart_names(placed))
        return {"ui": {"lora_resize_chart": [chart]}, "result": (resized, report_text(result, chart))}

"""ResizeLoRA: apply a recipe, scoring against the MODEL/CLIP the graph already loaded."""
from __future__ import annotations

import re
from typing import Optional

import torch

from ..core.errors import LoraError
from ..core.formats.writer import encoded_size
from ..core.recipe import format_float
from ..core.resize import apply_recipe, reference_table
from .host import base_from_host, compute_device, norms_cache, progress_callback
from .lora_type import CATEGORY, LORA_TYPE, RECIPE_TYPE, ResizableLora


def block_of(name: str) -> str:
    """Chart group of a layer: 'input_blocks.4', 'middle_block', 'clip_l 0-5', 'double_blocks.3' ..."""
    match = re.match(r"diffusion_model\.((?:input|output)_blocks|double_blocks|single_blocks)\.(\d+)", name)
    if match:
        return f"{match.group(1)}.{match.group(2)}"
    if name.startswith("diffusion_model.middle_block"):
        return "middle_block"
    match = re.match(r"(clip_[lg]|t5xxl)\..*?layers?\.(\d+)", name)
    if match:
        return match.group(1)
    return name.split(".")[0] if not name.startswith("diffusion_model.") else name.split(".")[1]


# Chart order: text encoders, then the diffusion model from input to output (numbers numerically).
_BLOCK_ORDER = ("clip_l", "clip_g", "t5xxl", "input_blocks", "double_blocks", "middle_block", "single_blocks",
                "output_blocks")


def _block_sort_key(block: str) -> tuple:
    family, _, number = block.partition(".")
    rank = _BLOCK_ORDER.index(family) if family in _BLOCK_ORDER else len(_BLOCK_ORDER)
    return (rank, int(number) if number.isdigit() else -1, block)


def chart_data(result, size_before: int, size_after: int) -> dict:
    blocks: dict[str, list[int]] = {}
    for row in result.layers:
        ranks = blocks.setdefault(block_of(row["name"]), [0, 0])
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
        base = base_from_host(model, clip)
        if recipe.needs_base and base is None:
            raise LoraError(f"recipe {recipe.text!r} compares with the base model, and no MODEL/CLIP is connected",
                            file=lora.label, fix="connect the checkpoint's MODEL and CLIP to ResizeLoRA, or use "
                            "spn_lora/fro_lora/params, rank= or sv_ratio=")
        device = compute_device(model)
        progress = progress_callback()
        items = lora.decomposition(device=device, progress=lambda d, t: progress("decompose", d, t),
                                   dense_rank=dense_rank_of(recipe), niter=recipe.niter)
        cache = norms_cache() if base is not None and recipe.needs_base else None
        refs = reference_table(items, [recipe], base, device=device, cache=cache,
                               progress=lambda d, t: progress("base norms", d, t),
                               architecture=lora.lora.architecture, label=lora.label)
        if cache is not None:
            cache.save()
        result = apply_recipe(items, recipe, refs, template=lora.lora, operation=lora.operation,
                              sources=lora.sources, base=base, store_dtype=False)  # fp32 until SaveLoRA picks a dtype
        resized = ResizableLora(result.lora, lora.sources, f"{lora.label} ({recipe.text})", lora.operation)
        resized.recipe_text = recipe.text
        resized.threshold = result.threshold
        # both at the source's precision (fp16 for fp8 sources): the factors stay fp32 until SaveLoRA picks one
        stored = size_dtype(lora.lora)
        as_stored = all(t.dtype in _SIZED_DTYPES for layer in lora.lora for t in layer.factors.values()
                        if t.is_floating_point())
        size_before = encoded_size(lora.lora, dtype=None if as_stored else stored) if lora.lora.layers else 0
        size_after = encoded_size(result.lora, dtype=stored) if result.lora.layers else 0
        chart = chart_data(result, size_before, size_after)
        return {"ui": {"lora_resize_chart": [chart]}, "result": (resized, report_text(result, chart))}

"""Score singular values by a recipe and choose which to keep.

score = log10 σ + log10 rescale − Σ w · log10 ref (the seed tool's rule, in log10 units), then
``thr=`` keeps score ≥ thr, ``size=`` finds the threshold whose written file fits, and the
per-layer rules (rank=, sv_ratio=, sv_fro=, sv_cumulative=) cut each layer on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .decompose import Decomposed
from .errors import LoraError
from .recipe import Recipe, check_numbers

MIB = 1 << 20


@dataclass
class References:
    """What a layer's singular values are compared with. Base values are None without a base."""

    spectral: Optional[float] = None  # σ_max of the base weight (slice)
    frobenius: Optional[float] = None  # ‖W_base‖_F
    subspace: Optional[torch.Tensor] = None  # |u_iᵀ W_base v_i| per singular value


def score(item: Decomposed, recipe: Recipe, refs: Optional[References]) -> torch.Tensor:
    """log10 score of every singular value of one layer."""
    S = item.S
    scores = torch.log10(S) + math.log10(recipe.rescale)
    for method, weight in recipe.weights.items():
        scores = scores - weight * _log_reference(method, item, refs)
    return scores


def _log_reference(method: str, item: Decomposed, refs: Optional[References]):
    if method == "spn_lora":
        return math.log10(float(item.S[0]))
    if method == "fro_lora":
        return math.log10(float(torch.linalg.vector_norm(item.S)))
    if method == "params":
        return math.log10(item.params_per_rank())
    value = None if refs is None else {"spn_ckpt": refs.spectral, "fro_ckpt": refs.frobenius,
                                       "subspace": refs.subspace}[method]
    if value is None:
        raise LoraError(f"{method} needs the base checkpoint's weights, and none were found for this layer",
                        layer=item.key, fix="give the base checkpoint (or MODEL/CLIP in ComfyUI), or use a "
                        "recipe without spn_ckpt/fro_ckpt/subspace")
    if isinstance(value, torch.Tensor):
        return torch.log10(value.clamp_min(torch.finfo(torch.float32).tiny))
    if value <= 0:
        raise LoraError("the base weight is all zeros", layer=item.key, fix="check the base checkpoint")
    return math.log10(value)


@dataclass
class Selection:
    masks: dict[str, torch.Tensor]  # key -> bool[k] of kept singular values
    threshold: Optional[float]  # the log10 threshold used (thr=, or found for size=)


def _kohya_count(S: torch.Tensor, rule: str, target: float) -> int:
    """kohya's dynamic-rank rules without its cap at rank−1 (it can never keep a layer whole)."""
    if rule == "sv_ratio":
        count = int((S > S[0] / target).sum())
    else:
        values = S.pow(2) if rule == "sv_fro" else S
        goal = target ** 2 if rule == "sv_fro" else target
        fractions = values.cumsum(0) / values.sum()
        count = int(torch.searchsorted(fractions, torch.tensor(goal - 1e-7, dtype=fractions.dtype))) + 1
    return max(1, min(count, S.shape[0]))


def _cap(mask: torch.Tensor, scores: Optional[torch.Tensor], cap: Optional[int]) -> torch.Tensor:
    if cap is None or int(mask.sum()) <= cap:
        return mask
    order = torch.argsort(scores, descending=True) if scores is not None else torch.arange(mask.shape[0])
    kept = order[mask[order]][:cap]
    capped = torch.zeros_like(mask)
    capped[kept] = True
    return capped


def select(items: list[Decomposed], recipe: Recipe, refs: Mapping[str, References], *,
           measure: Optional[Callable[[dict[str, torch.Tensor]], int]] = None,
           bytes_per_element: int = 2) -> Selection:
    """Which singular values each layer keeps under ``recipe``.

    ``measure(masks)`` returns the exact byte size of the file those masks would write; ``size=``
    needs it so the written file never exceeds the target.
    """
    check_numbers(recipe)
    if recipe.size_mib is not None:
        if measure is None:
            raise ValueError("size= selection needs a measure function")
        return _select_size(items, recipe, refs, measure, bytes_per_element)
    masks: dict[str, torch.Tensor] = {}
    for item in items:
        cap = recipe.rank_cap(item.layer.is_conv)
        scores = score(item, recipe, refs.get(item.key)) if recipe.scored else None
        if scores is not None:
            mask = scores >= recipe.threshold
        elif recipe.kohya_rule:
            mask = torch.zeros(item.rank, dtype=torch.bool)
            mask[:_kohya_count(item.S, *recipe.kohya_rule)] = True  # the rules are scale-free: no rescale
        else:
            mask = torch.ones(item.rank, dtype=torch.bool)
        masks[item.key] = _cap(mask, scores, cap)
    return Selection(masks, recipe.threshold)


def _select_size(items, recipe, refs, measure, bytes_per_element) -> Selection:
    target = int(recipe.size_mib * MIB)
    all_scores = [score(item, recipe, refs.get(item.key)) for item in items]
    caps = [recipe.rank_cap(item.layer.is_conv) for item in items]
    # candidate singular values (score, layer index, position), within each layer's rank cap, best first;
    # held as flat tensors so a selection of the first `count` is one scatter, not a Python loop
    scores_list, index_list, pos_list = [], [], []
    for index, (item, scores) in enumerate(zip(items, all_scores)):
        order = torch.argsort(scores, descending=True, stable=True)
        if caps[index] is not None:
            order = order[:caps[index]]
        scores_list.append(scores[order].to(torch.float64))
        index_list.append(torch.full((len(order),), index, dtype=torch.int64))
        pos_list.append(order.to(torch.int64))
    cand_scores = torch.cat(scores_list) if scores_list else torch.zeros(0, dtype=torch.float64)
    ranking = torch.sort(-cand_scores, stable=True).indices
    cand_scores = cand_scores[ranking]
    cand_index = (torch.cat(index_list) if index_list else torch.zeros(0, dtype=torch.int64))[ranking]
    cand_pos = (torch.cat(pos_list) if pos_list else torch.zeros(0, dtype=torch.int64))[ranking]
    ranks = [item.rank for item in items]
    starts = torch.tensor([0] + ranks[:-1], dtype=torch.int64).cumsum(0)
    costs = torch.tensor([item.params_per_rank() * bytes_per_element for item in items], dtype=torch.int64)
    total = len(cand_scores)

    def masks_for(count: int) -> dict[str, torch.Tensor]:
        flat = torch.zeros(sum(ranks), dtype=torch.bool)
        flat[starts[cand_index[:count]] + cand_pos[:count]] = True
        return {item.key: mask for item, mask in zip(items, torch.split(flat, ranks))}

    # Prefix sums of factor bytes give a first guess; the exact size comes from `measure`.
    prefix = [0] + torch.cumsum(costs[cand_index], 0).tolist()
    empty_size = measure(masks_for(0)) if total else 0
    if measure(masks_for(total)) <= target:
        return Selection(masks_for(total), float("-inf"))
    if empty_size > target:
        raise LoraError(f"size={recipe.size_mib} MiB is smaller than the file's fixed overhead "
                        f"({empty_size / MIB:.3f} MiB of header and metadata)", fix="raise size=")
    # largest count whose measured size fits. The size is the factor bytes (prefix sums) plus a header
    # that barely changes with the count, so each measurement corrects the header estimate and the
    # next guess lands within a rank or two: about four measurements instead of a bisection's twenty.
    low, high = 0, total  # measure(low) <= target < measure(high)
    overhead = empty_size
    for attempt in range(64):
        if high - low <= 1:
            break
        if attempt < 8:
            middle = min(high - 1, max(low + 1, _bisect_bytes(prefix, target - overhead)))
        else:  # the guesses stopped converging (never seen): plain bisection
            middle = (low + high) // 2
        size = measure(masks_for(middle))
        overhead = size - prefix[middle]
        if size <= target:
            low = middle
        else:
            high = middle
    threshold = float(cand_scores[low - 1]) if low > 0 else float("inf")
    return Selection(masks_for(low), threshold)


def _bisect_bytes(prefix: list[int], budget: int) -> int:
    lo, hi = 0, len(prefix) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefix[mid] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo

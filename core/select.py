"""Score singular values by a recipe and choose which to keep.

score = log10 σ + log10 rescale − Σ w · log10 ref (the seed tool's rule, in log10 units), then
``thr=`` keeps score ≥ thr, ``size=`` finds the threshold whose written file fits, ``err=``/``err_ckpt=``
the threshold whose whole-LoRA error meets a budget, and the per-layer rules (rank=, sv_ratio=, sv_fro=,
sv_cumulative=, sv_knee=) cut each layer on its own.

Error budgets are exact: every dropped singular value removes σ² of ‖ΔW‖_F² and nothing else (the
directions are orthogonal), so the error of any selection is √(Σ dropped σ²) without forming ΔW. Both are
measured on the rescaled ΔW: ``err=`` is relative to ‖ΔW·rescale‖ (rescale cancels), ``err_ckpt=`` to the
base's √Σ‖W‖² (rescale counts). Values are dropped in ascending score order; without scoring methods the
score is log10(σ·rescale), so the smallest σ of all layers go first (the order that drops the most values
for a given energy).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .decompose import Decomposed
from .errors import LoraError
from .recipe import Recipe, check_numbers

MIB = 1 << 20
log = logging.getLogger("lora_resize")


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
    if rule == "sv_knee":
        return knee_count(S, target)
    if rule == "sv_ratio":
        count = int((S > S[0] / target).sum())
    else:
        values = S.pow(2) if rule == "sv_fro" else S
        goal = target ** 2 if rule == "sv_fro" else target
        fractions = values.cumsum(0) / values.sum()
        count = int(torch.searchsorted(fractions, torch.tensor(goal - 1e-7, dtype=fractions.dtype))) + 1
    return max(1, min(count, S.shape[0]))


def knee_count(S: torch.Tensor, sensitivity: float = 1.0) -> int:
    """How many values the elbow of a descending spectrum keeps: KJNodes' ``sv_knee`` rule
    (kijai/ComfyUI-KJNodes, nodes/lora_nodes.py ``index_sv_knee``, used by LoraReduceRank), reimplemented.

    Kneedle: with x = i/(n−1) and y = (σᵢ − σₙ)/(σ₁ − σₙ) both in [0, 1], the knee is the first i
    maximising y − (1 − s·x), the curve's height above the line from (0, 1) to (1, 1 − s); s = 1 is the
    standard knee, a smaller s keeps fewer values, a larger one more. Like KJNodes it keeps i + 1 values,
    at least 2 (a spectrum of two or fewer values is kept whole). Unlike KJNodes' dense path the curve is
    the layer's own significant values (as its factored path sees them), not a tail of zeros from ΔW's
    full width, so the knee does not depend on the layer's size."""
    n = int(S.shape[0])
    if n <= 2:
        return n
    values = S.to(torch.float64)
    span = float(values[0] - values[-1])
    x = torch.arange(n, dtype=torch.float64) / (n - 1)
    y = (values - values[-1]) / span if span > 0 else torch.zeros(n, dtype=torch.float64)
    index = int(torch.argmax(y - (1.0 - sensitivity * x)))  # first maximum, as numpy's argmax
    return min(max(index, 1), n - 1) + 1


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
    if recipe.budget is not None:
        return _select_budget(items, recipe, refs)
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


def _select_budget(items: list[Decomposed], recipe: Recipe, refs: Mapping[str, References]) -> Selection:
    """err=/err_ckpt=: keep the fewest values, dropped in ascending score order, whose error stays within P%.

    The dropped energy allowed is (P/100)² · Σ‖ΔW·rescale‖² (err=) or (P/100)² · Σ‖W‖² (err_ckpt=). Values
    beyond a rank cap are dropped first whatever they cost; if that alone exceeds the budget the cap wins
    (with a warning). The threshold reported is the lowest kept score (+inf when nothing is kept)."""
    kind, percent = recipe.budget
    caps = [recipe.rank_cap(item.layer.is_conv) for item in items]
    all_scores = [score(item, recipe, refs.get(item.key)).to(torch.float64) for item in items]
    energies = [(item.S.to(torch.float64) * recipe.rescale).pow(2) for item in items]
    if kind == "err":
        reference = sum(float(e.sum()) for e in energies)
    else:
        reference = 0.0
        for item in items:
            ref = refs.get(item.key)
            if ref is None or ref.frobenius is None:
                raise LoraError("err_ckpt= measures the error against the base weights, and none were found for "
                                "this layer", layer=item.key, fix="give the base checkpoint (or MODEL/CLIP in "
                                "ComfyUI), or use err= (relative to the LoRA itself)")
            reference += float(ref.frobenius) ** 2
    allowed = (percent / 100.0) ** 2 * reference
    masks = {item.key: torch.ones(item.rank, dtype=torch.bool) for item in items}
    forced = 0.0
    cand_scores, cand_energy, cand_index, cand_pos = [], [], [], []
    for index, (item, scores, energy) in enumerate(zip(items, all_scores, energies)):
        order = torch.argsort(scores, descending=True, stable=True)
        cap = caps[index]
        if cap is not None and cap < item.rank:
            masks[item.key][order[cap:]] = False
            forced += float(energy[order[cap:]].sum())
            order = order[:cap]
        cand_scores.append(scores[order])
        cand_energy.append(energy[order])
        cand_index.append(torch.full((len(order),), index, dtype=torch.int64))
        cand_pos.append(order)
    if not items:
        return Selection(masks, float("inf"))
    flat_scores, flat_energy = torch.cat(cand_scores), torch.cat(cand_energy)
    flat_index, flat_pos = torch.cat(cand_index), torch.cat(cand_pos)
    drop_order = torch.argsort(flat_scores, stable=True)  # lowest score first
    dropped_energy = forced + torch.cumsum(flat_energy[drop_order], 0)
    # the longest prefix of the drop order that fits: σ² ≥ 0, so the running sum never decreases
    count = int(torch.searchsorted(dropped_energy, torch.tensor([allowed], dtype=torch.float64), right=True))
    if forced > allowed:
        count = 0
        log.warning("recipe %r: the rank cap alone drops %.4f%% (more than the budget %s%%); the cap wins",
                    recipe.text, 100 * math.sqrt(forced / reference) if reference else 0.0, percent)
    for position in drop_order[:count].tolist():
        masks[items[int(flat_index[position])].key][int(flat_pos[position])] = False
    kept = drop_order[count:]
    threshold = float(flat_scores[kept].min()) if kept.numel() else float("inf")
    return Selection(masks, threshold)


def _bisect_bytes(prefix: list[int], budget: int) -> int:
    lo, hi = 0, len(prefix) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prefix[mid] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo

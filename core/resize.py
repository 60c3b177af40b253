"""Resize a LoRA by recipes: decompose once, score and cut per recipe, rebuild plain LoRA factors.

Rebuilt factors split √σ between up and down and alpha = new rank (scale 1), so ΔW' is exactly the
kept truncated SVD, with ``rescale`` baked in. Layers that keep nothing are dropped.

Values are checked where they are made: recipe numbers on entry (``recipe.check_numbers``), base norms
(``core.norms``), singular values (``core.decompose``), every rebuilt factor here (finite in fp32 and
within the output dtype's range), and the report's error: a run never writes or prints a NaN.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from .decompose import Decomposed, decompose
from .delta import delta_weight, dora_weight_norm, effective_down
from .errors import LoraError
from .formats.writer import checked_cast, encoded_size
from .model import Layer, LoraFile
from .pad import pad_result
from .recipe import Recipe, check_numbers
from .select import References, Selection, score, select

log = logging.getLogger("lora_resize")


@dataclass
class ResizeResult:
    recipe: Recipe
    lora: LoraFile
    threshold: Optional[float]
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer report rows
    notes: list[str] = field(default_factory=list)
    scores: Optional[torch.Tensor] = None  # every singular value's log10 score, for scored recipes

    @property
    def total_error(self) -> float:
        """‖ΔW − ΔW'‖_F / ‖ΔW‖_F over the whole LoRA (all layers together)."""
        dropped = sum(row["dropped_energy"] for row in self.layers)
        total = sum(row["energy"] for row in self.layers)
        return math.sqrt(dropped / total) if total else 0.0


_OVERFLOW = "rebuilt from finite values, so √σ·rescale overflowed fp32"
_THRESHOLD_PLACEHOLDER = "+000.0000"  # as long as any threshold written by provenance_extra (|thr| < 1000)


def _threshold_text(threshold: Optional[float]) -> Optional[str]:
    return None if threshold is None else f"{threshold:+.4f}"


def provenance_extra(result: "ResizeResult") -> dict:
    """What a resized file records beyond the recipe: the threshold used and the notes."""
    return {"threshold": _threshold_text(result.threshold), "notes": list(result.notes)}


def rebuild_layer(item: Decomposed, mask: torch.Tensor, rescale: float = 1.0,
                  dtype: Optional[torch.dtype] = None) -> Optional[Layer]:
    """Plain LoRA/LoCon layer of the kept singular values, or None when nothing is kept.

    ``dtype`` stores the factors directly at the output precision (no full-size fp32 copy). Factors
    that are not finite, or do not fit ``dtype``, are a LoraError naming the layer (never a silent Inf)."""
    kept = int(mask.sum())
    if kept == 0:
        return None
    keep = slice(0, kept) if bool(mask[:kept].all()) else mask  # usually the largest values are kept
    # √σ on each side, folded into the small r×k matrices; √σ·√rescale cannot overflow where σ·rescale could
    root = torch.sqrt(item.S[keep]) * math.sqrt(rescale)
    up = item.left(keep, root)
    down = item.right(keep, root).reshape(kept, *item.in_shape)
    if item.layer.is_conv:
        up = up.reshape(*up.shape, 1, 1)
    up = checked_cast(up, dtype, layer=item.key, what="the rebuilt up factor", cause=_OVERFLOW)
    down = checked_cast(down, dtype, layer=item.key, what="the rebuilt down factor", cause=_OVERFLOW)
    layer = _rebuilt(item.layer, {"up": up, "down": down}, kept)
    if rescale != 1.0 and layer.bias_diff is not None:
        layer.bias_diff = scaled_bias(item, rescale)
    return layer


def scaled_bias(item: Decomposed, rescale: float) -> torch.Tensor:
    """The layer's bias diff times ``rescale`` (ComfyUI's strength scales it with ΔW), in its own dtype."""
    bias = item.layer.bias_diff
    return checked_cast(bias.float() * rescale, bias.dtype, layer=item.key, what="the rescaled bias diff",
                        cause="rescale made it overflow its dtype")


def carried_biases(items: Sequence[Decomposed], masks: Mapping[str, torch.Tensor], rescale: float = 1.0
                   ) -> dict[str, torch.Tensor]:
    """Bias diffs of layers that keep no singular value: written alone (``<key>.diff_b``, which ComfyUI
    applies on its own), so dropping a layer's low-rank part never silently drops its bias change too."""
    carried = {}
    for item in items:
        if item.layer.bias_diff is None or int(masks[item.key].sum()) > 0:
            continue
        suffix = (item.layer.suffixes or {}).get("diff_b", ".diff_b")
        bias = item.layer.bias_diff if rescale == 1.0 else scaled_bias(item, rescale)
        carried[(item.layer.source_key or item.key) + suffix] = bias
    return carried


def _rebuilt(source: Layer, factors: dict[str, torch.Tensor], rank: int) -> Layer:
    """A plain LoRA layer in ``source``'s place: same name (verbatim or not), slice, DoRA, bias and key
    prefix; the suffixes it was read with are kept only where they name up/down (``-f keep``)."""
    suffixes = {role: suffix for role, suffix in (source.suffixes or {}).items()
                if role in ("up", "down", "alpha", "dora_scale", "magnitude", "diff_b")}
    if source.kind != "lora":
        suffixes = {role: suffix for role, suffix in suffixes.items() if role not in ("up", "down")}
    return Layer(name=source.name, kind="lora", factors=factors, shape=source.shape, alpha=float(rank),
                 offset=source.offset, dora_scale=source.dora_scale, bias_diff=source.bias_diff,
                 source_key=source.source_key, verbatim=source.verbatim, suffixes=suffixes)


def _shape_only(item: Decomposed, kept: int) -> Optional[Layer]:
    """A rebuilt layer's shapes on the meta device: for exact size accounting without arithmetic."""
    if kept == 0:
        return None
    up_shape = (item.layer.out_features, kept, 1, 1) if item.layer.is_conv else (item.layer.out_features, kept)
    meta = {"up": torch.empty(up_shape, device="meta"), "down": torch.empty(kept, *item.in_shape, device="meta")}
    return _rebuilt(item.layer, meta, kept)


def check_base_matches(items: Sequence[Decomposed], base, architecture: Optional[str] = None,
                       label: Optional[str] = None) -> None:
    """A base of another architecture, or of other widths, is refused before any work, by name."""
    base_arch = getattr(base, "architecture", None)
    if architecture and base_arch and architecture != base_arch:
        raise LoraError(f"this LoRA is for {architecture.upper()}, but the base model "
                        f"({getattr(base, 'label', 'base')}) is {base_arch.upper()}", file=label,
                        fix=f"connect a {architecture.upper()} checkpoint, or use a recipe that needs no base "
                        "(spn_lora/fro_lora/params, rank=, sv_ratio=)")
    available = base.names()
    for item in items:
        if item.layer.name not in available:
            continue  # reported with the count of all missing layers
        expected = tuple(base.shape(item.layer.name, item.layer.offset))
        if expected != tuple(item.layer.shape):
            raise LoraError(f"the LoRA changes a {tuple(item.layer.shape)} weight, but the base's "
                            f"({getattr(base, 'label', 'base')}) is {expected}", file=label, layer=item.key,
                            fix="use the checkpoint this LoRA was made for (same model family and size)")


def reference_table(items: Sequence[Decomposed], recipes: Sequence[Recipe], base, *, device=None, cache=None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    architecture: Optional[str] = None, label: Optional[str] = None) -> dict[str, References]:
    """Base-checkpoint references each recipe needs, computed once for all recipes."""
    needed = set().union(*(r.base_references for r in recipes)) if recipes else set()
    if not needed & {"spn_ckpt", "fro_ckpt", "subspace"}:
        return {}
    if base is None:
        raise LoraError("this recipe compares with the base checkpoint, and none was given",
                        fix="pass the checkpoint (not '-'), or use spn_lora/fro_lora/params or rank=")
    from .norms import reference_norms

    check_base_matches(items, base, architecture, label)
    kinds = tuple(k for k, m in (("spectral", "spn_ckpt"), ("frobenius", "fro_ckpt")) if m in needed)
    kinds = kinds or ("frobenius",)
    available = base.names()
    targets = []
    missing = []
    for item in items:
        if item.layer.name in available:
            targets.append((item.layer.name, item.layer.offset))
        else:
            missing.append(item.key)
    if missing:
        raise LoraError(f"{len(missing)} LoRA layers have no weight in the base checkpoint "
                        f"(first: {missing[0]})", file=getattr(base, "label", None),
                        fix="use the checkpoint this LoRA was trained for (a LoRA of another architecture "
                        "does not match)")
    norms = reference_norms(base, targets, kinds=kinds + (("frobenius",) if "frobenius" not in kinds else ()),
                            device=device, cache=cache, progress=progress)
    table: dict[str, References] = {}
    for item in items:
        if item.key in missing:
            continue
        values = norms[(item.layer.name, item.layer.offset)]
        refs = References(spectral=values.get("spectral"), frobenius=values.get("frobenius"))
        if "subspace" in needed:
            weight = base.weight(item.layer.name, item.layer.offset, device=device, reuse=True).flatten(1)
            U, Vh = item.left().to(weight.device), item.right().to(weight.device)
            refs.subspace = ((U.T @ weight) * Vh).sum(dim=1).abs().cpu()
            if not bool(torch.isfinite(refs.subspace).all()):  # a NaN the cached norms did not see
                raise base.nonfinite_error(item.layer.name, item.layer.offset, weight)
        table[item.key] = refs
    return table


def _dora_notes(template: LoraFile, has_base: bool) -> list[str]:
    dora = [layer for layer in template if layer.dora_scale is not None]
    if not dora:
        return []
    if has_base:
        return [f"{len(dora)} DoRA layers: magnitudes refitted to the resized directions on the base"]
    return [f"{len(dora)} DoRA layers: magnitudes kept as they were (no base given to refit them)"]


def refit_dora(source: Layer, resized: Layer, base_weight: torch.Tensor) -> torch.Tensor:
    """DoRA magnitude for the resized delta, closest to the original DoRA weight.

    DoRA applies W' = m · d with d = (W + ΔW) / ‖W + ΔW‖ per output row (or input column). With the
    new direction d' the best magnitude in least squares, row by row, is m' = m · ⟨d, d'⟩.
    """
    weight = base_weight.to(torch.float32)
    old = weight + delta_weight(source, weight.device)
    new = weight + delta_weight(resized, weight.device)
    magnitude = source.dora_scale.to(torch.float32)
    product = old * new
    if magnitude.shape[0] == weight.shape[0]:
        dots = product.reshape(product.shape[0], -1).sum(1)
    else:
        dots = product.transpose(0, 1).reshape(product.shape[1], -1).sum(1)
    norms = (dora_weight_norm(old, magnitude) * dora_weight_norm(new, magnitude)).clamp_min(1e-30)
    cosine = dots.reshape(norms.shape) / norms
    return (magnitude.reshape(norms.shape) * cosine).reshape(source.dora_scale.shape).to(source.dora_scale.dtype)


def apply_recipe(items: Sequence[Decomposed], recipe: Recipe, refs: Mapping[str, References], *,
                 template: LoraFile, convention: str = "kohya", dtype: Optional[torch.dtype] = torch.float16,
                 operation: str = "resize", sources=(), base=None, store_dtype: bool = True) -> ResizeResult:
    """One recipe on decomposed layers: select, rebuild, report.

    ``dtype`` is the precision the file will be written at (it decides ``size=``); with
    ``store_dtype`` the rebuilt factors are kept at it, else in fp32 (ComfyUI: saved later).

    ``size=`` measures candidate files with exactly the metadata the writer will add
    (``provenance_extra``), so the file written with that metadata never exceeds the target.
    """
    check_numbers(recipe)
    notes = _dora_notes(template, base is not None)
    if recipe.method == "randproj":
        result = _random_projection(items, recipe, template)
        result.notes[:0] = notes
        return pad_result(result, recipe.pad)
    bytes_per_element = torch.empty(0, dtype=dtype or torch.float16).element_size()

    def measure(masks: Mapping[str, torch.Tensor]) -> int:
        layers = {}
        for item in items:
            layer = _shape_only(item, int(masks[item.key].sum()))
            if layer is not None:
                layers[item.key] = layer
        if not layers:
            return 0
        draft = _derived(template, layers)
        draft.passthrough.update(carried_biases(items, masks))
        extra = {"threshold": _THRESHOLD_PLACEHOLDER, "notes": notes}
        return encoded_size(draft, convention=convention, dtype=dtype, operation=operation, recipe=recipe.text,
                            sources=sources, extra_provenance=extra)

    selection = select(list(items), recipe, refs, measure=measure, bytes_per_element=bytes_per_element)
    result = _result(items, recipe, refs, selection, template, dtype if store_dtype else None)
    result.notes[:0] = notes
    if base is not None:
        for item in items:
            layer = result.lora.layers.get(item.key)
            if layer is not None and layer.dora_scale is not None and layer.name in base.names():
                weight = base.weight(layer.name, layer.offset)
                layer.dora_scale = refit_dora(item.layer, layer, weight)
                if not bool(torch.isfinite(layer.dora_scale).all()):
                    if not bool(torch.isfinite(weight).all()):
                        raise base.nonfinite_error(layer.name, layer.offset, weight)
                    checked_cast(layer.dora_scale, None, layer=item.key, what="the refitted DoRA magnitude",
                                 cause="the base weight plus ΔW overflowed fp32")
    if recipe.scored and items:
        result.scores = torch.cat([score(item, recipe, refs.get(item.key)) for item in items])
    _check_error(result)
    return pad_result(result, recipe.pad)


def _check_error(result: ResizeResult) -> None:
    """The report's error is a number: a NaN here means a value overflowed somewhere upstream."""
    if math.isfinite(result.total_error):
        return
    row = next((r for r in result.layers if not (math.isfinite(r["energy"]) and math.isfinite(r["dropped_energy"]))),
               result.layers[0] if result.layers else {"name": None})
    raise LoraError("the resize error is not a finite number (ΔW's energy overflowed)", layer=row["name"],
                    fix="lower rescale= or the merge weights; if the LoRA file itself is that large, it is corrupt")


def _derived(template: LoraFile, layers: dict[str, Layer]) -> LoraFile:
    """A result LoRA: ``template``'s context and its pass-through entries (carried unchanged by every recipe)."""
    return LoraFile(layers, template.architecture, template.family, dict(template.metadata), None, [],
                    passthrough=dict(template.passthrough))


def _result(items, recipe: Recipe, refs, selection: Selection, template: LoraFile,
            dtype: Optional[torch.dtype] = None) -> ResizeResult:
    layers: dict[str, Layer] = {}
    rows = []
    for item in items:
        mask = selection.masks[item.key]
        rebuilt = rebuild_layer(item, mask, recipe.rescale, dtype)
        if rebuilt is not None:
            layers[item.key] = rebuilt
        rows.append(_report_row(item, mask, recipe, refs.get(item.key)))
    result = ResizeResult(recipe, _derived(template, layers), selection.threshold, rows)
    carried = carried_biases(items, selection.masks, recipe.rescale)
    if carried:
        result.lora.passthrough.update(carried)
        result.notes.append(f"{len(carried)} layers keep no singular value; their bias diffs are kept alone")
    return result


def _report_row(item: Decomposed, mask: torch.Tensor, recipe: Recipe, refs: Optional[References]) -> dict:
    S = item.S.to(torch.float64) * recipe.rescale  # fp64: σ² of a large but valid fp32 σ overflows fp32
    energy = float(S.pow(2).sum())
    dropped = float(S[~mask].pow(2).sum())
    row = {"name": item.key, "kind": item.layer.kind_label, "old_rank": item.layer.rank or item.rank,
           "new_rank": int(mask.sum()), "energy": energy, "dropped_energy": dropped,
           "rle_lora": math.sqrt(dropped / energy) if energy else 0.0, "rle_ckpt": None,
           "sigma_max": float(S[0])}
    if refs is not None and refs.frobenius:
        row["rle_ckpt"] = math.sqrt(dropped) / refs.frobenius
    return row


def _random_projection(items: Sequence[Decomposed], recipe: Recipe, template: LoraFile) -> ResizeResult:
    """A' = R·A, B' = B·Rᵀ with R ~ N(0, 1/k) (or a sparse ±1/√(density·k) matrix), in fp32.

    Seeded per layer from (seed, layer name), so the same recipe gives the same file. Dense layers
    (LoHa, LoKr, diffs) have no A and B: they are cut by their SVD instead.
    """
    layers: dict[str, Layer] = {}
    rows = []
    notes = []
    for item in items:
        source = item.layer
        cap = recipe.rank_cap(source.is_conv)
        if source.kind != "lora" or cap is None or source.rank <= cap:
            mask = torch.zeros(item.rank, dtype=torch.bool)
            mask[: cap if cap is not None else item.rank] = True
            if source.kind != "lora" and cap is not None:
                notes.append(f"{item.key}: {source.kind} layer cut by SVD (random projection needs A and B)")
            rebuilt = rebuild_layer(item, mask, recipe.rescale)
            layers[item.key] = rebuilt
            rows.append(_report_row(item, mask, recipe, None))
            continue
        generator = torch.Generator().manual_seed(_layer_seed(recipe.seed, item.key))
        R = _projection(cap, source.rank, recipe.sparse, generator)
        up = source.factors["up"].to(torch.float32).flatten(1) * (source.scale * recipe.rescale)
        down = effective_down(source)
        new_up = checked_cast(up @ R.T, None, layer=item.key, what="the projected up factor", cause=_OVERFLOW)
        new_down = checked_cast(R @ down, None, layer=item.key, what="the projected down factor")
        error = _projection_error(up, down, R)
        if source.is_conv:
            new_up = new_up.reshape(*new_up.shape, 1, 1)
        new_down = new_down.reshape(cap, *source.shape[1:])
        layers[item.key] = _rebuilt(source, {"up": new_up, "down": new_down}, cap)
        energy = float((item.S.to(torch.float64) * recipe.rescale).pow(2).sum())
        rows.append({"name": item.key, "kind": source.kind_label, "old_rank": source.rank, "new_rank": cap,
                     "energy": energy, "dropped_energy": error ** 2,
                     "rle_lora": error / math.sqrt(energy) if energy else 0.0, "rle_ckpt": None,
                     "sigma_max": float(item.S[0] * recipe.rescale)})
    return ResizeResult(recipe, _derived(template, layers), None, rows, notes)


def _layer_seed(seed: int, key: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _projection(k: int, r: int, density: Optional[float], generator: torch.Generator) -> torch.Tensor:
    if density is None:
        return torch.randn(k, r, generator=generator) / math.sqrt(k)
    signs = torch.randint(0, 2, (k, r), generator=generator, dtype=torch.float32) * 2 - 1
    keep = torch.rand(k, r, generator=generator) < density
    return signs * keep / math.sqrt(density * k)


def _projection_error(up: torch.Tensor, down: torch.Tensor, R: torch.Tensor) -> float:
    """‖B A − B RᵀR A‖_F from r×r Gram matrices: √tr(BᵀB · M · AAᵀ · Mᵀ), M = I − RᵀR."""
    M = torch.eye(R.shape[1]) - R.T @ R
    value = torch.trace((up.T @ up) @ M @ (down @ down.T) @ M.T)
    return math.sqrt(max(float(value), 0.0))


def _naming(exc: LoraError, path: Optional[str]) -> LoraError:
    """The same error (same type) naming the LoRA file when it names no file yet."""
    if exc.file or not path:
        return exc
    return type(exc)(exc.problem, file=path, layer=exc.layer, fix=exc.fix)


def resize(lora: LoraFile, recipes: Sequence[Recipe], *, base=None, device=None, cache=None,
           convention: str = "kohya", dtype: Optional[torch.dtype] = torch.float16, sources=(),
           progress: Optional[Callable[[str, int, int], None]] = None) -> Iterator[ResizeResult]:
    """Every recipe on one LoRA, sharing one decomposition and one set of base references.

    A generator: each result can be written and dropped before the next recipe runs, so memory
    holds one resized LoRA at a time."""
    def stage(name):
        return (lambda done, total: progress(name, done, total)) if progress else None

    for recipe in recipes:  # before any work: a bad number fails now, not after the decomposition
        check_numbers(recipe)
    if not lora.layers:
        raise LoraError(f"no LoRA layer to resize: the file holds only {len(lora.passthrough)} entries that are "
                        f"carried as they are ({', '.join(list(lora.passthrough)[:3])})", file=lora.path,
                        fix="nothing here can get smaller; use it as it is, or convert it (lora-resize convert)")

    fixed_caps = [r.rank_cap(False) for r in recipes if not r.scored and not r.kohya_rule]
    dense_rank = max(fixed_caps) if fixed_caps and len(fixed_caps) == len(recipes) and None not in fixed_caps \
        else None
    niter = max((r.niter for r in recipes), default=2)
    if not any(r.method == "rsvd" for r in recipes):
        dense_rank = None
    try:
        items = decompose(lora, device=device, dense_rank=dense_rank, niter=niter, progress=stage("decompose"))
    except LoraError as exc:
        raise _naming(exc, lora.path) from None
    refs = reference_table(items, recipes, base, device=device, cache=cache, progress=stage("base norms"),
                           architecture=lora.architecture, label=lora.path)
    for index, recipe in enumerate(recipes):
        try:
            result = apply_recipe(items, recipe, refs, template=lora, convention=convention, dtype=dtype,
                                  sources=sources, base=base)
        except LoraError as exc:
            raise _naming(exc, lora.path) from None
        if index == len(recipes) - 1:
            items = refs = None  # the decomposition is done with: free it before the caller writes
        yield result


__all__ = ["resize", "apply_recipe", "rebuild_layer", "reference_table", "provenance_extra", "ResizeResult",
           "score"]

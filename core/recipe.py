"""Resize recipes, in the seed tool's grammar: ``fro_ckpt=1,thr=-3.5:spn_lora=1,thr=-0.7``.

A recipe is comma-separated ``key[=value]`` tokens; several recipes are ``:``-separated and share
one decomposition. Scoring methods (weights normalised to sum 1; a bare name weighs 1):
spn_ckpt, spn_lora, fro_ckpt, fro_lora, subspace, params. Selection: ``thr=`` (log10 score),
``size=`` (MiB), ``rank=``/``conv_rank=`` (fixed), kohya's ``sv_ratio=``/``sv_fro=``/``sv_cumulative=``.
Reducers: ``method=svd|rsvd|randproj`` with ``niter=``, ``sparse=``, ``seed=``. ``rescale=`` scales ΔW.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import LoraError

SCORE_METHODS = ("spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "params")
BASE_METHODS = {"spn_ckpt", "fro_ckpt", "subspace"}
REDUCERS = ("svd", "rsvd", "randproj")
DEFAULT_RECIPE = "fro_ckpt=1,thr=-3.5"
_NUMBER_KEYS = {"thr": float, "size": float, "rescale": float, "rank": int, "conv_rank": int,
                "sv_ratio": float, "sv_fro": float, "sv_cumulative": float, "niter": int, "sparse": float,
                "seed": int}
_ATTRIBUTE = {"thr": "threshold", "size": "size_mib"}


@dataclass
class Recipe:
    text: str
    weights: dict[str, float] = field(default_factory=dict)  # normalised, non-zero only
    threshold: Optional[float] = None
    size_mib: Optional[float] = None
    rank: Optional[int] = None
    conv_rank: Optional[int] = None
    sv_ratio: Optional[float] = None
    sv_fro: Optional[float] = None
    sv_cumulative: Optional[float] = None
    rescale: float = 1.0
    method: str = "svd"
    niter: int = 2
    sparse: Optional[float] = None
    seed: int = 0

    @property
    def needs_base(self) -> bool:
        return bool(BASE_METHODS & set(self.weights))

    @property
    def scored(self) -> bool:
        """thr=/size= select by score; the others by a per-layer rule."""
        return self.threshold is not None or self.size_mib is not None

    @property
    def kohya_rule(self) -> Optional[tuple[str, float]]:
        for name in ("sv_ratio", "sv_fro", "sv_cumulative"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    def rank_cap(self, is_conv: bool) -> Optional[int]:
        return self.conv_rank if is_conv and self.conv_rank is not None else self.rank

    def slug(self, threshold: Optional[float] = None) -> str:
        """File-name part, as the seed tool writes it: ``frockpt1_size32_th-2.87``."""
        parts = [f"{k.replace('_', '')}{format_float(v)}" for k, v in sorted(self.weights.items())]
        if self.rescale != 1.0:
            parts.append(f"scale{format_float(self.rescale)}")
        if self.size_mib is not None:
            parts.append(f"size{format_float(self.size_mib)}")
        for name in ("rank", "conv_rank", "sv_ratio", "sv_fro", "sv_cumulative"):
            if getattr(self, name) is not None:
                parts.append(f"{name.replace('_', '')}{format_float(getattr(self, name))}")
        if self.method != "svd":
            parts.append(self.method)
        slug = "_".join(parts)
        if threshold is not None:
            slug += f"_th{format_float(threshold)}"
        return slug


def format_float(value: float, places: int = 2) -> str:
    if value == float("-inf"):
        return "-inf"
    return f"{value:.{places}f}".rstrip("0").rstrip(".")


def _bad(token: str, recipe: str, why: str, fix: str) -> LoraError:
    return LoraError(f"recipe {recipe!r}: bad token {token!r}: {why}", fix=fix)


def parse_recipe(text: str) -> Recipe:
    """One recipe; raises LoraError naming the offending token."""
    text = text.strip()
    if not text:
        raise LoraError("empty recipe", fix=f"write e.g. {DEFAULT_RECIPE}")
    recipe = Recipe(text=text)
    raw_weights: dict[str, float] = {}
    seen: set[str] = set()
    for token in text.split(","):
        token = token.strip()
        key, eq, value = token.partition("=")
        key = key.strip()
        if not key:
            raise _bad(token, text, "empty token", "remove the extra comma")
        if key in seen:
            raise _bad(token, text, f"{key} is given twice", "keep one")
        seen.add(key)
        if key in SCORE_METHODS:
            try:
                raw_weights[key] = float(value) if eq else 1.0
            except ValueError:
                raise _bad(token, text, "the weight is not a number", f"write {key}=0.5 or just {key}") from None
            continue
        if key == "method":
            if value not in REDUCERS:
                raise _bad(token, text, f"unknown reducer {value!r}", f"use one of {', '.join(REDUCERS)}")
            recipe.method = value
            continue
        if key not in _NUMBER_KEYS:
            raise _bad(token, text, "unknown key", "known keys: " + ", ".join(SCORE_METHODS + tuple(_NUMBER_KEYS))
                       + ", method")
        if not eq or not value.strip():
            raise _bad(token, text, "needs a value", f"write {key}=<number>")
        try:
            number = _NUMBER_KEYS[key](value)
        except ValueError:
            raise _bad(token, text, f"{value!r} is not a valid {_NUMBER_KEYS[key].__name__}",
                       f"write {key}=<number>") from None
        setattr(recipe, _ATTRIBUTE.get(key, key), number)
    _validate(recipe, raw_weights, text)
    return recipe


def _validate(recipe: Recipe, raw_weights: dict[str, float], text: str) -> None:
    selections = [k for k in ("threshold", "size_mib", "sv_ratio", "sv_fro", "sv_cumulative")
                  if getattr(recipe, k) is not None]
    if len(selections) > 1:
        names = {"threshold": "thr", "size_mib": "size"}
        chosen = ' and '.join(names.get(s, s) for s in selections)
        raise LoraError(f"recipe {text!r}: choose one selection, not {chosen}",
                        fix="use thr=, size=, sv_ratio=, sv_fro= or sv_cumulative= (rank= may cap any of them)")
    if not selections and recipe.rank is None and recipe.conv_rank is None:
        raise LoraError(f"recipe {text!r} has no selection", fix="add thr=-3.5, size=<MiB>, rank=<N> or sv_ratio=<R>")
    total = sum(raw_weights.values())
    if recipe.scored:
        if not raw_weights or total == 0:
            raise LoraError(f"recipe {text!r}: thr=/size= need a scoring method with a non-zero weight",
                            fix="add e.g. fro_ckpt=1 (methods: " + ", ".join(SCORE_METHODS) + ")")
        recipe.weights = {k: v / total for k, v in raw_weights.items() if v != 0}
    elif raw_weights:
        raise LoraError(f"recipe {text!r}: scoring methods only matter with thr= or size=",
                        fix="remove " + ", ".join(raw_weights) + " or add thr=/size=")
    checks = [
        (recipe.size_mib is not None and recipe.size_mib <= 0, "size", "must be positive"),
        (recipe.rank is not None and recipe.rank < 1, "rank", "must be at least 1"),
        (recipe.conv_rank is not None and recipe.conv_rank < 1, "conv_rank", "must be at least 1"),
        (recipe.sv_ratio is not None and recipe.sv_ratio < 1, "sv_ratio", "must be at least 1"),
        (recipe.sv_fro is not None and not 0 < recipe.sv_fro <= 1, "sv_fro", "must be in (0, 1]"),
        (recipe.sv_cumulative is not None and not 0 < recipe.sv_cumulative <= 1, "sv_cumulative",
         "must be in (0, 1]"),
        (recipe.rescale <= 0, "rescale", "must be positive"),
        (recipe.sparse is not None and not 0 < recipe.sparse <= 1, "sparse", "is a density in (0, 1]"),
        (recipe.niter < 0, "niter", "must be ≥ 0"),
    ]
    for failed, key, why in checks:
        if failed:
            raise LoraError(f"recipe {text!r}: {key} {why}", fix=f"change {key}=")
    if recipe.method == "randproj" and (recipe.scored or recipe.kohya_rule):
        raise LoraError(f"recipe {text!r}: method=randproj reduces to a fixed rank",
                        fix="use rank=<N> (and conv_rank=) with method=randproj")
    if recipe.sparse is not None and recipe.method != "randproj":
        raise LoraError(f"recipe {text!r}: sparse= only applies to method=randproj", fix="add method=randproj")


def parse_recipes(text: str) -> list[Recipe]:
    """``:``-separated recipes (the seed tool's -r argument)."""
    return [parse_recipe(part) for part in text.split(":")]

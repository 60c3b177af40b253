"""Resize recipes, in the seed tool's grammar: ``fro_ckpt=1,thr=-3.5:spn_lora=1,thr=-0.7``.

A recipe is comma-separated ``key[=value]`` tokens; several recipes are ``:``-separated and share
one decomposition. Scoring methods (weights normalised to sum 1; a bare name weighs 1):
spn_ckpt, spn_lora, fro_ckpt, fro_lora, subspace, params. Selection: ``thr=`` (log10 score),
``size=`` (MiB), ``rank=``/``conv_rank=`` (fixed), kohya's ``sv_ratio=``/``sv_fro=``/``sv_cumulative=``,
KJNodes' ``sv_knee=``, and error budgets ``err=``/``err_ckpt=`` (percent, see core.select). ``pad=N`` zero-pads
every kept layer to rank N afterwards (core.pad), so a set of LoRAs shares one rank.
Reducers: ``method=svd|rsvd|randproj`` with ``niter=``, ``sparse=``, ``seed=``. ``rescale=`` scales ΔW.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional

from .errors import LoraError, UsageError

SCORE_METHODS = ("spn_ckpt", "spn_lora", "fro_ckpt", "fro_lora", "subspace", "params")
BASE_METHODS = {"spn_ckpt", "fro_ckpt", "subspace"}
REDUCERS = ("svd", "rsvd", "randproj")
DEFAULT_RECIPE = "fro_ckpt=1,thr=-3.5"
_NUMBER_KEYS = {"thr": float, "size": float, "rescale": float, "rank": int, "conv_rank": int,
                "sv_ratio": float, "sv_fro": float, "sv_cumulative": float, "niter": int, "sparse": float,
                "seed": int, "err": float, "err_ckpt": float, "sv_knee": float, "pad": int}
# key: (low, high, low included, why). Bounds keep every number finite, every file name short and every
# run finite in time; the reasons are shown to the user.
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "thr": (-999, 999, True, "it is a log10 score threshold (real LoRAs score within about ±20)"),
    "size": (0, 1e6, False, "it is the file size in MiB (10⁶ MiB is a terabyte)"),
    "rescale": (1e-4, 1e4, True, "it multiplies ΔW: beyond 10⁴ the result overflows fp16 and is another LoRA, "
                "below 10⁻⁴ it vanishes; use the strength in the loader instead"),
    "rank": (1, 65536, True, "it is a rank per layer (no layer is wider than 65536)"),
    "conv_rank": (1, 65536, True, "it is a rank per conv layer (no layer is wider than 65536)"),
    "sv_ratio": (1, 1e6, True, "it is the ratio of the largest singular value to the smallest kept"),
    "sv_fro": (0, 1, False, "it is the fraction of the Frobenius norm to keep"),
    "sv_cumulative": (0, 1, False, "it is the fraction of the sum of singular values to keep"),
    "niter": (0, 100, True, "it counts the randomized SVD's power iterations (beyond ~10 nothing changes)"),
    "sparse": (0, 1, False, "it is the density of the random projection"),
    "seed": (0, 2**64 - 1, True, "it seeds torch's generator, which takes 0 to 2⁶⁴−1"),
    "err": (0, 100, True, "it is the whole LoRA's relative error ‖ΔW − ΔW'‖ / ‖ΔW‖ in percent"),
    "err_ckpt": (0, 100, True, "it is the error against the base, √(Σ‖ΔW − ΔW'‖² / Σ‖W‖²), in percent"),
    "sv_knee": (0, 2, False, "it is KJNodes' knee sensitivity: 1 is the standard Kneedle knee, lower keeps "
                "fewer values, higher more (KJNodes offers up to 2)"),
    "pad": (1, 65536, True, "it is the rank every layer is padded to (no layer is wider than 65536)"),
    "weight": (0, 1e6, True, "weights are normalised to sum 1; a negative one would reward what the method "
               "penalises"),
}
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT = re.compile(r"[+-]?[0-9]{1,20}")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_ATTRIBUTE = {"thr": "threshold", "size": "size_mib", "err": "err_lora"}
_LAYER_RULES = ("sv_ratio", "sv_fro", "sv_cumulative", "sv_knee")


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
    sv_knee: Optional[float] = None
    err_lora: Optional[float] = None  # err=P: percent of ‖ΔW‖_F
    err_ckpt: Optional[float] = None  # err_ckpt=P: percent of the base's ‖W‖_F
    pad: Optional[int] = None
    rescale: float = 1.0
    method: str = "svd"
    niter: int = 2
    sparse: Optional[float] = None
    seed: int = 0

    @property
    def needs_base(self) -> bool:
        return bool(self.base_references & BASE_METHODS)

    @property
    def base_references(self) -> set[str]:
        """The methods whose base references the recipe uses: its weights, and fro_ckpt for err_ckpt=
        (whose denominator is the base layers' Frobenius norms)."""
        return set(self.weights) | ({"fro_ckpt"} if self.err_ckpt is not None else set())

    @property
    def budget(self) -> Optional[tuple[str, float]]:
        """``("err", P)`` or ``("err_ckpt", P)``: an error budget in percent, else None."""
        if self.err_lora is not None:
            return "err", self.err_lora
        if self.err_ckpt is not None:
            return "err_ckpt", self.err_ckpt
        return None

    @property
    def scored(self) -> bool:
        """thr=/size=/err=/err_ckpt= select across layers by score (and report the threshold they reach);
        the others by a per-layer rule."""
        return self.threshold is not None or self.size_mib is not None or self.budget is not None

    @property
    def kohya_rule(self) -> Optional[tuple[str, float]]:
        """The per-layer spectrum rule (kohya's three and KJNodes' sv_knee), as (name, value)."""
        for name in _LAYER_RULES:
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
        if self.budget is not None:
            parts.append(f"{self.budget[0].replace('_', '')}{format_float(self.budget[1])}")
        for name in ("rank", "conv_rank") + _LAYER_RULES + ("pad",):
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
    return UsageError(f"recipe {recipe!r}: bad token {token!r}: {why}", fix=fix)


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else format_float(bound, 4)


def parse_number(value: str, kind: type, key: str, token: str, recipe: str) -> float:
    """A finite number in ``key``'s range, strictly: no nan/inf, no ``1_0``, no ``1e3`` for an integer.

    Python's float() and int() accept all of those, and each once reached a run (a file name too long,
    a run that never ends, a file of NaNs)."""
    value = value.strip()
    example = f"{key}=<number>" if key != "weight" else f"{token.partition('=')[0]}=0.5"
    if kind is int and not _INT.fullmatch(value):
        if _FLOAT.fullmatch(value) or _NON_FINITE.fullmatch(value):
            raise _bad(token, recipe, f"{key} takes a whole number, not {value!r}", f"write e.g. {key}=16")
        raise _bad(token, recipe, f"{value!r} is not a whole number", f"write e.g. {key}=16")
    if kind is float and not _FLOAT.fullmatch(value):
        if _NON_FINITE.fullmatch(value):
            raise _bad(token, recipe, f"{value!r} is not a finite number", f"write {example} with a finite value")
        raise _bad(token, recipe, f"{value!r} is not a number", f"write {example}")
    number = kind(value)
    if not math.isfinite(number):
        raise _bad(token, recipe, f"{value!r} is beyond the range of a float", f"write {example} with a "
                   "reasonable value")
    low, high, low_included, why = _RANGES[key]
    if number > high or number < low or (number == low and not low_included):
        bound = "≥" if low_included else ">"
        name = f"the weight of {token.partition('=')[0]}" if key == "weight" else key
        raise _bad(token, recipe, f"{name} must be {bound} {_show(low)} and ≤ {_show(high)}, because {why}",
                   f"change {token}")
    return number


_FIELDS = {"thr": "threshold", "size": "size_mib", "rescale": "rescale", "rank": "rank", "conv_rank": "conv_rank",
           "sv_ratio": "sv_ratio", "sv_fro": "sv_fro", "sv_cumulative": "sv_cumulative", "niter": "niter",
           "sparse": "sparse", "seed": "seed", "err": "err_lora", "err_ckpt": "err_ckpt", "sv_knee": "sv_knee",
           "pad": "pad"}


def check_numbers(recipe: Recipe) -> None:
    """The engine's own check of a recipe's numbers against the parser's ranges, whoever built the recipe
    (parser, node, API caller): a NaN compares false everywhere (``rescale=nan`` keeps nothing,
    ``sv_ratio=nan`` one value per layer) and an Inf becomes Inf factors, so none may reach the work."""
    values = [(key, getattr(recipe, attribute)) for key, attribute in _FIELDS.items()]
    values += [(method, weight) for method, weight in recipe.weights.items()]
    for key, value in values:
        if value is None:
            continue
        low, high, low_included, why = _RANGES.get(key, _RANGES["weight"])
        whole = _NUMBER_KEYS.get(key) is int
        number_ok = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
        if not (number_ok and math.isfinite(value) and low <= value <= high and (low_included or value > low)):
            bound = "≥" if low_included else ">"
            raise UsageError(f"recipe {recipe.text!r}: {key}={value} must be a finite "
                             f"{'whole number' if whole else 'number'} {bound} {_show(low)} and ≤ {_show(high)}, "
                             f"because {why}", fix=f"change {key}=")


def parse_recipe(text: str) -> Recipe:
    """One recipe; raises UsageError (a LoraError) naming the offending token and the fix."""
    text = text.strip()
    if not text:
        raise UsageError("empty recipe", fix=f"write e.g. {DEFAULT_RECIPE}")
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
            if eq and not value.strip():
                raise _bad(token, text, "the weight is not a number", f"write {key}=0.5 or just {key}")
            raw_weights[key] = parse_number(value, float, "weight", token, text) if eq else 1.0
            continue
        if key == "method":
            if value.strip() not in REDUCERS:
                raise _bad(token, text, f"unknown reducer {value!r}", f"use one of {', '.join(REDUCERS)}")
            recipe.method = value.strip()
            continue
        if key not in _NUMBER_KEYS:
            raise _bad(token, text, "unknown key", "known keys: " + ", ".join(SCORE_METHODS + tuple(_NUMBER_KEYS))
                       + ", method")
        if not eq or not value.strip():
            raise _bad(token, text, "needs a value", f"write {key}=<number>")
        setattr(recipe, _ATTRIBUTE.get(key, key), parse_number(value, _NUMBER_KEYS[key], key, token, text))
    _validate(recipe, raw_weights, text)
    return recipe


def _validate(recipe: Recipe, raw_weights: dict[str, float], text: str) -> None:
    """Combinations of tokens (each number was range-checked when parsed)."""
    selections = [k for k in ("threshold", "size_mib", "err_lora", "err_ckpt") + _LAYER_RULES
                  if getattr(recipe, k) is not None]
    if len(selections) > 1:
        names = {"threshold": "thr", "size_mib": "size", "err_lora": "err"}
        chosen = ' and '.join(names.get(s, s) for s in selections)
        raise UsageError(f"recipe {text!r}: choose one selection, not {chosen}",
                         fix="use thr=, size=, err=, err_ckpt=, sv_ratio=, sv_fro=, sv_cumulative= or sv_knee= "
                         "(rank= may cap any of them)")
    if not selections and recipe.rank is None and recipe.conv_rank is None and recipe.pad is None:
        raise UsageError(f"recipe {text!r} has no selection",
                         fix="add thr=-3.5, size=<MiB>, err=<percent>, rank=<N> or sv_ratio=<R>")
    total = sum(raw_weights.values())
    if recipe.threshold is not None or recipe.size_mib is not None:
        if not raw_weights or total == 0:
            raise UsageError(f"recipe {text!r}: thr=/size= need a scoring method with a non-zero weight",
                             fix="add e.g. fro_ckpt=1 (methods: " + ", ".join(SCORE_METHODS) + ")")
    elif raw_weights and recipe.budget is None:
        raise UsageError(f"recipe {text!r}: scoring methods only matter with thr=, size=, err= or err_ckpt=",
                         fix="remove " + ", ".join(raw_weights) + " or add thr=/size=/err=")
    if raw_weights and total == 0:
        raise UsageError(f"recipe {text!r}: every scoring weight is 0", fix="give one method a non-zero weight")
    recipe.weights = {k: v / total for k, v in raw_weights.items() if v != 0}
    _validate_pad(recipe, text)
    if recipe.method == "randproj" and (recipe.scored or recipe.kohya_rule):
        raise UsageError(f"recipe {text!r}: method=randproj reduces to a fixed rank",
                         fix="use rank=<N> (and conv_rank=) with method=randproj")
    if recipe.sparse is not None and recipe.method != "randproj":
        raise UsageError(f"recipe {text!r}: sparse= only applies to method=randproj", fix="add method=randproj")


def _validate_pad(recipe: Recipe, text: str) -> None:
    """pad= comes after the selection: a cap above it could only be refused later, and a size= target
    would be broken by the padding (the file's size is then fixed by pad= itself)."""
    if recipe.pad is None:
        return
    if recipe.size_mib is not None:
        raise UsageError(f"recipe {text!r}: pad= fixes every layer's rank, so the file's size no longer follows "
                         "size=", fix=f"use rank={recipe.pad},pad={recipe.pad}, or err=/thr= with pad=")
    for name in ("rank", "conv_rank"):
        cap = getattr(recipe, name)
        if cap is not None and cap > recipe.pad:
            raise UsageError(f"recipe {text!r}: {name}={cap} lets layers keep more than pad={recipe.pad}",
                             fix=f"write {name}={recipe.pad},pad={recipe.pad} (or a larger pad=)")


def _output_identity(recipe: Recipe) -> Optional[object]:
    """What decides a recipe's output name before any work: its slug, with the threshold for thr=;
    for size= (whose threshold is found later) the recipe's numbers, since equal numbers give one name."""
    if recipe.size_mib is not None or recipe.budget is not None:
        return repr(replace(recipe, text=""))
    return recipe.slug(recipe.threshold if recipe.scored else None)


def parse_recipes(text: str) -> list[Recipe]:
    """``:``-separated recipes (the seed tool's -r argument). Two recipes that would write the same file
    are refused here, before any work."""
    recipes = [parse_recipe(part) for part in text.split(":")]
    seen: dict[object, Recipe] = {}
    for recipe in recipes:
        identity = _output_identity(recipe)
        if identity in seen:
            raise UsageError(f"recipes {seen[identity].text!r} and {recipe.text!r} give the same output file",
                             fix="remove one, or make them differ")
        seen[identity] = recipe
    return recipes

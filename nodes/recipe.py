"""ScoreRecipe: build a resize recipe from widgets, or take a raw recipe string; validated here."""
from __future__ import annotations

import math

from ..core.errors import LoraError
from ..core.recipe import SCORE_METHODS, parse_recipe
from .lora_type import CATEGORY, RECIPE_TYPE

# appended, never reordered: saved workflows store the chosen name
_SELECTIONS = ["thr", "size", "rank", "sv_ratio", "sv_fro", "sv_cumulative", "err", "err_ckpt", "sv_knee"]
_SCORED = ("thr", "size", "err", "err_ckpt")


def _weight(tooltip: str, default: float = 0.0):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": tooltip})


class ScoreRecipe:
    CATEGORY = CATEGORY
    RETURN_TYPES = (RECIPE_TYPE, "STRING")
    RETURN_NAMES = ("recipe", "recipe_text")
    FUNCTION = "build"
    DESCRIPTION = "How ResizeLoRA decides which singular values of each layer to keep. Rejects a bad recipe at once."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "fro_ckpt": _weight("Weight of the comparison with the base layer's Frobenius norm.", 1.0),
            "spn_ckpt": _weight("Weight of the comparison with the base layer's spectral norm (largest σ)."),
            "spn_lora": _weight("Weight of the comparison with the LoRA layer's own largest σ."),
            "fro_lora": _weight("Weight of the comparison with the LoRA layer's own Frobenius norm."),
            "subspace": _weight("Weight of the comparison with how much the base acts along each direction."),
            "params": _weight("Weight of the parameters-per-rank penalty (favours cheap layers under size=)."),
            "selection": (_SELECTIONS, {"tooltip": "thr: log10 score threshold; size: target MiB; rank: fixed "
                                                   "rank; sv_*: kohya's dynamic rules; err: the fewest values "
                                                   "whose whole-LoRA error is at most value %; err_ckpt: the "
                                                   "same against the base's norm; sv_knee: the elbow of each "
                                                   "layer's spectrum (KJNodes)."}),
            "value": ("FLOAT", {"default": -3.5, "min": -100.0, "max": 100000.0, "step": 0.01,
                                "tooltip": "The threshold, size in MiB, rank, or sv_* parameter."}),
            "rescale": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                  "tooltip": "Multiply the LoRA's effect by this (baked into the result)."}),
            "reducer": (["svd", "rsvd", "randproj"], {"tooltip": "For fixed ranks: exact SVD, randomized "
                                                                 "SVD, or seeded random projection."}),
            # no "randomize after generate" widget: the same recipe must give the same file every run
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                             "tooltip": "Seed of the random projection (fixed: the same seed, the same file)."}),
        }, "optional": {
            "raw_recipe": ("STRING", {"default": "", "multiline": False,
                                      "tooltip": "A recipe in the CLI grammar (e.g. fro_ckpt=1,thr=-3.5); "
                                                 "when set it replaces every widget above."}),
            # optional and last: saved workflows (positional widgets_values) keep loading unchanged
            "niter": ("INT", {"default": 2, "min": 0, "max": 100,
                              "tooltip": "Power iterations of the randomized SVD (reducer rsvd): more is "
                                         "closer to the exact SVD and slower."}),
            "pad": ("INT", {"default": 0, "min": 0, "max": 65536,
                            "tooltip": "Zero-pad every layer to this rank afterwards (0: off), so a set of "
                                       "LoRAs shares one rank for hot-swapping; ΔW is unchanged."}),
        }}

    def build(self, fro_ckpt, spn_ckpt, spn_lora, fro_lora, subspace, params, selection, value, rescale, reducer,
              seed, raw_recipe="", niter=2, pad=0):
        if not raw_recipe.strip():
            _check_widgets(locals())
        text = raw_recipe.strip() or self.compose(locals())
        recipe = parse_recipe(text)
        return (recipe, recipe.text)

    @staticmethod
    def compose(values: dict) -> str:
        tokens = []
        if values["selection"] in _SCORED:
            tokens += [f"{m}={values[m]:g}" for m in SCORE_METHODS if values[m]]
        number = int(values["value"]) if values["selection"] == "rank" else values["value"]
        tokens.append(f"{values['selection']}={number:g}")
        if values["rescale"] != 1.0:
            tokens.append(f"rescale={values['rescale']:g}")
        if values["reducer"] != "svd":
            tokens.append(f"method={values['reducer']}")
            if values["reducer"] == "randproj":
                tokens.append(f"seed={values['seed']}")
            if values["reducer"] == "rsvd":
                tokens.append(f"niter={int(values.get('niter', 2))}")
        if int(values.get("pad", 0) or 0) > 0:
            tokens.append(f"pad={int(values['pad'])}")
        return ",".join(tokens)


_NUMBER_WIDGETS = ("fro_ckpt", "spn_ckpt", "spn_lora", "fro_lora", "subspace", "params", "value", "rescale")


def _check_widgets(values: dict) -> None:
    """A NaN or infinite widget (an API prompt can carry one past ComfyUI's min/max) is refused by name."""
    for name in _NUMBER_WIDGETS:
        number = values[name]
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise LoraError(f"recipe widget {name} is {number!r}, not a finite number",
                            fix=f"set {name} to a finite number")
    if not 0 <= int(values.get("pad", 0) or 0) <= 65536:
        raise LoraError(f"recipe widget pad is {values['pad']!r}", fix="use 0 (off) to 65536")
    if not 0 <= int(values.get("niter", 2)) <= 100:
        raise LoraError(f"recipe widget niter is {values['niter']!r}", fix="use 0 to 100 power iterations")

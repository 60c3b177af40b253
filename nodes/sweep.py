"""ResizeLoRASweep: one LoRA, several targets, decomposed once; a list out, so the graph after it runs per target.

Users pick a resize by guessing a threshold and eyeballing one image. With ComfyUI's list outputs, the
Apply LoRA -> sampler -> decode chain downstream runs once per target, and Compare Images measures each
against the original LoRA's image: the smallest target that still looks the same is a measured choice.
"""
from __future__ import annotations

import re

from ..core.errors import LoraError
from ..core.recipe import parse_recipe
from .lora_type import CATEGORY, LORA_TYPE, ResizableLora
from .resize import ResizeLoRA

# A target token: "0.5MiB"/"size=0.5" (file size), "2%"/"err=2" (whole-LoRA error), "rank=8"/"r8", "keep"
_SIZE = re.compile(r"^(?:size=)?([0-9.]+(?:e-?[0-9]+)?)\s*mib$", re.IGNORECASE)
_ERR = re.compile(r"^(?:err=)?([0-9.]+(?:e-?[0-9]+)?)\s*%$|^err=([0-9.]+(?:e-?[0-9]+)?)$", re.IGNORECASE)
_RANK = re.compile(r"^(?:rank=|r)([0-9]+)$", re.IGNORECASE)


def target_recipe(token: str, scoring: str) -> str:
    """The recipe text of one target; size= needs scoring methods (``scoring``), err= uses them for its
    order when given, rank= and keep do not."""
    text = token.strip()
    if text.lower() in ("keep", "all", "original"):
        return "err=0"
    if match := _SIZE.match(text) or re.match(r"^size=([0-9.]+(?:e-?[0-9]+)?)$", text, re.IGNORECASE):
        return f"{scoring},size={match.group(1)}"
    if match := _ERR.match(text):
        percent = match.group(1) or match.group(2)
        return f"{scoring},err={percent}" if scoring else f"err={percent}"
    if match := _RANK.match(text):
        return f"rank={match.group(1)}"
    return f"{scoring},{text}" if scoring and ("thr=" in text) else text


def parse_targets(targets: str, scoring: str) -> list[tuple[str, object]]:
    """(the user's token, its parsed recipe) for every comma-, semicolon- or newline-separated target."""
    tokens = [t.strip() for t in re.split(r"[,;\n]", targets) if t.strip()]
    if not tokens:
        raise LoraError("the sweep has no targets", fix="list targets such as '0.5MiB, 1MiB, 2%, rank=8, keep'")
    parsed = []
    for token in tokens:
        text = target_recipe(token, scoring.strip().strip(","))
        try:
            parsed.append((token, parse_recipe(text)))
        except LoraError as exc:
            raise LoraError(f"sweep target {token!r} (recipe {text!r}): {exc.problem}",
                            fix=exc.fix or "use '0.5MiB', '2%', 'rank=8' or 'keep'") from None
    labels = [token for token, _ in parsed]
    duplicates = sorted({t for t in labels if labels.count(t) > 1})
    if duplicates:
        raise LoraError(f"sweep targets repeat: {', '.join(duplicates)}", fix="list each target once")
    return parsed


class ResizeLoRASweep:
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_TYPE, "STRING", "STRING")
    RETURN_NAMES = ("loras", "labels", "report")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = ("One resized LoRA per target (a list: the nodes after this run once per target).",
                       "A label per target: target, MiB, LoRA error.", "Every target's report.")
    FUNCTION = "sweep"
    DESCRIPTION = ("Resizes one LoRA to several targets (sizes in MiB, error budgets in %, ranks), decomposing "
                   "it once. Wire the list into Apply LoRA -> sampler -> VAE Decode -> Compare Images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to resize."}),
            "targets": ("STRING", {"default": "keep, 5%, 20%, rank=4", "multiline": False,
                                   "tooltip": "Comma-separated: '0.5MiB' (file size), '2%' (whole-LoRA error "
                                              "budget, err=), 'rank=8', 'keep' (nothing dropped), or any recipe "
                                              "selection token (thr=-3, sv_knee=1)."}),
            "scoring": ("STRING", {"default": "spn_lora=1", "tooltip": "Scoring methods for size and % "
                                   "targets (recipe grammar, e.g. fro_ckpt=1 with a MODEL connected)."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The base model, for fro_ckpt/spn_ckpt/subspace scoring."}),
            "clip": ("CLIP", {"tooltip": "The base text encoder(s)."}),
        }}

    def sweep(self, lora: ResizableLora, targets: str, scoring: str, model=None, clip=None):
        plans = parse_targets(targets, scoring)
        resizer = ResizeLoRA()
        loras, labels, reports, charts = [], [], [], []
        for token, recipe in plans:
            output = resizer.resize(lora, recipe, model, clip)  # the decomposition is cached on ``lora``
            resized, report = output["result"]
            chart = output["ui"]["lora_resize_chart"][0]
            label = f"{token}: {chart['size_after'] / 2**20:.3g} MiB, error {100 * chart['error']:.2f}%"
            resized.sweep_label = label
            loras.append(resized)
            labels.append(label)
            reports.append(report)
            charts.append({"target": token, "mib": chart["size_after"] / 2**20, "error": chart["error"],
                           "rank": sum(b["kept"] for b in chart["blocks"])})
        return {"ui": {"lora_resize_sweep": charts}, "result": (loras, labels, "\n\n".join(reports))}

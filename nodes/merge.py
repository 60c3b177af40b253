"""MergeLoRAs: an exact weighted sum (concat) or a switchable join of two to four LoRAs."""
from __future__ import annotations

import math

from ..core.errors import LoraError
from ..core.merge import merge
from .lora_type import CATEGORY, LORA_TYPE, ResizableLora

_WEIGHT = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                     "tooltip": "Weight of this LoRA in the sum; negative subtracts it."})


class MergeLoRAs:
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    FUNCTION = "merge"
    DESCRIPTION = ("Sums LoRAs exactly by concatenating their factors (any ranks, negative weights). "
                   "'join' also records each source so it can be switched off later.")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in (3, 4):
            optional[f"lora_{i}"] = (LORA_TYPE, {"tooltip": f"Optional LoRA number {i}."})
            optional[f"weight_{i}"] = _WEIGHT
        return {"required": {
            "lora_1": (LORA_TYPE, {"tooltip": "First LoRA."}),
            "weight_1": _WEIGHT,
            "lora_2": (LORA_TYPE, {"tooltip": "Second LoRA."}),
            "weight_2": _WEIGHT,
            "mode": (["concat", "join"], {"tooltip": "concat: the exact sum. join: the same sum, with each "
                                                     "source's rank segment recorded so it can be toggled."}),
        }, "optional": optional}

    def merge(self, lora_1, weight_1, lora_2, weight_2, mode, lora_3=None, weight_3=1.0, lora_4=None,
              weight_4=1.0):
        pairs = ((lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3), (lora_4, weight_4))
        for index, (member, weight) in enumerate(pairs, 1):
            # an API prompt can carry NaN past ComfyUI's min/max checks (NaN compares false)
            if member is not None and (not isinstance(weight, (int, float)) or not math.isfinite(weight)):
                raise LoraError(f"merge weight_{index} is {weight!r}, not a finite number", file=member.label,
                                fix=f"set weight_{index} to a finite number between -10 and 10")
        members = [(l, w) for l, w in pairs if l is not None]
        merged = merge([(m.lora, w) for m, w in members], join=(mode == "join"))
        sources = [dict(s, weight=w) for m, w in members for s in m.sources]
        label = " + ".join(f"{w:g}×{m.label}" for m, w in members)
        return (ResizableLora(merged, sources, label, operation=f"merge({mode})+resize"),)

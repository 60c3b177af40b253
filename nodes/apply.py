"""ApplyLoRA: put any LoRA on MODEL/CLIP, to compare original and resized in one graph before saving."""
from __future__ import annotations

import math

import comfy.sd

from ..core.errors import LoraError
from ..core.formats import to_state_dict
from .lora_type import CATEGORY, LORA_TYPE


class ApplyLoRA:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    DESCRIPTION = "Applies a LoRA from this pack (original, resized or merged) like LoraLoader does."

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch."}),
            "clip": ("CLIP", {"tooltip": "The text encoder to patch."}),
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to apply."}),
            "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly to modify the diffusion model."}),
            "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly to modify the text encoder."}),
        }}

    def apply(self, model, clip, lora, strength_model, strength_clip):
        for name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
            if not isinstance(value, (int, float)) or not math.isfinite(value):  # NaN passes ComfyUI's min/max
                raise LoraError(f"{name} is {value!r}, not a finite number", file=lora.label,
                                fix=f"set {name} to a finite number between -100 and 100")
        state_dict, _ = to_state_dict(lora.lora, "comfy")
        return comfy.sd.load_lora_for_models(model, clip, state_dict, strength_model, strength_clip)

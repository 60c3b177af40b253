"""SaveLoRA: write into the loras folder, never overwriting, so LoraLoader lists it at once."""
from __future__ import annotations

import os

from ..core.errors import LoraError
from ..core.formats import parse_dtype, write_lora
from .host import refresh_lora_list, save_folder
from .lora_type import CATEGORY, LORA_TYPE
from .save_path import RULE, folder_error


class SaveLoRA:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    DESCRIPTION = "Saves a LoRA into the loras folder (a counter keeps every earlier file). " + RULE

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (LORA_TYPE, {"tooltip": "The LoRA to save."}),
            "filename_prefix": ("STRING", {"default": "resized/lora", "tooltip": "Subfolder/name inside the "
                                                                                 "loras folder. " + RULE}),
            "format": (["kohya", "peft", "comfy", "keep"], {"tooltip": "kohya loads everywhere; peft for "
                                                                      "diffusers; comfy is ComfyUI's own naming; "
                                                                      "keep writes every layer under the names it "
                                                                      "was read with (any model family)."}),
            "dtype": (["fp16", "bf16", "fp32"], {"tooltip": "Precision of the saved factors."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        """Refuse a bad prefix when the prompt is queued, before any node runs (a linked prefix: at save)."""
        if not isinstance(filename_prefix, str):
            return True
        try:
            save_folder(filename_prefix)
        except LoraError as exc:
            return str(exc)
        return True

    def save(self, lora, filename_prefix: str, format: str, dtype: str):
        folder, stem = save_folder(filename_prefix)
        try:
            os.makedirs(folder, exist_ok=True)
            counter = 1
            while True:
                path = os.path.join(folder, f"{stem}_{counter:05}_.safetensors")
                if not os.path.lexists(path):  # a dangling symlink is taken too: never written through
                    break
                counter += 1
            extra = {"threshold": getattr(lora, "threshold", None)}
            size = write_lora(lora.lora, path, convention=format, dtype=parse_dtype(dtype), operation=lora.operation,
                              recipe=getattr(lora, "recipe_text", None), sources=lora.sources,
                              extra_provenance=extra)
        except OSError as exc:  # a read-only or full folder, a file in the way: named, never a raw OS error
            raise folder_error(folder, exc) from exc
        refresh_lora_list()
        text = f"{path} ({size / 2**20:.2f} MiB)"
        return {"ui": {"text": [text]}, "result": (path,)}

"""LoadLoRAForResize: a LoRA from the loras folders, read into the pack's model."""
from __future__ import annotations

import os

import folder_paths

from ..core.errors import LoraError
from ..core.formats import read_lora
from ..core.inspect import format_summary, summarize
from ..core.safetensors_io import StreamDigest
from .host import lora_path
from .lora_type import CATEGORY, LORA_TYPE, ResizableLora


class LoadLoRAForResize:
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_TYPE, "STRING")
    RETURN_NAMES = ("lora", "summary")
    OUTPUT_TOOLTIPS = ("The LoRA, ready to merge, resize or apply.", "What the file holds.")
    FUNCTION = "load"
    DESCRIPTION = "Reads a LoRA file of any common format (kohya, LyCORIS, PEFT/diffusers, ComfyUI) for resizing."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A file in your loras folders."}),
        }}

    def load(self, lora_name: str):
        path = lora_path(lora_name)
        try:
            digest = StreamDigest()  # the hash of the very bytes read, in the same pass
            lora = read_lora(path, digest=digest)
            sources = [{"file": os.path.basename(path), "sha256": digest.hexdigest()}]
        except OSError as exc:  # unreadable, vanished, a folder: the pack's error, never a raw OS one
            raise LoraError(f"cannot read the file: {exc.strerror or exc}", file=lora_name,
                            fix="check that it exists and is readable, then pick it again") from exc
        return (ResizableLora(lora, sources, lora_name), format_summary(summarize(lora)))

"""comfyui-lora-resize core: read, decompose, score, select and write LoRAs. No ComfyUI imports.

The public surface is small on purpose (like safetensors'): read a LoRA, resize it with a recipe,
merge several, write the result.
"""
__version__ = "0.1.0"

from .errors import LoraError  # noqa: E402
from .formats import read_lora, write_lora  # noqa: E402
from .model import Layer, LoraFile  # noqa: E402

__all__ = ["LoraError", "Layer", "LoraFile", "read_lora", "write_lora", "__version__"]

"""comfyui-lora-resize core: read, decompose, score, select and write LoRAs. No ComfyUI imports.

The public surface is small on purpose (like safetensors'): read a LoRA, resize it with a recipe,
merge several, write the result.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

if "torch" not in _sys.modules:  # we load torch (the CLI, batch workers): not inside ComfyUI, which has
    # OpenMP threads that sleep at once when idle instead of spinning: on a shared 2-core VM the spinning
    # threads of one op starved the next (a 2-thread fp16 sum ran 80x slower than with this; -20 % on a
    # whole 3-LoRA SDXL run); an explicit setting is kept
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import LoraError  # noqa: E402
from .formats import read_lora, write_lora  # noqa: E402
from .model import Layer, LoraFile  # noqa: E402

__all__ = ["LoraError", "Layer", "LoraFile", "read_lora", "write_lora", "__version__"]

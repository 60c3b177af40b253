"""ComfyUI nodes: thin declarations over core/. Ids are prefixed so they never collide with the host's."""
from .apply import ApplyLoRA
from .compare import CompareImages
from .folder import ResizeLoRAFolder
from .load import LoadLoRAForResize
from .merge import MergeLoRAs
from .recipe import ScoreRecipe
from .resize import ResizeLoRA
from .save import SaveLoRA
from .sweep import ResizeLoRASweep

_NODES = {
    "LoadLoRAForResize": (LoadLoRAForResize, "Load LoRA For Resize"),
    "MergeLoRAs": (MergeLoRAs, "Merge LoRAs (exact)"),
    "ScoreRecipe": (ScoreRecipe, "LoRA Resize Recipe"),
    "ResizeLoRA": (ResizeLoRA, "Resize LoRA"),
    "SaveLoRA": (SaveLoRA, "Save LoRA (resized)"),
    "ApplyLoRA": (ApplyLoRA, "Apply LoRA (resize pack)"),
    "ResizeLoRAFolder": (ResizeLoRAFolder, "Resize LoRA Folder"),
    "ResizeLoRASweep": (ResizeLoRASweep, "Resize LoRA Sweep"),
    "CompareImages": (CompareImages, "Compare Images (LoRA resize)"),
}
NODE_CLASS_MAPPINGS = {f"LoraResize_{name}": cls for name, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {f"LoraResize_{name}": title for name, (_, title) in _NODES.items()}

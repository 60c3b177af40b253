"""LoRA file formats: one reader for every convention, one writer per output convention."""
from .reader import layer_key, lora_from_state_dict, read_lora
from .writer import checked_cast, parse_dtype, to_state_dict, write_lora

__all__ = ["read_lora", "lora_from_state_dict", "layer_key", "write_lora", "to_state_dict", "parse_dtype",
           "checked_cast"]

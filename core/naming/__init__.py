"""Layer names: any producer's key prefix <-> the canonical name (ComfyUI's model key, no ``.weight``).

Canonical names: ``diffusion_model.<the model's ComfyUI path>`` for the UNet/transformer,
``clip_l.transformer.text_model...``, ``clip_g.transformer.text_model...`` and
``t5xxl.transformer.encoder...`` for text encoders. Producer prefixes (``lora_unet_``, ``transformer.``,
``diffusion_model.``, ``lora_te1_`` ...) are stripped here; what the path means is up to the model family
(``core.naming.families``: one module per family, registered in one list).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

from . import flux, unet_sd
from .families import FAMILIES, Family, detect, family
from .families.base import Shapes
from .kohya import underscored
from .target import Parts, Target

ARCHITECTURES = tuple(f.name for f in FAMILIES)
ENCODERS = ("clip_l", "clip_g", "t5xxl")  # encoders with tables; others keep ComfyUI's generic text_encoders. names
_UNET_UNDERSCORED = ("lora_unet_", "lycoris_", "lora_transformer_")
_UNET_DOTTED = ("unet.base_model.model.", "base_model.model.", "unet.", "transformer.")  # longest first


def _encoder_target(encoder: str, path: str) -> Optional[Target]:
    if encoder == "t5xxl":
        return Target(f"t5xxl.transformer.{path}") if path.startswith("encoder.") or path == "shared" else None
    if path.startswith("encoder.layers.") or path == "final_layer_norm":
        path = f"text_model.{path}"  # transformers 5 / PEFT without the text_model wrapper
    if path.startswith(("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm")) \
            or path == "text_projection":  # T5's encoder.block.N under a CLIP prefix is no CLIP weight
        return Target(f"{encoder}.transformer.{path}")
    return None


def to_canonical(prefix: str, arch: str) -> Optional[Target]:
    """The weight a LoRA key prefix changes; None when the prefix names nothing we know."""
    fam = family(arch)
    if prefix.startswith("diffusion_model."):
        return fam.unet_target(prefix[len("diffusion_model."):])
    if prefix.startswith("text_encoders."):
        encoder, _, path = prefix[len("text_encoders."):].partition(".transformer.")
        return _encoder_target(encoder, path) if encoder in ENCODERS else None
    for te_prefix, encoder in fam.encoders.items():
        if prefix.startswith(te_prefix):
            rest = prefix[len(te_prefix):]
            return _encoder_target(encoder, rest if te_prefix.endswith(".") else fam.dotted(rest))
    for unet_prefix in _UNET_UNDERSCORED:
        if prefix.startswith(unet_prefix):  # Wan Fun writes lora_unet__blocks_0_... (ComfyUI's convert_lora)
            return fam.unet_target(fam.dotted(prefix[len(unet_prefix):].lstrip("_")))
    for unet_prefix in _UNET_DOTTED:
        if prefix.startswith(unet_prefix):
            return fam.unet_target(prefix[len(unet_prefix):])
    return fam.unet_target(prefix)


def from_canonical(name: str, arch: str, convention: str) -> str:
    """The key prefix of a canonical weight in an output convention ("kohya", "peft", "comfy")."""
    fam = family(arch)
    if name.startswith("diffusion_model."):
        return name if convention == "comfy" else fam.unet_prefix(name[len("diffusion_model."):], convention)
    if convention == "comfy":
        return f"text_encoders.{name}"
    fam.check_output(convention)
    encoder, _, path = name.partition(".transformer.")
    prefix = fam.encoder_out.get(convention, {}).get(encoder)
    if prefix is None:  # no trainer name for this encoder here: ComfyUI's generic one loads
        return f"text_encoders.{name}"
    return prefix + (path if prefix.endswith(".") else underscored(path))


def swapped_halves(name: str, convention: str, arch: str = "unknown", shape: Optional[tuple[int, ...]] = None) -> bool:
    """Whether ``convention`` names this canonical weight (of ``shape``, where the family needs it) by a module
    whose output halves are swapped."""
    if not name.startswith("diffusion_model."):
        return False
    fam = family(arch)
    path = name[len("diffusion_model."):]
    if fam is family(None):  # no family: Flux's swap, as every classic file was read
        return family("flux").swapped(path, convention, shape)
    return fam.swapped(path, convention, shape)


def split_parts(name: str, arch: str, convention: str) -> Optional[Parts]:
    """For a fused weight the convention names only by parts (Flux qkv/linear1 in PEFT): its parts."""
    if not name.startswith("diffusion_model."):
        return None
    fam = family(arch)
    if fam is family(None) or fam.name in ("sd15", "sdxl"):  # classic files: Flux's parts whatever the arch
        fam = family("flux")
    return fam.split_parts(name[len("diffusion_model."):], convention)


def fused_rows(name: str, arch: str, offsets: Sequence[tuple[int, int, int]], columns: int) -> Optional[int]:
    """Height of a fused weight whose row slices (``offsets``) are placed by rows alone, or None if unknown."""
    if not name.startswith("diffusion_model."):
        return None
    return family(arch).fused_rows(name[len("diffusion_model."):], offsets, columns)


def check_output(arch: str, convention: str) -> None:
    """Refuse an output convention ComfyUI cannot load for this architecture's family, naming both."""
    family(arch).check_output(convention)


def diffusion_roots() -> tuple[str, ...]:
    """First components of every registered family's diffusion-model paths (a bare diffusion-model file's keys,
    as ComfyUI's UNETLoader takes it, start with one of these)."""
    roots = {root for fam in FAMILIES for root in fam.roots}
    return tuple(sorted(roots | set(flux.BFL_ROOTS) | set(unet_sd.SGM_ROOTS)))


def diffusers_family(class_names: Iterable[str]) -> Optional[str]:
    """The registered family whose diffusers model or pipeline class is one of ``class_names``."""
    names = set(class_names)
    return next((fam.name for fam in FAMILIES if names & set(fam.diffusers_classes)), None)


# --- architecture detection --------------------------------------------------------------------

def original_base_family(keys: Iterable[str]) -> Optional[Family]:
    """The family whose original release names a base's diffusion-model keys (no prefix) are in, if any."""
    keys = list(keys)
    for fam in FAMILIES:
        if fam.original_base and any(re.search(fam.original_base, key) for key in keys):
            return fam
    return None


def detect_architecture(prefixes: Iterable[str], metadata: Mapping[str, str],
                        shapes: Optional[Shapes] = None) -> str:
    """A registered family name or "unknown", from layer names and widths, then trainer metadata."""
    names = list(prefixes)
    found = detect(names, metadata, shapes or {})
    if found is not None:
        return found.name
    if any(n.startswith("lora_te_") or n.startswith("lora_unet_down_blocks") for n in names):
        return "sd15"
    return "unknown"


__all__ = ["ARCHITECTURES", "Family", "Target", "check_output", "detect_architecture", "diffusers_family",
           "diffusion_roots", "family", "from_canonical", "fused_rows", "original_base_family", "split_parts",
           "swapped_halves", "to_canonical"]

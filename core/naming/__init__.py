"""Layer names: any producer's key prefix <-> the canonical name (ComfyUI's model key, no ``.weight``).

Canonical names: ``diffusion_model.<SGM or BFL path>`` for the UNet/transformer,
``clip_l.transformer.text_model...``, ``clip_g.transformer.text_model...`` and
``t5xxl.transformer.encoder...`` for text encoders. Conventions are tables of prefixes; block
names are converted by rule (``unet_sd``, ``flux``) or by vocabulary (``kohya``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from ..errors import LoraError
from . import flux, unet_sd
from .kohya import dotted, underscored

ARCHITECTURES = ("sd15", "sdxl", "flux")


@dataclass(frozen=True)
class Target:
    """A canonical weight name and, for a layer of a fused weight, its row slice in height units."""

    name: str
    part: Optional[tuple[int, int]] = None
    swap_halves: bool = False  # the file's output rows are the canonical ones with their halves swapped


# Text-encoder prefixes -> canonical encoder per architecture ("*" = any).
_TE_PREFIXES: dict[str, dict[str, str]] = {
    "lora_te_": {"*": "clip_l"},
    "lora_te1_": {"*": "clip_l"},
    "lora_te2_": {"flux": "t5xxl", "*": "clip_g"},
    "text_encoder.": {"*": "clip_l"},
    "text_encoder_2.": {"flux": "t5xxl", "*": "clip_g"},
}
# Canonical encoder -> prefix, per output convention and architecture.
_TE_OUT: dict[str, dict[str, dict[str, str]]] = {
    "kohya": {"clip_l": {"sd15": "lora_te_", "*": "lora_te1_"}, "clip_g": {"*": "lora_te2_"},
              "t5xxl": {"*": "lora_te2_"}},
    "peft": {"clip_l": {"*": "text_encoder."}, "clip_g": {"*": "text_encoder_2."},
             "t5xxl": {"*": "text_encoder_2."}},
}
_UNET_UNDERSCORED = ("lora_unet_", "lycoris_", "lora_transformer_")
_UNET_DOTTED = ("unet.", "transformer.", "base_model.model.", "unet.base_model.model.")


def _by_arch(table: Mapping[str, str], arch: str) -> str:
    return table.get(arch, table["*"])


def _encoder_target(encoder: str, path: str) -> Optional[Target]:
    if encoder == "t5xxl":
        return Target(f"t5xxl.transformer.{path}") if path.startswith("encoder.") or path == "shared" else None
    if path.startswith("encoder.") or path == "final_layer_norm":
        path = f"text_model.{path}"  # transformers 5 / PEFT without the text_model wrapper
    if path.startswith("text_model.") or path == "text_projection":
        return Target(f"{encoder}.transformer.{path}")
    return None


def _unet_target(path: str, arch: str) -> Optional[Target]:
    """A dotted UNet/transformer path in any of SGM, BFL, diffusers SD or diffusers Flux naming."""
    path = path.replace(".processor.", ".")
    if re.search(r"\.to_out$", path):  # old attention processors name to_out.0 "to_out"
        path += ".0"
    if path.startswith(unet_sd.SGM_ROOTS):
        return Target(f"diffusion_model.{path}")
    if path.startswith(flux.BFL_ROOTS):
        name, part = flux.bfl_slice(path)
        return Target(f"diffusion_model.{name}", part)
    if path in flux.SWAPPED:
        return Target(f"diffusion_model.{flux.SWAPPED[path]}", swap_halves=True)
    if path.startswith(flux.DIFFUSERS_ROOTS) and (arch == "flux" or not path.startswith("proj_out")):
        mapped = flux.to_bfl(path)
        return Target(f"diffusion_model.{mapped[0]}", mapped[1]) if mapped else None
    if path.startswith(unet_sd.DIFFUSERS_ROOTS):
        sgm = unet_sd.to_sgm(path, arch)
        return Target(f"diffusion_model.{sgm}") if sgm else None
    return None


def to_canonical(prefix: str, arch: str) -> Optional[Target]:
    """The weight a LoRA key prefix changes; None when the prefix names nothing we know."""
    if prefix.startswith("diffusion_model."):
        return _unet_target(prefix[len("diffusion_model."):], arch)
    if prefix.startswith("text_encoders."):
        rest = prefix[len("text_encoders."):]
        encoder, _, path = rest.partition(".transformer.")
        return _encoder_target(encoder, path) if encoder in ("clip_l", "clip_g", "t5xxl") else None
    for te_prefix, encoders in _TE_PREFIXES.items():
        if prefix.startswith(te_prefix):
            rest = prefix[len(te_prefix):]
            path = rest if te_prefix.endswith(".") else dotted(rest)
            return _encoder_target(_by_arch(encoders, arch), path)
    for unet_prefix in _UNET_UNDERSCORED:
        if prefix.startswith(unet_prefix):
            return _unet_target(dotted(prefix[len(unet_prefix):]), arch)
    for unet_prefix in sorted(_UNET_DOTTED, key=len, reverse=True):
        if prefix.startswith(unet_prefix):
            return _unet_target(prefix[len(unet_prefix):], arch)
    return _unet_target(prefix, arch)


def _unet_out(path: str, arch: str, convention: str) -> str:
    if convention == "kohya":
        if arch == "sd15":
            diffusers = unet_sd.to_diffusers(path)
            if diffusers:
                return "lora_unet_" + underscored(diffusers)
        return "lora_unet_" + underscored(path)
    if arch == "flux" or path.startswith(flux.BFL_ROOTS):
        diffusers = flux.to_diffusers(path)
        if diffusers:
            return f"transformer.{diffusers}"
    else:
        diffusers = unet_sd.to_diffusers(path)
        if diffusers:
            return f"unet.{diffusers}"
    raise LoraError(f"{path} has no {convention} name", layer=f"diffusion_model.{path}",
                    fix="write this LoRA in kohya or ComfyUI format")


def from_canonical(name: str, arch: str, convention: str) -> str:
    """The key prefix of a canonical weight in an output convention ("kohya", "peft", "comfy")."""
    if name.startswith("diffusion_model."):
        path = name[len("diffusion_model."):]
        return name if convention == "comfy" else _unet_out(path, arch, convention)
    encoder, _, path = name.partition(".transformer.")
    if convention == "comfy":
        return f"text_encoders.{name}"
    prefix = _by_arch(_TE_OUT[convention][encoder], arch)
    if convention == "kohya":
        return prefix + underscored(path)
    return prefix + path


def swapped_halves(name: str, convention: str) -> bool:
    """Whether ``convention`` names this canonical weight by a module whose output halves are swapped."""
    return convention == "peft" and name.startswith("diffusion_model.") and \
        name[len("diffusion_model."):] in flux.SWAPPED.values()


def split_parts(name: str, arch: str, convention: str) -> Optional[list[tuple[str, tuple[int, int]]]]:
    """For a fused weight the convention names only by parts (Flux qkv/linear1 in PEFT): its parts."""
    if convention != "peft" or not name.startswith("diffusion_model."):
        return None
    found = flux.parts(name[len("diffusion_model."):])
    return [(f"transformer.{p}", part) for p, part in found] if found else None


# --- architecture detection --------------------------------------------------------------------

_FLUX_MARKS = ("double_blocks", "single_blocks", "single_transformer_blocks", "transformer.transformer_blocks",
               "lora_transformer_transformer_blocks")
_SDXL_MARKS = ("lora_te2_", "text_encoder_2.", "clip_g.", "up_blocks.0.attentions", "up_blocks_0_attentions",
               "transformer_blocks.1.", "transformer_blocks_1_", "input_blocks.4.1.transformer_blocks.1",
               "label_emb")
_SD15_MARKS = ("down_blocks.0.attentions", "down_blocks_0_attentions", "input_blocks.1.1.", "input_blocks_1_1_",
               "input_blocks.10.", "input_blocks_10_", "up_blocks.3.attentions", "up_blocks_3_attentions")
_METADATA_ARCH = (("flux", "flux"), ("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("sd_v1", "sd15"),
                  ("stable-diffusion-v1", "sd15"))


def detect_architecture(prefixes: Iterable[str], metadata: Mapping[str, str]) -> str:
    """"sd15", "sdxl", "flux" or "unknown", from layer names first, then trainer metadata."""
    names = list(prefixes)
    text = "\n".join(names)
    if any(mark in text for mark in _FLUX_MARKS):
        return "flux"
    if any(mark in text for mark in _SDXL_MARKS):
        return "sdxl"
    if any(mark in text for mark in _SD15_MARKS):
        return "sd15"
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = str(metadata.get(key, "")).lower()
        for needle, arch in _METADATA_ARCH:
            if value.startswith(needle):
                return arch
    if any(n.startswith("lora_te_") or n.startswith("lora_unet_down_blocks") for n in names):
        return "sd15"
    return "unknown"


__all__ = ["ARCHITECTURES", "Target", "detect_architecture", "to_canonical", "from_canonical", "split_parts",
           "swapped_halves"]

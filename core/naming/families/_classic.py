"""The rules SD1.5, SDXL and Flux share: each reads the others' names (SGM, BFL, diffusers SD, diffusers Flux),
so a file of one read under another's architecture (or "unknown") still maps as it always did."""
from __future__ import annotations

import re
from typing import Optional

from ...errors import LoraError
from .. import flux, unet_sd
from ..kohya import underscored
from ..target import Target


def unet_target(path: str, arch: str) -> Optional[Target]:
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


def unet_prefix(path: str, arch: str, convention: str, kohya_diffusers: bool = False) -> str:
    """kohya: ``lora_unet_`` + the path (diffusers block names where ``kohya_diffusers``, as sd-scripts writes
    SD1.5); comfy: ``diffusion_model.`` + path; peft: diffusers Flux names under ``transformer.`` for BFL paths,
    diffusers UNet names under ``unet.`` otherwise."""
    if convention == "comfy":
        return f"diffusion_model.{path}"
    if convention == "kohya":
        if kohya_diffusers:
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

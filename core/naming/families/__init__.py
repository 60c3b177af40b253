"""The registry of model families: one module each, one line each in ``FAMILIES`` (as comfy/weight_adapter/).

Adding a family: a module with a :class:`~core.naming.families.base.Family` subclass and its tables, and its
``FAMILY`` in the list below; ``--arch``, detection and the output checks pick it up from here.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from . import (
    chroma,
    flux,
    hidream,
    hunyuan_video,
    ltxv,
    lumina2,
    qwen_image,
    sd3,
    sd15,
    sdxl,
    sdxl_refiner,
    wan,
)
from .base import Family, Shapes
from .generic import GENERIC

# Order breaks ties in detection: earlier families win an equal score.
FAMILIES: list[Family] = [
    sd15.FAMILY,
    sdxl.FAMILY,
    sdxl_refiner.FAMILY,
    flux.FAMILY,
    chroma.FAMILY,
    sd3.FAMILY,
    wan.FAMILY,
    qwen_image.FAMILY,
    hunyuan_video.FAMILY,
    ltxv.FAMILY,
    hidream.FAMILY,
    lumina2.FAMILY,
]
BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}
METADATA_KEYS = ("ss_base_model_version", "modelspec.architecture")
METADATA_BONUS = 25  # trainer metadata decides between families that share layout marks, never over unique ones


def family(name: Optional[str]) -> Family:
    """The family of an architecture name; the generic rules for "unknown" (or None)."""
    return BY_NAME.get(name or "", GENERIC)


def metadata_family(metadata: Mapping[str, str]) -> Optional[Family]:
    """The family trainer metadata names (longest matching start wins), if any."""
    best, length = None, 0
    for key in METADATA_KEYS:
        value = str(metadata.get(key, "")).lower()
        if not value:
            continue
        for candidate in FAMILIES:
            found = candidate.matches_metadata(value)
            if found > length:
                best, length = candidate, found
    return best


def detect(names: Sequence[str], metadata: Mapping[str, str], shapes: Shapes) -> Optional[Family]:
    """The best-scoring family for these LoRA key prefixes (and widths, and metadata); None if none scores."""
    named = metadata_family(metadata)
    best, top = None, 0.0
    for candidate in FAMILIES:
        score = candidate.score(names, shapes) + (METADATA_BONUS if candidate is named else 0)
        if score > top:
            best, top = candidate, score
    return best


__all__ = ["BY_NAME", "FAMILIES", "Family", "detect", "family", "metadata_family"]

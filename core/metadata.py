"""Output metadata: keep what trainers and UIs read, add our provenance, recompute sd-scripts' hashes."""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping, Optional

from . import __version__
from .model import LoraFile

PROVENANCE_KEY = "lora_resize"
_KEPT_PREFIXES = ("ss_", "modelspec.")
_STALE = ("sshs_model_hash", "sshs_legacy_hash")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sd_scripts_hashes(tensors, ss_metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts' precalculate_safetensors_hashes computes them.

    Both are taken over the file as it would be written with only the ``ss_*`` metadata: the model
    hash is the sha256 of everything after the header, the legacy hash the first 8 hex digits of
    the sha256 of the 64 KiB at offset 1 MiB. Computed from the tensors without serializing them.
    """
    from .safetensors_io import data_chunks, header_size

    window_start = 0x100000 - header_size(tensors, ss_metadata)
    window_end = window_start + 0x10000
    model, legacy = hashlib.sha256(), hashlib.sha256()
    position = 0
    for chunk in data_chunks(tensors):
        model.update(chunk)
        size = len(chunk)
        low, high = max(window_start, position), min(window_end, position + size)
        if low < high:
            legacy.update(memoryview(chunk)[low - position:high - position])
        position += size
    return model.hexdigest(), legacy.hexdigest()[:8]


def kept_metadata(source: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in source.items() if k.startswith(_KEPT_PREFIXES) and k not in _STALE}


def output_metadata(lora: LoraFile, *, operation: str, recipe: Optional[str] = None,
                    sources: Iterable[Mapping[str, str]] = (), extra: Optional[Mapping] = None) -> dict[str, str]:
    """Metadata for a written file: the source's ss_*/modelspec.*, updated dim/alpha, provenance."""
    meta = kept_metadata(lora.metadata)
    ranks = {name: layer.rank for name, layer in lora.layers.items() if layer.kind == "lora"}
    alphas = {layer.alpha for layer in lora.layers.values() if layer.kind == "lora"}
    if ranks:
        distinct = set(ranks.values())
        meta["ss_network_dim"] = str(distinct.pop()) if len(distinct) == 1 else "Dynamic"
        meta["ss_network_alpha"] = (str(float(alphas.pop())) if len(alphas) == 1 and None not in alphas
                                    else "Dynamic")
    provenance = {"tool": "comfyui-lora-resize", "version": __version__, "operation": operation,
                  "recipe": recipe, "sources": list(sources), "ranks": ranks}
    if extra:
        provenance.update(extra)
    meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return meta


def read_provenance(metadata: Mapping[str, str]) -> Optional[dict]:
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None

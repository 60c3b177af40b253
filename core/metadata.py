"""Output metadata: keep what trainers and UIs read, add our provenance, recompute sd-scripts' hashes."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

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


class SdScriptsHasher:
    """sd-scripts' two hashes, fed the data section chunk by chunk (as it is written).

    The model hash is the sha256 of everything after the header, the legacy hash the first 8 hex
    digits of the sha256 of the 64 KiB at offset 1 MiB of the file holding only ``ss_*`` metadata;
    ``header_len`` is that file's header size.
    """

    def __init__(self, header_len: int):
        self.window = (0x100000 - header_len, 0x100000 - header_len + 0x10000)
        self.model, self.legacy = hashlib.sha256(), hashlib.sha256()
        self.position = 0

    def update(self, chunk) -> None:
        self.model.update(chunk)
        size = len(chunk)
        low, high = max(self.window[0], self.position), min(self.window[1], self.position + size)
        if low < high:
            self.legacy.update(memoryview(chunk)[low - self.position:high - self.position])
        self.position += size

    def digests(self) -> tuple[str, str]:
        return self.model.hexdigest(), self.legacy.hexdigest()[:8]


def kept_metadata(source: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in source.items() if k.startswith(_KEPT_PREFIXES) and k not in _STALE}


def output_metadata(lora: LoraFile, *, operation: str, recipe: str | None = None,
                    sources: Iterable[Mapping[str, str]] = (), extra: Mapping | None = None) -> dict[str, str]:
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


def read_provenance(metadata: Mapping[str, str]) -> dict | None:
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None

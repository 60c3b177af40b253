"""What is in a LoRA file, as a dict (for --json and the node's summary) and as text."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Mapping

from .metadata import read_provenance
from .model import LoraFile


def _provenance(meta: Mapping[str, str]) -> dict | None:
    """Our provenance record, or a marker when someone else's tool left text there that is not one:
    metadata is the file author's text, and a summary must not fail on it."""
    try:
        prov = read_provenance(meta)
    except (ValueError, RecursionError):
        prov = []
    if prov is None or isinstance(prov, dict):
        return prov
    return {"unreadable": True}


def summarize(lora: LoraFile) -> dict[str, Any]:
    """Family, architecture, per-layer rank/alpha/scale/shape, histograms, dtypes, bytes, metadata.

    ``layer_count`` is what ComfyUI patches with the file (one per layer, per bias diff and per applied
    pass-through entry); ``lora_layers`` counts the layers alone, ``verbatim_layers`` those whose names no
    table knows (kept as read), ``passthrough`` the entries carried byte-exact."""
    layers = [
        {"name": name, "kind": layer.kind_label, "rank": layer.rank, "alpha": layer.alpha,
         "scale": layer.scale, "shape": list(layer.shape), "source_key": layer.source_key,
         "offset": list(layer.offset) if layer.offset else None, "verbatim": layer.verbatim}
        for name, layer in lora.layers.items()
    ]
    meta = lora.metadata
    return {
        "file": lora.path,
        "family": lora.family,
        "architecture": lora.architecture,
        "bytes": os.path.getsize(lora.path) if lora.path and os.path.exists(lora.path) else lora.nbytes(),
        "tensor_bytes": lora.nbytes(),
        "layer_count": lora.patched_targets(),
        "lora_layers": len(layers),
        "verbatim_layers": sum(1 for layer in layers if layer["verbatim"]),
        "passthrough": sorted(lora.passthrough),
        "kinds": dict(Counter(layer["kind"] for layer in layers)),
        "rank_histogram": {str(k): v for k, v in sorted(Counter(layer["rank"] for layer in layers).items())},
        "alphas": sorted({layer["alpha"] for layer in layers if layer["alpha"] is not None}),
        "dtypes": sorted({str(dtype).replace("torch.", "") for layer in lora for dtype in layer.dtypes()}
                         | {str(t.dtype).replace("torch.", "") for t in lora.passthrough.values()}),
        "unknown_keys": lora.unknown_keys,
        "metadata": {
            "keys": len(meta),
            "network_module": meta.get("ss_network_module"),
            "network_dim": meta.get("ss_network_dim"),
            "network_alpha": meta.get("ss_network_alpha"),
            "base_model": meta.get("ss_base_model_version") or meta.get("modelspec.architecture"),
            "title": meta.get("modelspec.title") or meta.get("ss_output_name"),
            "provenance": _provenance(meta),
        },
        "layers": layers,
    }


def format_summary(info: dict[str, Any]) -> str:
    mib = info["bytes"] / 2**20
    lines = [
        f"{info['file']}",
        f"  family {info['family']}, architecture {info['architecture']}, {info['lora_layers']} layers, "
        f"{mib:.2f} MiB, dtypes {', '.join(info['dtypes'])}",
        f"  patches {info['layer_count']} model tensors in ComfyUI",
        "  kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(info["kinds"].items())),
        "  ranks: " + ", ".join(f"{k}×{v}" for k, v in info["rank_histogram"].items()),
        "  alphas: " + (", ".join(f"{a:g}" for a in info["alphas"][:8]) or "none (scale 1)")
        + (" ..." if len(info["alphas"]) > 8 else ""),
    ]
    meta = info["metadata"]
    described = {k: v for k, v in meta.items() if v and k not in ("keys", "provenance")}
    lines.append(f"  metadata: {meta['keys']} keys" + "".join(f", {k} {v}" for k, v in described.items()))
    if meta["provenance"] and meta["provenance"].get("unreadable"):
        lines.append("  provenance metadata is not a JSON object; ignored")
    elif meta["provenance"]:
        prov = meta["provenance"]
        lines.append(f"  made by {prov.get('tool')} {prov.get('version')}: {prov.get('operation')} "
                     f"{prov.get('recipe') or ''}".rstrip())
    if info["verbatim_layers"]:
        lines.append(f"  {info['verbatim_layers']} layers have names no table knows: kept as read (-f keep "
                     "writes them back; base-aware recipes cannot find their base weights)")
    if info["passthrough"]:
        shown = ", ".join(info["passthrough"][:3]) + (" ..." if len(info["passthrough"]) > 3 else "")
        lines.append(f"  {len(info['passthrough'])} entries carried as they are (not low-rank): {shown}")
    if info["unknown_keys"]:
        lines.append(f"  {len(info['unknown_keys'])} keys not understood: {', '.join(info['unknown_keys'][:5])}"
                     + (" ..." if len(info["unknown_keys"]) > 5 else ""))
    return "\n".join(lines)

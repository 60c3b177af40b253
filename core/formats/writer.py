"""Write a :class:`LoraFile` in kohya (default), PEFT/diffusers, ComfyUI naming, or ``keep`` (as read).

Every written file reads back to the same ΔW: a convention that cannot name a row slice (kohya,
ComfyUI) gets slice layers fused into one block layer of the fused weight; a convention that cannot
name the fused weight (PEFT for Flux) gets it split by rows. Both are exact.

Layers whose names no table knows (``Layer.verbatim``) keep their key prefix. In kohya format a
ComfyUI-style ``diffusion_model.X`` becomes ``lora_unet_`` + X with ``_`` for ``.`` (ComfyUI's generic
rule, mapped for every model); any other name a convention cannot spell without a table is refused
before anything is written (:func:`check_nameable`), naming the layers: ``-f keep`` writes them.
Pass-through entries (``LoraFile.passthrough``) are written under their own keys, byte-exact.
Before a file is moved into place it is read back and checked (``core.formats.readback``).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from .. import naming
from ..atomic import atomic_write
from ..delta import delta_weight, effective_down, tucker_half
from ..errors import LoraError
from ..metadata import SdScriptsHasher, output_metadata
from ..model import Layer, LoraFile
from ..values import all_finite
from ..safetensors_io import (
    StreamDigest,
    data_chunks,
    header_bytes,
    header_size,
    safetensors_size,
)
from .conventions import CONVENTIONS, NO_ALPHA_STYLES, Convention
from .readback import check_file, check_plan
from .shapes import swap_output_halves

log = logging.getLogger("lora_resize")
ALPHA_SUFFIX = ".alpha"
OUTPUT_DTYPES = {"fp16": torch.float16, "16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                 "32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float32": torch.float32}


def parse_dtype(text: str | None) -> torch.dtype | None:
    if text is None or text in ("", "keep", "same"):
        return None
    try:
        return OUTPUT_DTYPES[str(text).lower()]
    except KeyError:
        raise LoraError(f"unknown output dtype {text!r}", fix="use 16, bf16 or 32") from None


def value_range(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor in one pass; NaN propagates into both, so two finite numbers
    prove every value finite. fp8 is widened first (torch has no fp8 reductions; every fp8 value fits fp16)."""
    if tensor.numel() == 0:
        return 0.0, 0.0
    if tensor.element_size() == 1:
        tensor = tensor.to(torch.float16)
    low, high = torch.aminmax(tensor)
    return float(low), float(high)


def checked_cast(tensor: torch.Tensor, dtype: torch.dtype | None, *, layer: str, what: str,
                 cause: str | None = None) -> torch.Tensor:
    """``tensor`` at ``dtype`` (None: as it is), contiguous, refusing NaN/Inf and values ``dtype`` cannot hold.

    Checked where values are made (rebuilt factors) and where they are written, before any file is
    opened: fp16 tops out at 65504 (an alpha of 3e38, ``rescale=1e30`` or a merge weight of 1e7 gets
    there), bf16 at 3.39e38, and a cast past that is a silent Inf in the file. ``cause`` says how a
    non-finite value can arise at the caller (e.g. an overflow of fp32). A tensor that the cast turns
    all zeros (underflow) is only a warning: the file is valid, that layer just does nothing."""
    out = _cast(tensor, dtype)
    if out.is_meta or not out.is_floating_point():
        return out
    if out is tensor and all_finite(out):  # no cast: nothing can underflow, and finite is all to check
        return out
    low, high = value_range(out)
    if low == 0.0 == high and out is not tensor and out.numel() and any(value_range(tensor)):
        log.warning("%s: %s is all zeros at %s (its values underflow); save at fp32 to keep it", layer, what,
                    str(out.dtype).removeprefix("torch."))
    if math.isfinite(low) and math.isfinite(high):
        return out
    if out is not tensor and tensor.dtype != out.dtype:
        source_low, source_high = value_range(tensor)
        if math.isfinite(source_low) and math.isfinite(source_high):
            peak = max(-source_low, source_high)
            name = str(out.dtype).removeprefix("torch.")
            wider = "-t 32 (fp32)" if out.dtype == torch.bfloat16 else "-t bf16 or -t 32 (fp32)"
            raise LoraError(f"{what} has values up to {peak:.3g}, beyond {name}'s largest "
                            f"({torch.finfo(out.dtype).max:.5g})", layer=layer,
                            fix=f"save at a wider precision: {wider} on the command line, bf16/fp32 in Save LoRA "
                            "(or lower rescale=, the merge weights or the alpha)")
    raise LoraError(f"{what} holds NaN or Inf values" + (f" ({cause})" if cause else ""), layer=layer,
                    fix="lower rescale=, the merge weights or the alpha; if the source file holds them, it is "
                    "corrupt: re-download or re-train it")


def to_state_dict(lora: LoraFile, convention: str = "kohya", dtype: torch.dtype | None = None,
                  check: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (and convention-specific metadata) for ``lora`` in ``convention``.

    ``check``: every tensor must be finite at ``dtype`` (see :func:`checked_cast`); size estimates skip it."""
    tensors, meta, _ = planned_state_dict(lora, convention, dtype, check)
    return tensors, meta


def planned_state_dict(lora: LoraFile, convention: str = "kohya", dtype: torch.dtype | None = None,
                       check: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str], list[tuple[Layer, str]]]:
    """:func:`to_state_dict` plus the plan: each written layer (after fusing or splitting slices) and its
    key prefix, which is what the read-back check compares the file with."""
    def cast(tensor: torch.Tensor, layer: Layer, key: str) -> torch.Tensor:
        return checked_cast(tensor, dtype, layer=layer.name, what=key) if check else _cast(tensor, dtype)

    conv = _convention(convention)
    check_nameable(lora, convention)
    plan = _plan(lora, conv)
    tensors: dict[str, torch.Tensor] = {}
    peft_ranks: dict[str, dict[str, int]] = defaultdict(dict)
    for layer, prefix in plan:
        if _swapped_in_file(layer, conv, lora.architecture):
            layer = _with_output_halves_swapped(layer, prefix)
        if layer.kind == "lokr" and "t2" in layer.factors:
            layer = _lokr_tucker_folded(layer)
        factors = dict(layer.factors)
        if "mid" in factors and ("lora", "mid") not in conv.write:
            # no Tucker core in this format: fold it into down (exact), a plain LoCon of the same rank
            factors["down"] = effective_down(layer).reshape(layer.rank, *layer.shape[1:])
            del factors["mid"]
        suffix = _suffixes(layer, conv)
        alpha_in_tensor = conv.alpha_in_tensor and not (conv.name == "keep" and suffix("lora", "up") in NO_ALPHA_STYLES)
        if not alpha_in_tensor and layer.kind == "lora" and layer.scale != 1.0:
            baked = factors["up"].to(torch.float32) * layer.scale  # PEFT: bake the scale in
            factors["up"] = baked if conv.name != "keep" else baked.to(factors["up"].dtype)
        for role, tensor in factors.items():
            key = prefix + suffix(layer.kind, role)
            tensors[key] = cast(tensor, layer, key)
        # PEFT keeps a LoRA's alpha in metadata; LyCORIS kinds have no such place and keep `.alpha`
        if layer.alpha is not None and layer.kind != "full" and (alpha_in_tensor or layer.kind != "lora"):
            if check and not math.isfinite(layer.alpha):
                raise LoraError(f"alpha is {layer.alpha}", layer=layer.name, fix="the source file is corrupt: "
                                "re-download or re-train it")
            tensors[prefix + suffix(None, "alpha")] = _alpha_tensor(layer.alpha, dtype or _dtype_of(layer))
        if conv.name == "peft" and layer.kind == "lora":
            component, _, module = prefix.partition(".")
            peft_ranks[component][module] = layer.rank
        if layer.dora_scale is not None:
            tensors.update({k: cast(t, layer, k) for k, t in _dora_tensors(layer, prefix, conv, suffix).items()})
        if layer.bias_diff is not None:
            key = prefix + suffix(None, "diff_b")
            tensors[key] = cast(layer.bias_diff, layer, key)
    for key, tensor in lora.passthrough.items():
        if key in tensors:
            raise LoraError(f"the pass-through entry {key} has the name of a written layer's tensor", layer=key,
                            fix="write with -f keep, which keeps every name as it was read")
        tensors[key] = tensor.contiguous()  # byte-exact: never cast
    extra_meta = _peft_metadata(peft_ranks, lora) if peft_ranks else {}
    return tensors, extra_meta, plan


def _suffixes(layer: Layer, conv: Convention):
    """suffix(kind, role) for this layer: as read under ``keep``, else the convention's table."""
    read = (layer.suffixes or {}) if conv.name == "keep" else {}

    def suffix(kind: str | None, role: str) -> str:
        return read.get(role) or conv.write.get((kind, role)) or CONVENTIONS["kohya"].write[(kind, role)]
    return suffix


def _swapped_in_file(layer: Layer, conv: Convention, arch: str) -> bool:
    """Whether the written module's output halves are the canonical ones swapped (Flux norm_out.linear)."""
    if layer.verbatim:
        return False
    if conv.name == "keep":
        target = naming.to_canonical(layer.source_key, arch)
        return target is not None and target.swaps(layer.shape)
    return naming.swapped_halves(layer.name, conv.name, arch, layer.shape)


# --- names: canonical layers through the tables, verbatim layers by ComfyUI's generic rules ---------

_KOHYA_VERBATIM = ("lora_unet_", "lora_te", "text_encoders.")  # text_encoders.<name>.: ComfyUI's generic rule
_PEFT_VERBATIM = ("transformer.", "unet.", "text_encoder.", "text_encoder_2.", "text_encoders.")


def verbatim_prefix(layer: Layer, convention: str) -> str | None:
    """The key prefix of a layer no table names, in ``convention``; None where that needs a table."""
    key = layer.source_key
    if convention == "keep":
        return key
    if convention == "kohya":
        if key.startswith(_KOHYA_VERBATIM):
            return key
        if key.startswith("diffusion_model."):
            return "lora_unet_" + key[len("diffusion_model."):].replace(".", "_")
    if convention == "comfy" and key.startswith(("diffusion_model.", "text_encoders.")):
        return key
    if convention == "peft" and key.startswith(_PEFT_VERBATIM):
        return key
    return None


def check_nameable(lora: LoraFile, convention: str, label: str | None = None) -> None:
    """Refuse, before any work, a convention that cannot name some layers without a table: how many, which."""
    _convention(convention)
    if convention == "keep":
        return
    if any(not layer.verbatim for layer in lora):
        try:
            naming.check_output(lora.architecture, convention)
        except LoraError as exc:
            raise LoraError(exc.problem, file=label or lora.path, fix=exc.fix) from None
    bad = [layer.source_key for layer in lora if layer.verbatim and verbatim_prefix(layer, convention) is None]
    if not bad:
        return
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise LoraError(f"{len(bad)} of {len(lora)} layers have names no naming table knows for architecture "
                    f"{lora.architecture!r} ({shown}): converting them to {convention} format needs a table for "
                    "this model family", file=label or lora.path,
                    fix="write with -f keep (every layer under the names it was read with)"
                    + (", or -f kohya (ComfyUI's generic lora_unet_ names)"
                       if all(k.startswith("diffusion_model.") for k in bad) else ""))


def _plan(lora: LoraFile, conv: Convention) -> list[tuple[Layer, str]]:
    layers = list(lora.layers.values())
    if conv.name == "keep":
        return [(layer, layer.source_key) for layer in layers]
    out = [(layer, verbatim_prefix(layer, conv.name)) for layer in layers if layer.verbatim]
    return out + _fit_slices([layer for layer in layers if not layer.verbatim], lora.architecture, conv)


def _lokr_tucker_folded(layer: Layer) -> Layer:
    """LoKr with its Tucker core folded into a full second half (exact; LoKr's halves are small).

    ComfyUI 0.3.64 cannot apply ``lokr_t2`` under recent torch (its Kronecker product of the
    non-contiguous einsum result fails with a view error and the layer is silently skipped), so
    written files never carry it. A factored first half keeps the alpha/rank rule; with both
    halves full the host ignores alpha, so the scale is baked into the second half."""
    factors = {k: v for k, v in layer.factors.items() if k not in ("t2", "w2a", "w2b")}
    w2 = tucker_half(layer.factors["t2"].float(), layer.factors["w2a"].float(), layer.factors["w2b"].float())
    folded = replace(layer, factors={**factors, "w2": w2})
    factors["w2"] = (w2 * (layer.scale / folded.scale)).to(layer.factors["t2"].dtype).contiguous()
    return replace(folded, factors=factors)


def _with_output_halves_swapped(layer: Layer, prefix: str) -> Layer:
    """The layer as the convention's module sees it: output halves swapped (Flux norm_out.linear)."""
    half = layer.shape[0] // 2
    return replace(layer, factors=swap_output_halves(layer.kind, layer.factors, "<output>", prefix),
                   dora_scale=None if layer.dora_scale is None else torch.roll(layer.dora_scale, half, dims=0),
                   bias_diff=None if layer.bias_diff is None else torch.roll(layer.bias_diff, half, dims=0))


def _tensors_and_metadata(lora: LoraFile, convention: str, dtype: torch.dtype | None, operation: str,
                          recipe: str | None, sources: Iterable[Mapping[str, str]],
                          extra_provenance: Mapping | None, label: str, check: bool = True):
    try:
        tensors, convention_meta, plan = planned_state_dict(lora, convention, dtype, check=check)
    except LoraError as exc:  # name the output file, keeping the error's type
        if exc.file:
            raise
        raise type(exc)(exc.problem, file=label, layer=exc.layer, fix=exc.fix) from None
    if not tensors:
        raise LoraError("nothing to write: every layer was dropped", file=label,
                        fix="loosen the threshold or raise the size/rank target")
    meta = output_metadata(lora, operation=operation, recipe=recipe, sources=sources, extra=extra_provenance)
    meta.update(convention_meta)
    return tensors, meta, plan


def encoded_size(lora: LoraFile, *, convention: str = "kohya", dtype: torch.dtype | None = None,
                 operation: str = "convert", recipe: str | None = None, sources: Iterable[Mapping[str, str]] = (),
                 extra_provenance: Mapping | None = None) -> int:
    """Byte size of the file ``write_lora`` writes, without serializing any data: factors may live on the
    ``meta`` device. Used to fit ``size=`` targets exactly."""
    tensors, meta, _ = _tensors_and_metadata(lora, convention, dtype, operation, recipe, list(sources),
                                             extra_provenance, "<output>", check=False)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = "0" * 64, "0" * 8
    return safetensors_size({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, meta)


def write_lora(lora: LoraFile, path: str | os.PathLike, *, convention: str = "kohya",
               dtype: torch.dtype | None = None, operation: str = "convert", recipe: str | None = None,
               sources: Iterable[Mapping[str, str]] = (), extra_provenance: Mapping | None = None,
               overwrite: bool = False, digest: StreamDigest | None = None) -> int:
    """Write atomically; returns the number of bytes written. Never replaces a file unless ``overwrite``.
    ``digest`` is fed the finished file's bytes from memory (its sha256 without reading it back), on the
    hash thread while the read-back runs.

    Streams tensor by tensor (no copy of the whole file in memory) and hashes each chunk in a second
    thread while the first writes it: the header, which holds the hashes, has a fixed length, so it
    is written last, in place. The plan is checked against the LoRA before anything is opened, and the
    finished temp file is read back group by group against the plan before it is moved into place
    (``core.formats.readback``): a mismatch is a LoraError, and no file appears.
    """
    tensors, meta, plan = _tensors_and_metadata(lora, convention, dtype, operation, recipe, list(sources),
                                                extra_provenance, str(path))
    check_plan(lora, plan, str(path))
    if convention == "peft" and any(layer.dora_scale is not None for layer in lora):
        log.warning("%s: DoRA magnitudes are written as PEFT's lora_magnitude_vector, which ComfyUI (0.3.64) "
                    "does not read: there the file applies as plain LoRA. Use -f kohya or -f comfy for ComfyUI.",
                    path)
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    hasher = SdScriptsHasher(header_size(tensors, ss_only))
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = "0" * 64, "0" * 8  # same length as the real ones
    header_len = len(header_bytes(tensors, meta))
    written = header_len

    def fill(fh) -> None:
        nonlocal written
        fh.seek(header_len)
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashed, batch, size = [], [], 0
            for chunk in data_chunks(tensors):
                batch.append(chunk)
                size += len(chunk)
                if size >= _HASH_BATCH:  # one job per few MiB, not per tensor: a Future costs locks and the GIL
                    hashed.append(pool.submit(_hash_all, hasher, batch))  # one worker: hashed in order
                    batch, size = [], 0
                fh.write(chunk)
                written += len(chunk)
            hashed.append(pool.submit(_hash_all, hasher, batch))
            for future in hashed:
                future.result()
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = hasher.digests()
        header = header_bytes(tensors, meta)
        assert len(header) == header_len, "header length changed with the hashes"
        fh.seek(0)
        fh.write(header)
        if digest is not None:
            digest.feed(header)
            for chunk in data_chunks(tensors):
                digest.feed(chunk)

    atomic_write(fill, path, overwrite=overwrite,
                 verify=lambda tmp: check_file(tmp, lora, plan, tensors, label=str(path)))
    return written


_HASH_BATCH = 4 << 20


def _hash_all(hasher: SdScriptsHasher, chunks: list) -> None:
    for chunk in chunks:
        hasher.update(chunk)


def _convention(name: str) -> Convention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise LoraError(f"unknown output format {name!r}", fix=f"use one of {', '.join(CONVENTIONS)}") from None


def _dtype_of(layer: Layer) -> torch.dtype:
    return next(iter(layer.factors.values())).dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha in the file's dtype when that is exact (as sd-scripts writes it), else fp32."""
    stored = torch.tensor(alpha, dtype=dtype)
    return stored if float(stored.float()) == float(alpha) else torch.tensor(alpha, dtype=torch.float32)


def _dora_tensors(layer: Layer, prefix: str, conv: Convention, suffix) -> dict[str, torch.Tensor]:
    """DoRA's magnitude: LyCORIS ``dora_scale`` as stored, or PEFT's ``lora_magnitude_vector`` [out]
    (PEFT format, and ``keep`` for a layer read that way)."""
    magnitude = layer.dora_scale
    role = "magnitude" if conv.name == "keep" and "magnitude" in (layer.suffixes or {}) else conv.magnitude_role
    if role == "magnitude":
        if magnitude.shape[0] != layer.shape[0] or magnitude.numel() != layer.shape[0]:
            raise LoraError("DoRA magnitude on the input axis cannot be written in PEFT format", layer=layer.name,
                            fix="write this LoRA in kohya format")
        magnitude = magnitude.reshape(-1)
    return {prefix + suffix(None, role): _cast(magnitude, None)}


def _peft_metadata(ranks: Mapping[str, Mapping[str, int]], lora: LoraFile) -> dict[str, str]:
    """diffusers' ``lora_adapter_metadata``: alpha = rank everywhere (scales are baked into B)."""
    flat: dict[str, object] = {}
    for component, modules in ranks.items():
        common = max(set(modules.values()), key=list(modules.values()).count)
        pattern = {m: r for m, r in modules.items() if r != common}
        flat.update({f"{component}.r": common, f"{component}.lora_alpha": common,
                     f"{component}.rank_pattern": pattern, f"{component}.alpha_pattern": dict(pattern),
                     f"{component}.peft_type": "LORA", f"{component}.use_rslora": False,
                     f"{component}.use_dora": any(l.dora_scale is not None for l in lora.layers.values()),
                     f"{component}.target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules})})
    return {"lora_adapter_metadata": json.dumps(flat, sort_keys=True), "format": "pt"}


# --- slices: fuse for conventions that cannot name them, split where the fused name does not exist ---

def _fit_slices(layers: list[Layer], arch: str, conv: Convention) -> list[tuple[Layer, str]]:
    out: list[tuple[Layer, str]] = []
    sliced: dict[str, list[Layer]] = defaultdict(list)
    for layer in layers:
        if layer.offset is not None and not conv.slices:
            sliced[layer.name].append(layer)
            continue
        parts = naming.split_parts(layer.name, arch, conv.name)
        if parts is None:
            out.append((layer, naming.from_canonical(layer.name, arch, conv.name)))
        elif layer.offset is not None:
            out.append((layer, _named_part(layer, parts)[0]))
        else:
            out.extend(_split(layer, parts))
    for name, group in sliced.items():
        fused = fuse_slices(name, group, arch)
        out.append((fused, naming.from_canonical(name, arch, conv.name)))
    return out


def _units(parts: list[tuple[str, tuple[int, int]]]) -> int:
    return max(start + length for _, (start, length) in parts)


def _named_part(layer: Layer, parts: list[tuple[str, tuple[int, int]]]) -> tuple[str, int]:
    """(prefix, rows per unit) of the named part a row-slice layer is."""
    _, start_row, rows = layer.offset
    for prefix, (start, length) in parts:
        unit = rows // length
        if unit * length == rows and start * unit == start_row:
            return prefix, unit
    raise LoraError(f"row slice {layer.offset} has no name in this format", layer=layer.name,
                    fix="write in kohya or ComfyUI format")


def _split(layer: Layer, parts: list[tuple[str, tuple[int, int]]]) -> list[tuple[Layer, str]]:
    """One fused layer -> one layer per named row slice (LoRA: shared down, up split by rows)."""
    unit = layer.shape[0] // _units(parts)
    out = []
    for prefix, (start, length) in parts:
        rows = slice(start * unit, (start + length) * unit)
        shape = (length * unit, *layer.shape[1:])
        offset = (0, start * unit, length * unit)
        if layer.kind == "lora" and "mid" not in layer.factors:
            factors = {"up": layer.factors["up"][rows].clone(), "down": layer.factors["down"].clone()}
            part = layer.with_factors(factors, shape=shape, offset=offset)
        else:
            diff = delta_weight(layer)[rows].clone()
            part = layer.with_factors({"diff": diff}, kind="full", alpha=None, shape=shape, offset=offset)
        if layer.dora_scale is not None:
            part = part.with_factors(part.factors, dora_scale=layer.dora_scale[rows].clone())
        if layer.bias_diff is not None:
            part = part.with_factors(part.factors, bias_diff=layer.bias_diff[rows].clone())
        out.append((part, prefix))
    return out


def fuse_slices(name: str, group: list[Layer], arch: str) -> Layer:
    """Row-slice layers of one weight -> one layer of the whole weight, exactly (block-diagonal up)."""
    parts = naming.split_parts(name, arch, "peft")
    first = group[0]
    if parts is None:  # slices placed by rows alone (grouped-query q/k/v): the family knows the fused height
        height = naming.fused_rows(name, arch, [layer.offset for layer in group], first.in_features)
        if height is None:
            raise LoraError("row slices of a weight that has no known parts", layer=name,
                            fix="write this LoRA in PEFT format")
    else:
        height = _units(parts) * _named_part(first, parts)[1]
    shape = (height, *first.shape[1:])
    if any(layer.dora_scale is not None for layer in group):
        raise LoraError("DoRA on split q/k/v layers cannot be fused into one layer", layer=name,
                        fix="write this LoRA in PEFT format")
    bias = None
    if any(layer.bias_diff is not None for layer in group):
        bias = torch.zeros(height, dtype=torch.float32)
        for layer in group:
            if layer.bias_diff is not None:
                bias[layer.offset[1]:layer.offset[1] + layer.offset[2]] = layer.bias_diff.float()
    if any(t.is_meta for layer in group for t in layer.factors.values()):  # shapes only (size accounting)
        rank = sum(layer.rank for layer in group)
        factors = {"up": torch.empty(height, rank, device="meta"), "down": torch.empty(rank, *shape[1:], device="meta")}
        return Layer(name=name, kind="lora", factors=factors, shape=shape, alpha=float(rank), bias_diff=bias,
                     source_key=first.source_key)
    if all(layer.kind == "lora" and "mid" not in layer.factors for layer in group):
        rank = sum(layer.rank for layer in group)
        up = torch.zeros(height, rank, *first.factors["up"].shape[2:], dtype=torch.float32)
        downs, col = [], 0
        for layer in group:
            start, length = layer.offset[1], layer.offset[2]
            up[start:start + length, col:col + layer.rank] = layer.factors["up"].float() * layer.scale
            downs.append(layer.factors["down"].float())
            col += layer.rank
        dtype = _dtype_of(first)
        return Layer(name=name, kind="lora", factors={"up": up.to(dtype), "down": torch.cat(downs).to(dtype)},
                     shape=shape, alpha=float(rank), bias_diff=bias, source_key=first.source_key)
    diff = torch.zeros(shape, dtype=torch.float32)
    for layer in group:
        diff[layer.offset[1]:layer.offset[1] + layer.offset[2]] = delta_weight(layer)
    return Layer(name=name, kind="full", factors={"diff": diff.to(_dtype_of(first))}, shape=shape,
                 bias_diff=bias, source_key=first.source_key)

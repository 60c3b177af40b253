"""Never a silently wrong file: what was written is read back and compared before it is moved into place.

Two checks, both cheap (no dense ΔW of a factored layer is ever formed):

- the plan against the LoRA (:func:`check_plan`, before writing): every weight the LoRA changes is changed
  by the layers about to be written (fused or split slices included), with the same ΔW;
- the file against the plan (:func:`check_file`, on the finished temp file): the same tensor keys, dtypes
  and shapes as meant, each key prefix read back (through the reader itself, group by group) as the layer
  it was written for, with the same ΔW, bias and DoRA magnitude, and every pass-through entry byte-equal.

A layer read back with the very bits it was written with (kind, factors, scale, bias, magnitude: the usual
case, as rebuilt factors are already at the output dtype) has the same ΔW by construction; only the others
(a cast, a baked scale, a layout change, a corrupted byte) are compared by ΔW, through random probes:
‖ΔW x − ΔW' x‖ ≤ 16 u ‖|ΔW| |x|‖ + 1e-6 ‖ΔW x‖ for two Gaussian x per weight, where u is the unit roundoff of the least precise dtype involved (2⁻¹¹ for fp16, 2⁻⁸ for
bf16, ~1e-7 for fp32) and |ΔW| is the product of the factors' absolute values: the scale of the rounding
a cast or a baked scale can cause. A dropped, zeroed, swapped or misplaced tensor is off by about ‖ΔW x‖.
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import replace
from typing import Mapping, Optional, Sequence

import torch
from safetensors import safe_open

from ..delta import delta_weight, effective_down
from ..errors import LoraError
from ..model import Layer, LoraFile
from ..safetensors_io import read_header
from ..values import bits_equal
from .conventions import split_key_suffix

_PROBES = 2
_SLACK = 16.0
_FIX = ("nothing was written; this is a bug in lora-resize (or a failing disk): please report it with the "
        "input file, and use -f keep meanwhile")


def unit_roundoff(dtypes) -> float:
    """Half an ulp at 1 for the least precise float dtype among ``dtypes`` (fp32 at least)."""
    worst = 2.0 ** -24
    for dtype in dtypes:
        if dtype.is_floating_point:
            worst = max(worst, float(torch.finfo(dtype).eps) / 2)
    return worst


def _probes(name: str, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(columns, _PROBES, generator=generator)


def _apply(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """ΔW x for x [in_features, p], from the factors (factored LoRA: two thin products)."""
    if layer.kind == "lora":
        return layer.factors["up"].to(torch.float32).flatten(1) @ (effective_down(layer) @ x) * layer.scale
    return delta_weight(layer).flatten(1) @ x


def _apply_abs(layer: Layer, x: torch.Tensor, tiny: float) -> torch.Tensor:
    """|ΔW| |x| with |ΔW| the product of the factors' absolute values, each raised by ``tiny`` (the
    smallest normal of the written dtype, below which rounding is absolute: a factor that underflows to
    zeros at fp16 is a warning, not a mismatch): the scale of the rounding a cast can cause."""
    magnitude = replace(layer, factors={k: v.float().abs() + tiny for k, v in layer.factors.items()},
                        alpha=None if layer.alpha is None else abs(layer.alpha))
    return _apply(magnitude, x.abs())


def _rows(layer: Layer) -> tuple[int, int]:
    return (0, layer.shape[0]) if layer.offset is None else (layer.offset[1], layer.offset[2])


class _Weight:
    """ΔW x of every layer changing one weight, its slices placed at their rows; bias and magnitude too."""

    def __init__(self, name: str, layers: Sequence[Layer], tiny: float):
        self.name = name
        self.tiny = tiny
        self.height = max(sum(_rows(layer)) for layer in layers)
        columns = {layer.in_features for layer in layers}
        if len(columns) != 1:
            raise _mismatch(f"its layers take {sorted(columns)} input columns", name)
        x = _probes(name, columns.pop())
        self.delta = torch.zeros(self.height, _PROBES)
        self.scale = torch.zeros(self.height, _PROBES)
        self.bias: Optional[torch.Tensor] = None
        self.magnitude: dict[tuple[int, int], torch.Tensor] = {}
        self.dtypes = set()
        for layer in layers:
            start, length = _rows(layer)
            self.delta[start:start + length] += _apply(layer, x)
            self.scale[start:start + length] += _apply_abs(layer, x, tiny)
            self.dtypes |= layer.dtypes()
            if layer.bias_diff is not None:
                self.bias = torch.zeros(self.height) if self.bias is None else self.bias
                self.bias[start:start + length] += layer.bias_diff.float().reshape(-1)
                self.dtypes.add(layer.bias_diff.dtype)
            if layer.dora_scale is not None:
                self.magnitude[(start, length)] = layer.dora_scale.float().reshape(-1)
                self.dtypes.add(layer.dora_scale.dtype)

    def padded(self, height: int) -> "_Weight":
        """The same weight seen with ``height`` rows: rows no layer changes have ΔW = 0 (a fused weight
        written whole where only some of its slices were changed)."""
        extra = height - self.height
        if extra:
            self.delta = torch.cat([self.delta, torch.zeros(extra, _PROBES)])
            self.scale = torch.cat([self.scale, torch.zeros(extra, _PROBES)])
            self.bias = None if self.bias is None else torch.cat([self.bias, torch.zeros(extra)])
            self.height = height
        return self

    def compare(self, other: "_Weight", what: str) -> None:
        u = _SLACK * unit_roundoff(self.dtypes | other.dtypes)
        height = max(self.height, other.height)
        self.padded(height), other.padded(height)
        error = float((self.delta - other.delta).norm())
        bound = u * float(torch.maximum(self.scale, other.scale).norm()) + 1e-6 * float(self.delta.norm())
        if not error <= bound:
            raise _mismatch(f"{what}: ΔW differs by {error / (float(self.delta.norm()) or 1.0):.3g} (relative; "
                            f"rounding allows {bound / (float(self.delta.norm()) or 1.0):.3g})", self.name)
        _close(self.bias, other.bias, u, self.tiny, f"{what}: the bias diff", self.name)
        if self.magnitude.keys() != other.magnitude.keys():
            raise _mismatch(f"{what}: the DoRA magnitude covers other rows", self.name)
        for rows, magnitude in self.magnitude.items():
            _close(magnitude, other.magnitude[rows], u, self.tiny, f"{what}: the DoRA magnitude", self.name)


def _compare(name: str, meant: Sequence[Layer], read: Sequence[Layer], what: str) -> None:
    dtypes = {t.dtype for layer in [*meant, *read] for t in layer.factors.values()}
    tiny = max((float(torch.finfo(d).tiny) for d in dtypes if d.is_floating_point and d.itemsize < 4), default=0.0)
    _Weight(name, meant, tiny).compare(_Weight(name, read, tiny), what)


def _close(a: Optional[torch.Tensor], b: Optional[torch.Tensor], u: float, tiny: float, what: str,
           name: str) -> None:
    if (a is None) != (b is None):
        raise _mismatch(f"{what} is {'missing' if b is None else 'there but was not meant to be'}", name)
    if a is None:
        return
    if a.shape != b.shape or not bool(((a - b).abs() <= u * torch.maximum(a.abs(), b.abs()) + tiny + 1e-30).all()):
        raise _mismatch(f"{what} differs", name)


def _mismatch(problem: str, layer: Optional[str], file: Optional[str] = None) -> LoraError:
    return LoraError(f"the written file does not read back as meant: {problem}", file=file, layer=layer, fix=_FIX)


def _by_name(pairs) -> dict[str, list[Layer]]:
    out: dict[str, list[Layer]] = defaultdict(list)
    for name, layer in pairs:
        out[name].append(layer)
    return out


def check_plan(lora: LoraFile, plan: Sequence[tuple[Layer, str]], label: Optional[str] = None) -> None:
    """The layers about to be written change the same weights by the same ΔW as the LoRA's layers."""
    meant = _by_name((layer.name, layer) for layer in lora)
    planned = _by_name((layer.name, layer) for layer, _ in plan)
    if meant.keys() != planned.keys():
        lost = sorted(meant.keys() - planned.keys())
        extra = sorted(planned.keys() - meant.keys())
        raise _mismatch(f"{len(lost)} layers would not be written ({', '.join(lost[:5])}) and {len(extra)} "
                        f"would appear ({', '.join(extra[:5])})", None, label)
    for name, layers in meant.items():
        if any(layer.offset is not None for layer in layers + planned[name]) or len(layers) != len(planned[name]):
            _compare(name, layers, planned[name], "fusing or splitting its slices")
        # a whole layer written as itself is compared with the file in check_file


def check_file(path: str, lora: LoraFile, plan: Sequence[tuple[Layer, str]], tensors: Mapping[str, torch.Tensor],
               label: Optional[str] = None) -> None:
    """The finished file at ``path`` holds ``tensors`` and reads back, prefix by prefix, as ``plan`` says."""
    from .reader import _PeftAlphas

    label = label or path
    header, metadata = read_header(path)
    if header.keys() != tensors.keys():
        missing = sorted(tensors.keys() - header.keys())
        raise _mismatch(f"{len(missing)} tensors missing ({', '.join(missing[:5])}), "
                        f"{len(header.keys() - tensors.keys())} unexpected", None, label)
    planned = {prefix: layer for layer, prefix in plan}
    groups: dict[str, list[str]] = defaultdict(list)
    for key in header:
        parts = split_key_suffix(key)
        if parts is None:
            raise _mismatch(f"the key {key} has no LoRA suffix", key, label)
        groups[parts[0]].append(key)
    peft_alphas = _PeftAlphas(metadata, label)
    seen_extras: set[str] = set()
    # one handle for every group: opening the file per group parsed its whole header 1,014 times for an
    # SDXL LoRA (2.5 s of a 4 s write)
    with safe_open(path, framework="pt", device="cpu") as fh:
        for prefix, keys in groups.items():
            try:
                stored = {key: fh.get_tensor(key) for key in keys}
                _check_group(stored, prefix, lora, planned, tensors, peft_alphas, seen_extras, label)
            except LoraError as exc:
                if exc.fix == _FIX:
                    raise exc.with_file(label) from None
                raise _mismatch(f"{prefix} does not read back: {exc.problem}", exc.layer or prefix,
                                label) from None
    if planned:
        raise _mismatch(f"{len(planned)} planned layers are not in the file ({', '.join(list(planned)[:5])})",
                        None, label)
    lost = sorted(lora.passthrough.keys() - seen_extras)
    if lost:
        raise _mismatch(f"{len(lost)} pass-through entries are not in the file ({', '.join(lost[:5])})", None, label)


def _check_group(stored: Mapping[str, torch.Tensor], prefix: str, lora: LoraFile, planned: dict[str, Layer],
                 tensors: Mapping[str, torch.Tensor], peft_alphas, seen_extras: set[str], label: str) -> None:
    """One key prefix of the file (``stored``: its tensors as read back): its tensors as meant, read by the
    reader itself as the planned layer."""
    from .reader import build_group, group_keys

    for key, tensor in stored.items():
        meant = tensors[key]
        if tensor.dtype != meant.dtype or tuple(tensor.shape) != tuple(meant.shape):
            raise _mismatch(f"{key} is {tensor.dtype} {tuple(tensor.shape)}, meant {meant.dtype} "
                            f"{tuple(meant.shape)}", key, label)
    roles = group_keys(stored, label)[0][prefix]
    layer, extras, leftover = build_group(prefix, roles, lora.architecture, peft_alphas, label, check_values=False)
    if leftover:
        raise _mismatch(f"{', '.join(leftover)} read back as no layer", prefix, label)
    for key, tensor in extras.items():
        source = lora.passthrough.get(key)
        if source is None or not bits_equal(source, tensor):
            raise _mismatch(f"the pass-through entry {key} is not byte-equal to the source", key, label)
        seen_extras.add(key)
    if layer is None:
        return
    if prefix not in planned:
        raise _mismatch(f"{prefix} was written but not planned", prefix, label)
    meant = planned.pop(prefix)
    _check_identity(layer, meant, prefix, label)
    if not _identical(layer, meant):
        _compare(meant.name, [meant], [_placed(layer, meant)], f"written as {prefix}")


def _identical(read: Layer, meant: Layer) -> bool:
    """The layer read back holds the very bits of the layer meant (same kind, factors, scale, bias and
    magnitude): then its ΔW is the same by construction, and the probes are not needed. The usual case
    (factors written as they are, alpha exact); anything else (a cast, a baked scale, a layout change)
    goes to the ΔW comparison."""
    return (read.kind == meant.kind and read.scale == meant.scale and read.factors.keys() == meant.factors.keys()
            and all(bits_equal(read.factors[role], meant.factors[role]) for role in meant.factors)
            and bits_equal(read.bias_diff, meant.bias_diff) and bits_equal(read.dora_scale, meant.dora_scale))


def _check_identity(read: Layer, meant: Layer, prefix: str, label: str) -> None:
    """The prefix names, on reading, the weight (and row slice) it was written for, at its shape."""
    if tuple(read.shape) != tuple(meant.shape):
        raise _mismatch(f"{prefix} reads back as a {tuple(read.shape)} layer, written as {tuple(meant.shape)}",
                        prefix, label)
    if meant.verbatim:
        if read.name not in (prefix, meant.name):
            raise _mismatch(f"{prefix} reads back as {read.name}, not as the layer {meant.name}", prefix, label)
        return
    if read.verbatim:
        raise _mismatch(f"{prefix}, written for {meant.name}, is a name no table knows on reading", prefix, label)
    if (read.name, read.offset) != (meant.name, meant.offset):
        raise _mismatch(f"{prefix}, written for {meant.name} {meant.offset or ''}, reads back as {read.name} "
                        f"{read.offset or ''}", prefix, label)


def _placed(read: Layer, meant: Layer) -> Layer:
    """The read-back layer at the rows of the layer it was written for (verbatim names carry no slice)."""
    return read if read.offset == meant.offset else replace(read, offset=meant.offset)

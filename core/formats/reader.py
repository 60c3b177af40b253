"""Read any common LoRA safetensors file into a :class:`LoraFile`.

One pass, driven by tables: split each key into prefix + role (``conventions.READ_SUFFIXES``),
group by prefix, name each group canonically (``core.naming``), then check shapes and values.
A LoRA-shaped group is read whatever its prefix: where no table knows the name, the layer keeps it
verbatim. Entries that are not low-rank (1-D norm diffs, lone ``.diff_b``, ``.diff_m``, ``.set_weight``)
go to ``LoraFile.passthrough`` unchanged. Keys that fit nowhere are listed in a warning and kept in
``LoraFile.unknown_keys``; a file with no LoRA layer at all is refused, saying what it looks like.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Mapping, Optional

import torch

from .. import naming
from ..errors import LoraError, UnsupportedFormat
from ..model import Layer, LoraFile
from ..safetensors_io import StreamDigest, load_tensors, read_header, tensor_dtype
from ..values import all_finite
from .conventions import PASSTHROUGH_ROLES, split_key_suffix, unsupported_family
from .shapes import layer_shape, swap_output_halves

log = logging.getLogger("lora_resize")

_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.",
                       "double_blocks.0.img_attn.qkv.weight", "input_blocks.0.0.weight", "text_model.embeddings.")


def read_lora(path: str | os.PathLike, arch: Optional[str] = None,
              digest: Optional[StreamDigest] = None) -> LoraFile:
    """Read a LoRA file; ``arch`` overrides architecture detection ("sd15", "sdxl", "flux"). ``digest`` is
    fed the file's bytes as they are read (its sha256 without a second read)."""
    path = str(path)
    header, metadata = read_header(path)
    tensors = load_tensors(path, header=header, digest=digest)
    try:
        return lora_from_state_dict(tensors, metadata, arch=arch, path=path)
    except LoraError as exc:
        raise exc.with_file(path) from None


_READ_VALUES = 16  # tensors this small are read even for the layout: alphas (one value each), scalars


def read_lora_layout(path: str | os.PathLike, arch: Optional[str] = None) -> LoraFile:
    """The LoRA's layers from its header alone: names, family, shapes and slices (what a batch needs to
    match bases and plan before any tensor data is read; a few KB from a networked library). Factors are
    meta tensors; only tensors of at most a few values (alphas) are read. Values are not checked: the
    full read that does the work checks them."""
    path = str(path)
    header, metadata = read_header(path)
    small = [k for k, info in header.items() if math.prod(info["shape"]) <= _READ_VALUES]
    tensors = load_tensors(path, keys=small, header=header) if small else {}
    for key, info in header.items():
        if key not in tensors:
            tensors[key] = torch.empty(info["shape"], dtype=tensor_dtype(info["dtype"]), device="meta")
    try:
        return lora_from_state_dict(tensors, metadata, arch=arch, path=path, check_values=False)
    except LoraError as exc:
        raise exc.with_file(path) from None


def lora_from_state_dict(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                         arch: Optional[str] = None, path: Optional[str] = None,
                         check_values: bool = True) -> LoraFile:
    """Build the model from tensors already in memory (ComfyUI's LoraLoader gives us these).
    ``check_values=False``: no NaN/Inf pass (meta tensors of a layout, a read-back compared bit for bit)."""
    label = path or "<state dict>"
    if not tensors:
        raise LoraError("the file holds no tensors", file=label, fix="this is not a LoRA; pick another file")
    groups, unknown = group_keys(tensors, label)
    architecture = arch or naming.detect_architecture(groups.keys(), metadata, _widths(groups))
    peft_alphas = _PeftAlphas(metadata, label)
    layers: dict[str, Layer] = {}
    passthrough: dict[str, torch.Tensor] = {}
    for prefix, roles in groups.items():
        layer, extras, leftover = build_group(prefix, roles, architecture, peft_alphas, label, check_values)
        passthrough.update(extras)
        unknown.extend(leftover)
        if layer is None:
            continue
        key = layer_key(layer)
        if key in layers:
            raise LoraError(f"two entries change the same weight ({layers[key].source_key} and {prefix})",
                            file=label, layer=layer.name, fix="the file mixes two naming styles; keep one of them")
        layers[key] = layer
    if not layers:
        raise not_a_lora(tensors, label, passthrough)
    if unknown:
        log.warning("%s: %d keys not understood and left out: %s", label, len(unknown), ", ".join(sorted(unknown)))
    verbatim = [layer.source_key for layer in layers.values() if layer.verbatim]
    if verbatim:
        log.info("%s: %d layers have names no table knows for %s; they keep their names (e.g. %s)", label,
                 len(verbatim), architecture, ", ".join(verbatim[:3]))
    return LoraFile(layers=layers, architecture=architecture, family=_family(groups, metadata),
                    metadata=dict(metadata), path=path, unknown_keys=sorted(unknown), passthrough=passthrough)


Roles = dict[str, tuple[Optional[str], torch.Tensor, str]]  # role -> (kind, tensor, suffix as stored)


def _widths(groups: Mapping[str, Roles]) -> dict[str, tuple[int, int]]:
    """(out rows, in columns) of each plain LoRA group, from its factors' shapes: detection tells families
    that share names (Flux, SD3, Qwen-Image diffusers blocks) apart by width."""
    out = {}
    for prefix, roles in groups.items():
        up, down = roles.get("up"), roles.get("down")
        if up is not None and down is not None and up[1].dim() >= 1 and down[1].dim() >= 2:
            out[prefix] = (int(up[1].shape[0]), int(math.prod(down[1].shape[1:])))
    return out


def group_keys(tensors: Mapping[str, torch.Tensor], label: str) -> tuple[dict[str, Roles], list[str]]:
    """Tensors grouped by key prefix ({prefix: {role: (kind, tensor, suffix)}}), and the keys with no known
    suffix. Refuses the adapter families we cannot represent (IA3, OFT ...) by name."""
    groups: dict[str, Roles] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        family = unsupported_family(key)
        if family:
            raise UnsupportedFormat(f"{family} adapters are not supported (only LoRA/LoCon, LoHa, LoKr, DoRA "
                                    "and full diffs are)", file=label, layer=key,
                                    fix=f"convert the {family} file to a LoRA with its training tool first")
        parts = split_key_suffix(key)
        if parts is None:
            unknown.append(key)
            continue
        prefix, kind, role, suffix = parts
        groups.setdefault(prefix, {})[role] = (kind, tensor, suffix)
    return groups, unknown


def _is_weight_diff(tensor: torch.Tensor) -> bool:
    """A ``.diff`` that is a matrix (or conv kernel) worth decomposing; a norm's 1-D diff, Wan's
    ``modulation.diff`` [1, 6, dim] and other single-row or single-column diffs are carried as they are."""
    return tensor.dim() >= 2 and tensor.shape[0] > 1 and math.prod(tensor.shape[1:]) > 1


def build_group(prefix: str, roles: Roles, arch: str, peft_alphas: "_PeftAlphas", label: str,
                check_values: bool = True) -> tuple[Optional[Layer], dict[str, torch.Tensor], list[str]]:
    """One prefix's tensors -> (layer or None, pass-through entries {key: tensor}, keys left out).

    ``check_values=False`` skips the NaN/Inf pass over every value: for the read-back of a file just
    written, whose tensors are then compared bit for bit (or by ΔW) with finite ones anyway."""
    extras: dict[str, torch.Tensor] = {}
    roles = dict(roles)
    carried = [role for role in PASSTHROUGH_ROLES if role in roles]
    if "diff" in roles and not _is_weight_diff(roles["diff"][1]):
        carried.append("diff")
    if "diff_b" in roles and not any(kind is not None for role, (kind, _, _) in roles.items() if role not in carried):
        carried.append("diff_b")
    for role in carried:
        _, tensor, suffix = roles.pop(role)
        extras[prefix + suffix] = tensor
    for key, tensor in extras.items():
        _check_values(key[len(prefix):].lstrip("."), tensor, False, label, prefix, check_values)
    if not roles:
        return None, extras, []
    layer = _build_layer(prefix, roles, arch, peft_alphas, label, check_values)
    leftover = [] if layer is not None else [prefix + suffix for _, _, suffix in roles.values()]
    return layer, extras, leftover


_EMBEDDING_KEYS = ("emb_params", "string_to_param", "string_to_param.*", "clip_l", "clip_g", "string_to_token")


def not_a_lora(tensors: Mapping[str, torch.Tensor], label: str,
               passthrough: Mapping[str, torch.Tensor] | None = None) -> LoraError:
    """The refusal of a file without a single LoRA layer, naming what it looks like instead."""
    keys = list(tensors)
    count = f"0 of {len(keys)} keys are LoRA factors"
    if passthrough:
        shown = ", ".join(f"{key}: {key.rpartition('.')[2]} has shape {tuple(t.shape)}"
                          for key, t in list(passthrough.items())[:3])
        return LoraError(f"{count}: it holds only {len(passthrough)} entries that are not low-rank ({shown}), "
                         "nothing to resize or convert", file=label,
                         fix="load it with ComfyUI's LoraLoader as it is; a LoRA file has lora_up/lora_down "
                         "(or lora_A/lora_B, LoHa, LoKr) factors")
    if len(keys) <= 3 and all(k in _EMBEDDING_KEYS or k.startswith("string_to_param.") for k in keys):
        return LoraError(f"{count}: looks like a textual-inversion embedding ({', '.join(keys)})", file=label,
                         fix="use it in a prompt as embedding:<name> (embeddings folder); it has no LoRA to resize")
    weights = all(k.endswith((".weight", ".bias", ".scale", "_scale", ".running_mean", ".running_var",
                              ".num_batches_tracked")) for k in keys)
    if any(marker in key for key in keys for marker in _CHECKPOINT_MARKERS) or (weights and len(keys) > 3):
        return LoraError(f"{count}: looks like a model checkpoint, not a LoRA (full model weights such as "
                         f"{keys[0]})", file=label,
                         fix="pass the checkpoint as the base model (CHECKPOINT), and a LoRA file as the LoRA")
    shown = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
    return LoraError(f"{count}: no key ends in a LoRA suffix (.lora_up/.lora_down, .lora_A/.lora_B, .hada_*, "
                     f".lokr_*, .diff ...); it holds {shown}", file=label,
                     fix="this is not a LoRA file in a format this tool reads; pick the LoRA file itself")


def _finite_in_fp32(tensor: torch.Tensor) -> bool:
    """Whether every value is finite and stays so in fp32, where all the maths runs.

    fp8/fp16/bf16/fp32 by their bits (every finite value of these fits fp32; see ``core.values``); fp64
    by its largest magnitude, which must fit fp32 (a NaN fails the comparison)."""
    if tensor.dtype == torch.float64:
        return float(tensor.abs().max()) <= torch.finfo(torch.float32).max
    return all_finite(tensor)


def _check_values(role: str, tensor: torch.Tensor, factor: bool, label: str, prefix: str,
                  finite: bool = True) -> None:
    """A stored tensor that is empty, not a float, or holds a NaN/Inf is refused here, naming its layer."""
    what = f"factor {role}" if factor else role
    if not tensor.is_floating_point():
        raise LoraError(f"{what} has dtype {str(tensor.dtype).replace('torch.', '')}, not a float", file=label,
                        layer=prefix, fix="the file is corrupt; re-export it")
    if not tensor.numel():
        rank0 = ": a rank-0 layer changes nothing and cannot be resized" if factor else ""
        raise LoraError(f"{what} is empty (shape {list(tensor.shape)}){rank0}", file=label, layer=prefix,
                        fix="re-export the LoRA without this layer, or with a rank of at least 1")
    if finite and not _finite_in_fp32(tensor):
        raise LoraError(f"{what} holds NaN or Inf values (or values too large for fp32)", file=label,
                        layer=prefix, fix="the training diverged; use an earlier checkpoint of this LoRA")


def layer_key(layer: Layer) -> str:
    """Unique key of a layer inside a LoraFile: its name, plus the row slice when it has one."""
    if layer.offset is None:
        return layer.name
    return f"{layer.name}[{layer.offset[1]}:{layer.offset[1] + layer.offset[2]}]"


def _build_layer(prefix: str, stored: Roles, arch: str, peft_alphas: "_PeftAlphas", label: str,
                 check_values: bool = True) -> Optional[Layer]:
    """The layer of one LoRA-shaped group, whatever its prefix: a prefix no naming table knows keeps its
    name verbatim (its shape comes from its factors). None for extras without factors (a lone alpha)."""
    roles = {role: (kind, tensor) for role, (kind, tensor, _) in stored.items()}
    kinds = {kind for kind, _ in roles.values() if kind is not None}
    factors = {role: t for role, (kind, t) in roles.items() if kind is not None}
    if not kinds:
        return None  # an alpha or magnitude with no factors
    if len(kinds) > 1:
        raise LoraError(f"mixes factors of several kinds ({', '.join(sorted(kinds))})", file=label, layer=prefix,
                        fix="the file is corrupt or merged badly; re-export it")
    kind = kinds.pop()
    target = naming.to_canonical(prefix, arch)
    verbatim = target is None
    if verbatim:
        target = naming.Target(prefix)
    for role, (_, tensor) in roles.items():
        if role != "alpha":
            _check_values(role, tensor, role in factors, label, prefix, check_values)
    shape = layer_shape(kind, factors, target.name, arch, prefix=prefix, label=label)
    alpha = _alpha(prefix, roles, kind, factors, peft_alphas, label)
    swapped = target.swaps(shape)
    if swapped:
        factors = swap_output_halves(kind, factors, label, prefix)
    offset = target.offset(shape)
    if target.part is not None:
        start_units, length_units = target.part
        if shape[0] % length_units:
            raise LoraError(f"{shape[0]} output rows cannot be a {length_units}-part slice", file=label,
                            layer=prefix, fix="the layer does not match its name; check the architecture")
        unit = shape[0] // length_units
        offset = (0, start_units * unit, shape[0])
    dora = _dora(roles, shape, label, prefix)
    bias = roles.get("diff_b", (None, None))[1]
    if bias is not None and tuple(bias.shape) != shape[:1]:
        raise LoraError(f"diff_b has shape {tuple(bias.shape)}, but the weight has {shape[0]} output rows",
                        file=label, layer=prefix, fix="the file is corrupt; re-export it")
    if swapped:
        dora = None if dora is None else torch.roll(dora, shape[0] // 2, dims=0)
        bias = None if bias is None else torch.roll(bias, shape[0] // 2, dims=0)
    return Layer(name=target.name, kind=kind, factors=factors, shape=shape, alpha=alpha, offset=offset,
                 dora_scale=dora, bias_diff=bias, source_key=prefix, verbatim=verbatim,
                 suffixes={role: suffix for role, (_, _, suffix) in stored.items()})


def _alpha(prefix: str, roles, kind: str, factors, peft_alphas: "_PeftAlphas", label: str) -> Optional[float]:
    if "alpha" in roles:
        value = roles["alpha"][1]
        if value.numel() != 1:
            raise LoraError(f"alpha has {value.numel()} values, expected 1", file=label, layer=prefix,
                            fix="the file is corrupt; re-export it")
        alpha = float(value.float().item())
        if not math.isfinite(alpha):
            raise LoraError("alpha is NaN or Inf", file=label, layer=prefix, fix="re-export the LoRA")
        return alpha
    if kind == "lora":
        return peft_alphas.alpha_for(prefix, int(factors["down"].shape[0]))
    return None


def _dora(roles, shape: tuple[int, ...], label: str, prefix: str) -> Optional[torch.Tensor]:
    if "dora_scale" in roles:
        scale = roles["dora_scale"][1]
        # LyCORIS: one magnitude per output row [out, 1, ...] or, from older versions, per input [1, in, ...]
        per_row = [shape[0]] + [1] * (len(shape) - 1)
        per_column = [1, shape[1]] + [1] * (len(shape) - 2)
        if scale.numel() not in (shape[0], shape[1]) or list(scale.shape) not in (per_row, per_column, [scale.numel()]):
            raise LoraError(f"DoRA scale of shape {tuple(scale.shape)} fits neither the {shape[0]} output rows nor "
                            f"the {shape[1]} input columns of the {shape} weight", file=label, layer=prefix,
                            fix="the file is corrupt; re-export it")
        return scale
    if "magnitude" in roles:
        magnitude = roles["magnitude"][1]
        if magnitude.numel() != shape[0]:
            raise LoraError(f"DoRA magnitude has {magnitude.numel()} values for {shape[0]} output rows",
                            file=label, layer=prefix, fix="the file is corrupt; re-export it")
        # PEFT's magnitude is per output row: the same thing as LyCORIS' dora_scale [out, 1, ...]
        return magnitude.reshape(shape[0], *[1] * (len(shape) - 1))
    return None


def _family(groups: Mapping[str, dict], metadata: Mapping[str, str]) -> str:
    """Which producer family wrote the file, for reports and the default output convention."""
    prefixes = list(groups)
    roles = {role for r in groups.values() for role in r}
    if any(p.startswith(("diffusion_model.", "text_encoders.")) for p in prefixes):
        return "comfy"
    if roles & {"w1a", "w2a", "w1", "w2", "diff"} or "lycoris" in metadata.get("ss_network_module", ""):
        return "lycoris"
    if any(p.startswith(("lora_unet_", "lora_te", "lycoris_", "lora_transformer_")) for p in prefixes):
        return "kohya"
    return "peft"


class _PeftAlphas:
    """PEFT's alpha rules from ``lora_adapter_metadata``: lora_alpha, alpha_pattern, use_rslora.

    Returns the alpha in ComfyUI's convention (scale = alpha / rank), so rsLoRA's
    scale = lora_alpha / √r becomes alpha = lora_alpha · √r.
    """

    def __init__(self, metadata: Mapping[str, str], label: str = "<state dict>"):
        self.configs: dict[str, dict] = {}
        self.label = label
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return
        try:
            flat = json.loads(raw)
        except (ValueError, RecursionError):
            flat = None
        if not isinstance(flat, dict):
            log.warning("lora_adapter_metadata is not a JSON object; PEFT alphas ignored (scale 1)")
            return
        for key, value in flat.items():
            component, _, field_name = key.rpartition(".")
            if "." in field_name or not component:
                component, field_name = "", key
            self.configs.setdefault(component, {})[field_name] = value

    def alpha_for(self, prefix: str, rank: int) -> Optional[float]:
        component = next((c for c in sorted(self.configs, key=len, reverse=True)
                          if c and prefix.startswith(c + ".")), "" if "" in self.configs else None)
        if component is None:
            return None
        config = self.configs[component]
        module = prefix[len(component) + 1:] if component else prefix
        alpha, source = config.get("lora_alpha"), "lora_alpha"
        patterns = config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise self._bad(prefix, f"its alpha_pattern is a {type(patterns).__name__}, not a map")
        for pattern, value in patterns.items():
            try:
                matched = re.match(rf"(.*\.)?{pattern}$", module)
            except re.error as exc:
                raise self._bad(prefix, f"alpha_pattern {pattern!r} is not a regular expression ({exc})") from None
            if matched:
                alpha, source = value, f"alpha_pattern {pattern!r}"
                break
        if alpha is None:
            return None
        try:
            value = math.nan if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) else float(alpha)
        except OverflowError:  # an integer of 400 digits
            value = math.inf
        if not math.isfinite(value):
            raise self._bad(prefix, f"its {source} is {str(alpha)[:40]!r}, not a finite number")
        alpha = value
        if config.get("use_rslora"):
            return alpha * math.sqrt(rank)
        return alpha

    def _bad(self, prefix: str, problem: str) -> LoraError:
        return LoraError(f"lora_adapter_metadata: {problem}", file=self.label, layer=prefix,
                         fix="correct the PEFT adapter metadata, or remove it and give each layer an .alpha")

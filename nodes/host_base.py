"""Base weights as the host patches them: ComfyUI's own key maps place each LoRA layer on a model weight.

ComfyUI's LoraLoader runs ``comfy.lora_convert.convert_lora``, then looks every LoRA key prefix up in
``model_lora_keys_unet`` / ``model_lora_keys_clip`` (one merged map, CLIP entries last); a value is a model key
or ``(key, (dim, start, length)[, function])``: the layer changes that slice, and ``function`` maps the file's
ΔW onto the model's rows (Flux's swap_scale_shift). :class:`HostBase` answers the engine's base protocol from
exactly those targets, so any model class the host supports is matched, whether or not our naming tables
know its family. Weights are read one at a time as ``ModelPatcher.patch_weight_to_device`` reads them
(the unpatched original from the patcher's backup, cast to fp32 where it lives, then the op's own
``convert_weight``: scaled fp8), or through ComfyUI-GGUF's dequantize for its tensors; never the whole model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from typing import Callable, Iterable, Mapping, Optional, Sequence

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import torch

from ..core.base import BaseWeights, Offset
from ..core.errors import LoraError
from ..core.formats.reader import layer_key
from ..core.model import Layer

Function = Optional[Callable[[torch.Tensor], torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the host applies one LoRA layer: a weight of MODEL or CLIP, a slice of it, and the frame."""

    source: "HostWeights"
    key: str  # the model key, with ".weight"
    offset: Offset  # ComfyUI's (dim, start, length), or None for the whole weight
    function: Function  # applied by the host to the file's ΔW; None when the layer is already in model rows

    @property
    def name(self) -> str:
        """The base name the engine scores by (and the norms cache keys): the model key without ``.weight``."""
        stem = self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key
        return stem if self.offset is None or self.offset[0] == 0 else f"{stem}#dim{self.offset[0]}"


# --- reading one weight -------------------------------------------------------------------------------------


def _gguf_dequantize() -> Optional[Callable]:
    """ComfyUI-GGUF's ``dequantize_tensor`` when that pack is loaded (its module name is its folder's)."""
    for name, module in list(sys.modules.items()):
        if name.endswith("dequant") and callable(getattr(module, "dequantize_tensor", None)):
            return module.dequantize_tensor
    return None


def is_gguf(tensor: torch.Tensor) -> bool:
    """A ComfyUI-GGUF GGMLTensor: quantized bytes plus ``tensor_type`` and the logical ``tensor_shape``."""
    return getattr(tensor, "tensor_type", None) is not None and hasattr(tensor, "tensor_shape")


def to_fp32(tensor: torch.Tensor, device, key: str = "") -> torch.Tensor:
    """One stored weight as a new fp32 tensor on ``device``: moved first at its stored dtype (fp8 e4m3fn/e5m2,
    bf16 ...: only the stored bytes cross the bus), then cast there, exactly; GGUF through ComfyUI-GGUF's own
    dequantize. Blocking copies: the result is read at once."""
    if is_gguf(tensor):
        dequantize = _gguf_dequantize()
        if dequantize is None:
            raise LoraError("this base weight is a GGUF tensor, and the ComfyUI-GGUF pack that reads it is not "
                            "loaded", layer=key or None,
                            fix="install ComfyUI-GGUF (city96), connect a safetensors model, or use a recipe that "
                            "needs no base (spn_lora/fro_lora/params, rank=, sv_ratio=)")
        try:  # the file's values exactly: the pack's default does K-quant arithmetic in fp16
            weight = dequantize(tensor.to(device), dtype=torch.float32, dequant_dtype=torch.float32)
        except TypeError:  # a pack older than its dequant_dtype option
            weight = dequantize(tensor.to(device), dtype=torch.float32)
        weight = weight.to(torch.float32).as_subclass(torch.Tensor)  # a plain tensor (the pack's subclass
        # re-dispatches every op, and its clone() is a no-op); F32 "dequantizes" to the stored tensor itself, a
        # view of the file's read-only mapping: copied, so no caller can write into it
        return weight.clone() if weight.data_ptr() == tensor.data_ptr() else weight
    moved = comfy.model_management.cast_to(tensor, device=torch.device(device), non_blocking=False)
    return moved.to(torch.float32, copy=moved is tensor)


class HostWeights:
    """The weights of one ModelPatcher (MODEL's, or CLIP's ``patcher``), read one at a time, unpatched.

    Weights are the modules' own parameters and buffers, wherever ComfyUI keeps them (GPU, or offloaded to the
    CPU), never ``state_dict()``'s entries: ComfyUI-GGUF's layers put meta tensors there for quantized weights.
    A weight an applied LoRA patched in place is taken from the patcher's ``backup``, which clones share
    (GGUF's patcher never patches a quantized weight: it hangs the patches on the tensor).
    """

    def __init__(self, patcher, label: str):
        self.patcher = patcher
        self.label = label
        model = patcher.model
        own = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
        self.state = {key: own.get(key, tensor) for key, tensor in model.state_dict(keep_vars=True).items()
                      if key in own or tensor.device.type != "meta"}  # GGUF's fake "temp.weight": dropped

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def stored(self, key: str) -> torch.Tensor:
        """The unpatched weight as ComfyUI keeps it (a backup is the parameter itself: detached here)."""
        backup = (getattr(self.patcher, "backup", None) or {}).get(key)
        tensor = backup.weight if backup is not None else self.state[key]
        return tensor if is_gguf(tensor) else tensor.detach()  # GGMLTensor.detach() drops nothing, but is a no-op

    def shape(self, key: str) -> tuple[int, ...]:
        tensor = self.stored(key)
        return tuple(tensor.tensor_shape if is_gguf(tensor) else tensor.shape)

    def read(self, key: str, device=None, rows: Optional[int] = None) -> torch.Tensor:
        """fp32 weight as the host patches it (``convert_weight`` of scaled-fp8 ops applied); ``rows``: only
        the first rows (the fingerprint's sample; a GGUF weight, whose stored rows are blocks, whole first)."""
        tensor = self.stored(key)
        device = device if device is not None else tensor.device
        if rows is not None and not is_gguf(tensor):
            tensor = tensor[:rows]
        weight = to_fp32(tensor, device, key)
        if rows is not None:
            weight = weight[:rows]
        _, _, convert = comfy.model_patcher.get_key_weight(self.patcher.model, key)
        return convert(weight, inplace=True) if convert is not None else weight


# --- placing layers -----------------------------------------------------------------------------------------

_PROBE_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".up.weight")
_FACTOR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".down.weight",
                    ".up.weight")


def host_prefixes(prefixes: Iterable[str]) -> dict[str, list[str]]:
    """Each LoRA key prefix, then what the host's ``convert_lora`` renames it to (Wan Fun's ``lora_unet__``,
    USO ...): the file's keys are probed with factor suffixes and followed through the host's own code."""
    prefixes = list(dict.fromkeys(prefixes))
    out = {p: [p] for p in prefixes}
    probe, origin = {}, {}
    for prefix in prefixes:
        for suffix in _PROBE_SUFFIXES:
            marker = torch.zeros(1, 1)
            probe[prefix + suffix] = marker
            origin[id(marker)] = prefix
    try:
        converted = comfy.lora_convert.convert_lora(probe)
    except Exception:  # a converter that needs tensors a probe lacks: the host would not rename these keys
        return out
    for key, marker in converted.items():
        prefix = origin.get(id(marker))
        suffix = next((s for s in _FACTOR_SUFFIXES if key.endswith(s)), None)
        if prefix is not None and suffix is not None and key[: -len(suffix)] not in out[prefix]:
            out[prefix].append(key[: -len(suffix)])
    return out


def host_key_map(model=None, clip=None) -> dict[str, object]:
    """ComfyUI's merged LoRA key map, built as ``comfy.sd.load_lora_for_models`` builds it."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def _split(value) -> tuple[str, Offset, Function]:
    if isinstance(value, str):
        return value, None, None
    return value[0], (tuple(value[1]) if value[1] is not None else None), (value[2] if len(value) > 2 else None)


def _is_involution(function: Callable, shape: tuple[int, ...]) -> bool:
    """Whether ``function`` undoes itself on tensors of ``shape``'s rows (Flux's swap_scale_shift does): probed
    on a thin tensor with the slice's rows, so a wide weight costs nothing."""
    thin = (shape[0], *(min(2, int(s)) for s in shape[1:]))
    probe = torch.randn(thin, generator=torch.Generator().manual_seed(0))
    return torch.equal(function(function(probe.clone())), probe)


class HostBase(BaseWeights):
    """The connected MODEL/CLIP as a base, named by model key (without ``.weight``; ``#dimD`` for a slice along
    another dim): the names the engine scores and the norms cache keys by, whatever the LoRA's naming. A
    weight is the host's slice, in the LoRA file's frame. :meth:`by_layer_name` is the same weights under the
    LoRA's own layer names (for the DoRA refit of the rebuilt layers)."""

    def __init__(self, sources: Sequence[HostWeights], key_map: Mapping[str, object], label: str,
                 architecture: Optional[str]):
        self.sources = list(sources)
        self.key_map = dict(key_map)
        self.label = label
        self.architecture = architecture
        self._fingerprint: Optional[str] = None
        self._entries: dict[tuple[str, Offset], Placement] = {}
        self._by_layer: dict[tuple[str, Offset], Placement] = {}
        self._probed: dict[int, bool] = {}

    @property
    def fingerprint(self) -> str:  # read only when norms are cached: sampling weights costs a few reads
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.sources)
        return self._fingerprint

    # placement

    def place(self, layer: Layer, candidates: Sequence[str]) -> Optional[Placement]:
        """Where the host applies ``layer`` (its key prefix or a converted one found in the map), or None."""
        for prefix in candidates:
            value = self.key_map.get(prefix)
            if value is None:
                continue
            key, offset, function = _split(value)
            source = next((s for s in self.sources if key in s), None)
            if source is None:
                continue  # mapped to a model the user did not connect (CLIP keys with MODEL only ...)
            stem = key[: -len(".weight")] if key.endswith(".weight") else key
            if layer.name == stem:
                function = None  # read by our tables: the layer is in the model's rows (halves already swapped)
            return Placement(source, key, offset, function)
        return None

    def register(self, layer: Layer, where: Placement) -> Layer:
        """Records the placement; returns the layer as the engine must score it (model name, host slice)."""
        if where.function is not None and id(where.function) not in self._probed:
            self._probed[id(where.function)] = _is_involution(where.function, self._slice_shape(where))
        if where.function is not None and not self._probed[id(where.function)]:
            raise LoraError("ComfyUI maps this layer through a function that is not its own inverse, so its base "
                            "weight cannot be brought into the LoRA's rows", file=self.label, layer=layer.source_key,
                            fix="use a recipe that needs no base (spn_lora/fro_lora/params, rank=, sv_ratio=)")
        known = self._entries.setdefault((where.name, where.offset), where)
        if known != where:
            raise LoraError(f"two layers of this LoRA reach {where.name} in different frames ({known.key} and "
                            f"{where.key})", file=self.label, layer=layer.source_key or layer.name,
                            fix="the file mixes naming styles; keep one of them")
        self._by_layer[(layer.name, layer.offset)] = where
        return dataclasses.replace(layer, name=where.name, offset=where.offset)

    def by_layer_name(self) -> "HostBase":
        """A view answering by the LoRA's own layer names (and offsets), as the rebuilt layers carry them."""
        view = HostBase(self.sources, self.key_map, self.label, self.architecture)
        view._fingerprint, view._entries, view._probed = self._fingerprint, dict(self._by_layer), self._probed
        return view

    # the engine's protocol

    def names(self) -> set[str]:
        return {name for name, _ in self._entries}

    def placement(self, name: str, offset: Offset = None) -> Placement:
        """Where the host applies the layer the engine knows as ``name`` (and ``offset``)."""
        entry = self._entries.get((name, offset))
        if entry is None:
            raise LoraError("ComfyUI's key map places no layer on this weight", file=self.label, layer=name,
                            fix="connect the MODEL/CLIP this LoRA was trained for")
        return entry

    def _slice_shape(self, where: Placement) -> tuple[int, ...]:
        shape = list(where.source.shape(where.key))
        if where.offset is not None:
            shape[where.offset[0]] = where.offset[2]
        return tuple(shape)

    def shape(self, name: str, offset: Offset = None) -> tuple[int, ...]:
        return self._slice_shape(self.placement(name, offset))

    def weight(self, name: str, offset: Offset = None, device=None, reuse: bool = False) -> torch.Tensor:
        """The slice as the host patches it, fp32, dequantized from this one stored weight only."""
        where = self.placement(name, offset)
        weight = where.source.read(where.key, device)
        if where.offset is not None:
            weight = weight.narrow(where.offset[0], where.offset[1], where.offset[2])
        if where.function is not None:  # the host adds function(ΔW_file): W in the file's rows is function(W)
            weight = where.function(weight.contiguous())
        return weight

    def largest_slice(self) -> int:
        """Elements of the largest placed slice: what one norm worker holds at a time."""
        return max((int(torch.Size(self._slice_shape(w)).numel()) for w in self._entries.values()), default=0)


def fingerprint(sources: Sequence[HostWeights]) -> str:
    """Identifies the loaded weights by content: names, shapes, dtypes and the first values of a few sampled
    weights as the host dequantizes them (a scaled-fp8 model differs from its plain-fp8 bytes)."""
    digest = hashlib.sha256()
    keys = []
    for source in sources:
        for key in sorted(source.state):
            tensor = source.stored(key)
            if key.endswith(".weight") and len(source.shape(key)) >= 2:
                keys.append((source, key))
                kind = f"gguf:{getattr(tensor.tensor_type, 'name', tensor.tensor_type)}" if is_gguf(tensor) else tensor.dtype
                digest.update(f"{key}:{source.shape(key)}:{kind};".encode())
    for source, key in keys[:: max(1, len(keys) // 8)][:8]:
        columns = max(1, int(torch.Size(source.shape(key)[1:]).numel()))
        sample = source.read(key, rows=max(1, 4096 // columns)).flatten()[:4096]
        digest.update(sample.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "model:" + digest.hexdigest()


def unplaced_error(missing: Sequence[Layer], total: int, label: str, clip_connected: bool) -> LoraError:
    """The host would not load these layers either: how many, which, and what to connect."""
    names = [layer.source_key or layer.name for layer in missing]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    text_encoder = any(n.startswith(("lora_te", "text_encoder", "text_encoders.", "clip_", "t5")) for n in names)
    fix = ("connect the CLIP too (these are text-encoder layers)" if text_encoder and not clip_connected else
           "connect the MODEL/CLIP this LoRA was trained for, or use a recipe that needs no base "
           "(spn_lora/fro_lora/params, rank=, sv_ratio=)")
    return LoraError(f"{len(missing)} of {total} LoRA layers are placed on no weight by ComfyUI's key map for the "
                     f"connected MODEL/CLIP (ComfyUI would not load them either): {shown}", file=label, fix=fix)


def placed_layers(base: HostBase, layers: Sequence[Layer]) -> tuple[dict[str, Layer], list[Layer]]:
    """(layer key -> layer as the engine scores it, layers the host places nowhere)."""
    candidates = host_prefixes(layer.source_key or layer.name for layer in layers)
    placed, missing = {}, []
    for layer in layers:
        prefixes = candidates[layer.source_key or layer.name]
        if not layer.source_key:  # built in memory: our canonical name is the model key
            prefixes = [*prefixes, f"text_encoders.{layer.name}"]
        where = base.place(layer, prefixes)
        if where is None:
            missing.append(layer)
        else:
            placed[layer_key(layer)] = base.register(layer, where)
    return placed, missing

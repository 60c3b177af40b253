"""Base checkpoint weights by canonical layer name, read tensor by tensor.

Single ``.safetensors`` files (ComfyUI/SGM checkpoints with ``model.diffusion_model.``, SDXL with OpenCLIP
bigG, bare diffusion-model files of any registered family as UNETLoader takes them) and diffusers folders
(the family from the model's or pipeline's ``_class_name``). Only the
tensors a LoRA needs are ever read (by offset, with pread: no mmap), never the whole file. Inside
ComfyUI, :class:`StateDictBase` wraps the tensors the host already holds.
A weight holding NaN or Inf is refused by ``nonfinite_error``, naming the file, the tensor and the
first bad row: its norms would poison every score (and the norms cache).
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import re
import threading
from collections import defaultdict
from typing import Iterable, Mapping, Optional

import torch

from . import naming
from .buffers import GrowBuffers
from .errors import LoraError
from .formats.conventions import split_key
from .safetensors_io import DTYPE_SIZES, data_start, read_header, read_rows

Offset = Optional[tuple[int, int, int]]
# (file, key, (row start, row count) or None) for each canonical name; a fused diffusers target
# has several pieces, concatenated by rows.
Piece = tuple[str, str, Optional[tuple[int, int]]]

# Single-file key prefixes -> canonical prefixes (SGM checkpoints, ComfyUI's own saves, BFL Flux).
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "diffusion_model."),
    ("conditioner.embedders.0.transformer.", "clip_l.transformer."),
    ("cond_stage_model.transformer.", "clip_l.transformer."),
    ("text_encoders.clip_l.transformer.", "clip_l.transformer."),
    ("text_encoders.clip_g.transformer.", "clip_g.transformer."),
    ("text_encoders.t5xxl.transformer.", "t5xxl.transformer."),
    ("diffusion_model.", "diffusion_model."),
)
# OpenCLIP bigG: embedder 1 in SDXL base (after CLIP-L), embedder 0 in the SDXL Refiner (its only encoder)
_OPENCLIP = re.compile(r"conditioner\.embedders\.[01]\.model\.transformer\.resblocks\.(\d+)\.(.+)")
_OPENCLIP_PARTS = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                   "mlp.c_proj.weight": "mlp.fc2"}
_QKV = ("q_proj", "k_proj", "v_proj")  # OpenCLIP's in_proj rows are q, k, v in this order


def _file_fingerprint(path: str) -> str:
    """Cheap and content-sensitive: size, mtime and the header bytes (names, shapes, offsets)."""
    stat = os.stat(path)
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        digest = hashlib.sha256(fh.read(min(header_len, 100 << 20))).hexdigest()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest[:32]}"


class BaseWeights:
    """Protocol of base-weight sources: names, shapes and fp32 weights by canonical name."""

    label: str = "<base>"
    fingerprint: str = ""
    architecture: Optional[str] = None  # "sd15", "sdxl", "flux" when the source says so

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str, offset: Offset = None) -> tuple[int, ...]:
        raise NotImplementedError

    def weight(self, name: str, offset: Offset = None, device=None, reuse: bool = False) -> torch.Tensor:
        """fp32 weight (rows sliced by ``offset``). ``reuse``: the result may live in a buffer that
        the next ``reuse`` call overwrites (for callers that only reduce it to numbers)."""
        raise NotImplementedError

    def nonfinite_error(self, name: str, offset: Offset, weight: torch.Tensor) -> NonFiniteWeight:
        """The error for a weight (as ``weight`` returned it) whose norms are not finite."""
        start = offset[1] if offset else 0
        return _nonfinite_error(weight, lambda row: (self.label, name, start + row))


class NonFiniteWeight(LoraError):
    """A base weight holds NaN or Inf: the checkpoint is corrupt."""


_CORRUPT_FIX = ("this checkpoint is corrupt: re-download it (or check its hash), or use a recipe that needs "
                "no base (spn_lora/fro_lora/params, rank=, sv_ratio=)")


def _nonfinite_error(weight: torch.Tensor, locate) -> NonFiniteWeight:
    """What is wrong with ``weight`` (fp32, all rows of the base slice); ``locate(row)`` -> (file, key, row)."""
    finite = torch.isfinite(weight)
    if bool(finite.all()):  # every value finite: only its norm overflowed fp32
        file, key, _ = locate(0)
        peak = float(weight.abs().max()) if weight.numel() else 0.0
        return NonFiniteWeight(f"the base weight's norms overflow fp32 (values up to {peak:.3g})", file=file,
                               layer=key, fix=_CORRUPT_FIX)
    flat = weight.reshape(weight.shape[0], -1) if weight.dim() else weight.reshape(1, 1)
    nan = int(torch.isnan(flat).sum())
    inf = int(flat.numel() - int(finite.sum()) - nan)
    row, column = (int(v) for v in (~torch.isfinite(flat)).nonzero()[0])
    file, key, file_row = locate(row)
    return NonFiniteWeight(f"the base weight holds {nan} NaN and {inf} Inf values among {flat.numel()} "
                           f"(first at row {file_row}, column {column})", file=file, layer=key, fix=_CORRUPT_FIX)


def _rows(shape: tuple[int, ...], offset: Offset) -> tuple[int, ...]:
    return shape if offset is None else (offset[2], *shape[1:])


class SafetensorsBase(BaseWeights):
    """One or more safetensors files, indexed by canonical name when opened; read lazily."""

    def __init__(self, pieces: Mapping[str, list[Piece]], entries: Mapping[tuple[str, str], dict],
                 label: str, fingerprint: str):
        self.pieces = dict(pieces)
        self._entries = dict(entries)  # (file, key) -> header entry
        self.label = label
        self.fingerprint = fingerprint
        self._starts: dict[str, int] = {}
        self._local = threading.local()  # read buffers per thread: norms are computed by several

    @property
    def _buffers(self) -> GrowBuffers:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = GrowBuffers()
        return buffers

    def names(self) -> set[str]:
        return set(self.pieces)

    def _pieces(self, name: str) -> list[Piece]:
        try:
            return self.pieces[name]
        except KeyError:
            raise LoraError("the base checkpoint has no such weight", file=self.label, layer=name,
                            fix="use the checkpoint this LoRA was made for") from None

    def shape(self, name: str, offset: Offset = None) -> tuple[int, ...]:
        pieces = self._pieces(name)
        first = self._entries[(pieces[0][0], pieces[0][1])]["shape"]
        rows = sum(r[1] if r else self._entries[(f, k)]["shape"][0] for f, k, r in pieces)
        return _rows((rows, *first[1:]), offset)

    def _plan(self, name: str, offset: Offset) -> list[tuple[str, str, dict, int, int]]:
        """(path, key, entry, first row, row count) of each piece the (sliced) weight reads."""
        plan = []
        skip = offset[1] if offset else 0
        want = offset[2] if offset else None
        for path, key, rows in self._pieces(name):
            entry = self._entries[(path, key)]
            first, count = rows if rows else (0, entry["shape"][0])
            if skip >= count:  # the slice starts after this piece
                skip -= count
                continue
            take = count - skip if want is None else min(count - skip, want)
            plan.append((path, key, entry, first + skip, take))
            skip = 0
            if want is not None:
                want -= take
                if want == 0:
                    break
        return plan

    def nonfinite_error(self, name: str, offset: Offset, weight: torch.Tensor) -> NonFiniteWeight:
        """Names the file and tensor key holding the first bad row (a diffusers q/k/v weight has several)."""
        plan = self._plan(name, offset)

        def locate(row: int) -> tuple[str, str, int]:
            for path, key, _, first, take in plan:
                if row < take:
                    return path, key, first + row
                row -= take
            path, key, _, first, _ = plan[-1]
            return path, key, first

        return _nonfinite_error(weight, locate)

    def weight(self, name: str, offset: Offset = None, device=None, reuse: bool = False) -> torch.Tensor:
        """fp32 weight (rows sliced by ``offset``), reading only those rows from disk. Safe to call
        from several threads; ``reuse`` buffers are per thread."""
        plan = [(path, entry, first, take) for path, _, entry, first, take in self._plan(name, offset)]
        for path, _, _, _ in plan:
            if path not in self._starts:
                self._starts[path] = data_start(path)
        sizes = [take * math.prod(entry["shape"][1:]) * DTYPE_SIZES[entry["dtype"]] for _, entry, _, take in plan]
        raw = memoryview(self._buffers.take("raw", (sum(sizes),), torch.uint8).numpy())
        parts, position = [], 0
        for (path, entry, first, take), size in zip(plan, sizes):
            parts.append(read_rows(path, entry, self._starts[path], (first, take), out=raw[position:position + size]))
            position += size
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        target = self._buffers.take("weight", shape, torch.float32, device) if reuse else \
            torch.empty(shape, dtype=torch.float32, device=device)
        row = 0
        for part in parts:  # one converting copy per piece, straight from the read buffer
            target[row:row + part.shape[0]].copy_(part)
            row += part.shape[0]
        return target


class StateDictBase(BaseWeights):
    """Tensors already in memory (ComfyUI's loaded MODEL/CLIP), keyed by canonical name."""

    def __init__(self, weights: Mapping[str, torch.Tensor], fingerprint: str, label: str = "<loaded model>",
                 architecture: Optional[str] = None):
        self.weights = dict(weights)
        self.fingerprint = fingerprint
        self.label = label
        self.architecture = architecture

    def names(self) -> set[str]:
        return set(self.weights)

    def shape(self, name: str, offset: Offset = None) -> tuple[int, ...]:
        return _rows(tuple(self.weights[name].shape), offset)

    def weight(self, name: str, offset: Offset = None, device=None, reuse: bool = False) -> torch.Tensor:
        weight = self.weights[name]
        if offset is not None:
            weight = weight[offset[1]:offset[1] + offset[2]]
        return weight.to(device=device if device is not None else weight.device, dtype=torch.float32)


def _single_file_name(key: str) -> list[tuple[str, Optional[tuple[int, int]]]]:
    """Canonical names (with OpenCLIP row pieces) a checkpoint key provides; [] if none."""
    if not key.endswith(".weight") and not key.endswith("in_proj_weight"):
        return []
    m = _OPENCLIP.fullmatch(key)
    if m:
        layer, rest = m.groups()
        root = f"clip_g.transformer.text_model.encoder.layers.{layer}."
        if rest == "attn.in_proj_weight":
            return [(root + f"self_attn.{proj}", (i, None)) for i, proj in enumerate(_QKV)]
        return [(root + _OPENCLIP_PARTS[rest], None)] if rest in _OPENCLIP_PARTS else []
    stem = key[: -len(".weight")]
    for prefix, canonical in _PREFIXES:
        if stem.startswith(prefix):
            return [(canonical + stem[len(prefix):], None)]
    if stem.startswith(naming.diffusion_roots()):  # a bare diffusion-model file (UNETLoader's kind)
        return [("diffusion_model." + stem, None)]
    return []


def _release_names_renamed(pieces: dict[str, list[Piece]]) -> dict[str, list[Piece]]:
    """A base in its original release's names (Tencent's HunyuanVideo) read under ComfyUI's names, renamed by the
    family's table as ComfyUI renames it on load, so the LoRA's layers (named for ComfyUI's model) find it."""
    unet = "diffusion_model."
    keys = [name[len(unet):] + ".weight" for name in pieces if name.startswith(unet)]
    original = naming.original_base_family(keys)
    if original is None:
        return pieces
    renamed = {}
    for name, value in pieces.items():
        if name.startswith(unet):
            key = original.base_key(name[len(unet):] + ".weight")
            name = unet + (key[: -len(".weight")] if key.endswith(".weight") else key)
        renamed[name] = value
    return renamed


def _looks_like_lora(keys: Iterable[str]) -> bool:
    """Any key holding a LoRA factor (up/down, LoHa, LoKr): base checkpoints have none."""
    return any((parts := split_key(k)) is not None and parts[1] in ("lora", "loha", "lokr") for k in keys)


def _open_file(path: str) -> SafetensorsBase:
    header, _ = read_header(path)
    if _looks_like_lora(header):
        raise LoraError("this is a LoRA, not a base checkpoint", file=path,
                        fix="give the base model (e.g. sd_xl_base_1.0.safetensors) as CHECKPOINT")
    pieces: dict[str, list[Piece]] = {}
    entries = {}
    for key, info in header.items():
        shape = tuple(info["shape"])
        if len(shape) < 2:
            continue
        for name, qkv in _single_file_name(key):
            entries[(path, key)] = info
            rows = None
            if qkv is not None:
                third = shape[0] // 3
                rows = (qkv[0] * third, third)
            pieces[name] = [(path, key, rows)]
    pieces = _release_names_renamed(pieces)
    if not pieces:
        raise LoraError("no model weights recognised in this checkpoint", file=path,
                        fix="give an SD1.5, SDXL or Flux checkpoint in .safetensors format or a diffusers folder")
    return SafetensorsBase(pieces, entries, path, _file_fingerprint(path))


_DIFFUSERS_PARTS = {"unet": "unet.", "transformer": "transformer.", "text_encoder": "text_encoder.",
                    "text_encoder_2": "text_encoder_2.", "text_encoder_3": "text_encoder_3."}


def _class_names(path: str) -> list[str]:
    """``_class_name`` of the pipeline (model_index.json) and of its transformer/unet (config.json)."""
    import json

    names = []
    for config in ("model_index.json", os.path.join("transformer", "config.json"), os.path.join("unet", "config.json")):
        try:
            with open(os.path.join(path, config), encoding="utf-8") as fh:
                value = json.load(fh).get("_class_name")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            names.append(value)
    return names


def _folder_architecture(path: str, files: Mapping[str, list[str]]) -> str:
    """The family of a diffusers folder: from its class names, else by its parts (as before families)."""
    named = naming.diffusers_family(_class_names(path))
    if named == "sdxl_refiner" and "text_encoder" in files:
        return "sdxl"  # an SDXL base saved as an img2img pipeline (the Refiner has CLIP-G only)
    if named:
        return named
    return "flux" if "transformer" in files else "sdxl" if "text_encoder_2" in files else "sd15"


def _open_folder(path: str) -> SafetensorsBase:
    files: dict[str, list[str]] = {}
    for sub in _DIFFUSERS_PARTS:
        found = sorted(glob.glob(os.path.join(path, sub, "*.safetensors")))
        plain = [f for f in found if ".fp16." not in os.path.basename(f)]
        if found:
            files[sub] = plain or found
    if not files:
        raise LoraError("not a diffusers folder (no unet/, transformer/ or text_encoder/ safetensors)", file=path,
                        fix="give a single .safetensors checkpoint or a diffusers model folder")
    arch = _folder_architecture(path, files)
    pieces: dict[str, list[tuple[Piece, tuple[int, int]]]] = defaultdict(list)
    entries = {}
    fingerprints = []
    for sub, paths in files.items():
        for file in paths:
            header, _ = read_header(file)
            fingerprints.append(_file_fingerprint(file))
            for key, info in header.items():
                if not key.endswith(".weight") or len(info["shape"]) < 2:
                    continue
                target = naming.to_canonical(_DIFFUSERS_PARTS[sub] + key[: -len(".weight")], arch)
                if target is None:
                    continue
                entries[(file, key)] = info
                # row order of the pieces: a part's start, or a grouped-query slice's (model width, own rows) rule
                order = (target.part[0], 0) if target.part else target.rows_after or (0, 0)
                pieces[target.name].append(((file, key, None), order))
    ordered = {name: [p for p, _ in sorted(items, key=lambda item: item[1])]
               for name, items in pieces.items()}
    fingerprint = hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:32]
    return SafetensorsBase(ordered, entries, path, fingerprint)


def open_base(path: str) -> BaseWeights:
    """A base checkpoint: a single .safetensors file, a diffusers folder, or a GGUF file (core/gguf_base.py)."""
    if os.path.isdir(path):
        return _open_folder(path)
    if not os.path.exists(path):
        raise LoraError("checkpoint not found", file=path, fix="check the path")
    from .gguf_base import GgufBase, is_gguf_file

    if is_gguf_file(path):
        return GgufBase(path)
    return _open_file(path)

"""Base checkpoints in GGUF (city96's ComfyUI-GGUF files of Flux, Wan, Qwen-Image ...): many users keep only those.

Read with the ``gguf`` library (llama.cpp's own reader, on PyPI: ``pip install gguf``, an optional extra of this
pack; it memory-maps the file and never unpickles). Tensor names are ComfyUI's diffusion-model names, with or
without ``model.diffusion_model.`` (as ComfyUI-GGUF's loader takes them), so they match as a bare diffusion-model
file does (core/base.py). Each weight is dequantized alone, by ``gguf.quants.dequantize`` (Q4_0 ... Q8_0, the
K-quants, BF16/F16/F32), to the exact fp32 values the file holds, and only the rows a slice needs when every row
is a whole number of blocks; shapes come from the file, or from ComfyUI-GGUF's ``comfy.gguf.orig_shape.*`` keys
for tensors its converter reshaped.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import numpy as np
import torch

from .base import BaseWeights, Offset, _rows, _single_file_name
from .errors import LoraError

MAGIC = b"GGUF"
_PREFIX = "model.diffusion_model."  # ComfyUI-GGUF strips it when every tensor has it
_ORIG_SHAPE = "comfy.gguf.orig_shape."


def is_gguf_file(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def _library(path: str):
    try:
        import gguf
    except ImportError:
        raise LoraError("this base checkpoint is a GGUF file, and reading GGUF needs the gguf library",
                        file=path, fix='pip install gguf (or pip install "comfyui-lora-resize[gguf]"), or give '
                        "the .safetensors original") from None
    return gguf


class GgufBase(BaseWeights):
    """One GGUF file's weight matrices by canonical name; each read and dequantized only when asked for."""

    def __init__(self, path: str):
        gguf = _library(path)
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except Exception as exc:  # the library's own errors for a bad header: ValueError, struct.error ...
            raise LoraError(f"not a GGUF file the gguf library can read ({type(exc).__name__}: {exc})"[:300],
                            file=path, fix="the file is truncated or corrupt; get it again") from None
        self._gguf = gguf
        self.label = path
        tensors = {t.name: t for t in self._reader.tensors}
        prefixed = bool(tensors) and all(name.startswith(_PREFIX) for name in tensors)
        self._tensors, self._shapes = {}, {}
        for name, tensor in tensors.items():
            key = name[len(_PREFIX):] if prefixed else name
            shape = self._orig_shape(name) or tuple(int(v) for v in reversed(tensor.shape.tolist()))
            if len(shape) < 2:
                continue
            for canonical, pieces in _single_file_name(key):
                if pieces is None:  # OpenCLIP's fused in_proj is never in a GGUF diffusion model
                    self._tensors[canonical], self._shapes[canonical] = tensor, shape
        if not self._tensors:
            raise LoraError("no diffusion-model weights recognised in this GGUF file", file=path,
                            fix="give the GGUF of the diffusion model this LoRA was made for (text encoders in GGUF "
                            "are not read), or its .safetensors original")
        first = min(int(t.data_offset) for t in tensors.values())
        stat = os.stat(path)
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read(min(first, 100 << 20))).hexdigest()
        self.fingerprint = f"gguf:{stat.st_size}:{stat.st_mtime_ns}:{digest[:32]}"

    def _orig_shape(self, name: str) -> Optional[tuple[int, ...]]:
        field = self._reader.get_field(_ORIG_SHAPE + name)
        if field is None:
            return None
        try:
            return tuple(int(v) for v in field.contents())
        except (TypeError, ValueError):
            raise LoraError(f"its {_ORIG_SHAPE}{name} entry is not a list of integers", file=self.label,
                            layer=name, fix="the file is corrupt; get it again") from None

    def names(self) -> set[str]:
        return set(self._tensors)

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise LoraError("the base checkpoint has no such weight", file=self.label, layer=name,
                            fix="use the checkpoint this LoRA was made for") from None

    def shape(self, name: str, offset: Offset = None) -> tuple[int, ...]:
        self._tensor(name)
        return _rows(self._shapes[name], offset)

    def weight(self, name: str, offset: Offset = None, device=None, reuse: bool = False) -> torch.Tensor:
        tensor, shape = self._tensor(name), self._shapes[name]
        data = tensor.data
        rows = int(tensor.shape.tolist()[-1])  # the stored rows (gguf lists dimensions innermost first)
        whole_rows = data.ndim >= 1 and data.shape[0] == rows == shape[0]  # each stored row is one weight row
        if offset is not None and whole_rows:
            data = data[offset[1]:offset[1] + offset[2]]
        try:
            values = self._gguf.quants.dequantize(np.asarray(data), tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise LoraError(f"its {getattr(tensor.tensor_type, 'name', tensor.tensor_type)} tensor cannot be "
                            f"dequantized by this gguf library ({exc})", file=self.label, layer=tensor.name,
                            fix="pip install -U gguf, or give the .safetensors original") from None
        count = offset[2] if offset is not None and whole_rows else shape[0]
        # an F32 tensor comes back as the file's own read-only mapping: always a private, writable fp32 copy
        values = np.require(values, dtype=np.float32, requirements=["C", "W", "O"])
        weight = torch.from_numpy(values).reshape(count, *shape[1:])
        if offset is not None and not whole_rows:
            weight = weight[offset[1]:offset[1] + offset[2]]
        return weight.to(device) if device is not None else weight

"""Reading and writing safetensors files safely: validate before trusting (writes: core/atomic.py).

The header is checked by hand before safetensors touches the file, so a truncated, empty or
hostile file (or a pickle renamed .safetensors) gets a :class:`LoraError` naming it instead of a
Rust panic or, worse, an unpickle. Nothing here ever calls ``torch.load``.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from safetensors import safe_open

from .errors import LoraError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Validated header of a safetensors file: ({key: {dtype, shape, data_offsets}}, metadata).

    Raises LoraError for anything that is not a well-formed safetensors file, without reading the
    tensor data.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise LoraError(f"file is empty or shorter than a safetensors header ({size} bytes)",
                                file=path, fix="the download or copy was cut short; get the file again")
            if head[:2] in _PICKLE_MAGICS or head[:4] in _PICKLE_MAGICS:
                raise LoraError("this is a pickle/PyTorch (.ckpt/.pt/.bin) file, which is never unpickled "
                                "because it can run code", file=path,
                                fix="use the .safetensors version of this LoRA, or convert it with a tool you trust")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER or header_len > size - 8:
                raise LoraError(f"header length {header_len} runs past the end of the {size}-byte file",
                                file=path, fix="the file is truncated or not a safetensors file; get it again")
            raw = fh.read(header_len)
    except OSError as exc:
        raise LoraError(f"cannot read file ({exc.strerror or exc})", file=path,
                        fix="check the path and its permissions") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraError(f"header is not valid safetensors JSON ({exc})", file=path,
                        fix="the file is corrupt or not a safetensors file") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    for key, info in header.items():
        _check_entry(path, key, info, data_len)
    return header, {str(k): str(v) for k, v in metadata.items()}


def _check_entry(path: str, key: str, info: object, data_len: int) -> None:
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError) as exc:
        raise LoraError("malformed tensor entry in header", file=path, layer=key,
                        fix="the file is corrupt; get it again") from exc
    if dtype not in DTYPE_SIZES:
        raise LoraError(f"unknown dtype {dtype!r}", file=path, layer=key, fix="re-save the LoRA in fp16/bf16/fp32")
    if end > data_len or start > end or start < 0:
        raise LoraError(f"tensor data [{start}:{end}] lies past the end of the file's {data_len} data bytes",
                        file=path, layer=key, fix="the file is truncated; get it again")
    if math.prod(shape) * DTYPE_SIZES[dtype] != end - start:
        raise LoraError(f"tensor of shape {shape} {dtype} does not fit its {end - start} bytes", file=path,
                        layer=key, fix="the file is corrupt; get it again")


def load_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a validated file, as stored (no dtype conversion); all of them unless ``keys``."""
    path = str(path)
    header, _ = read_header(path)
    wanted = list(header) if keys is None else list(keys)
    if keys is not None:
        with safe_open(path, framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in wanted}
    # The whole file: one read into one buffer, tensors as views of it. safe_open copies every tensor
    # out of its mmap through Python-level storage slicing (0.9 s for a 442 MiB LoRA); a bytearray
    # would be zero-filled first (another 0.3 s): an uninitialised uint8 tensor is read into instead.
    start = data_start(path)
    data = torch.empty(os.path.getsize(path) - start, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        view, done = memoryview(data.numpy()), 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise LoraError("file ended while reading its tensors", file=path, fix="the file is truncated")
            done += got
    out: dict[str, torch.Tensor] = {}
    odd: list[str] = []
    for key in wanted:
        info = header[key]
        begin, end = info["data_offsets"]
        dtype = _ST_TO_TORCH.get(info["dtype"])
        if dtype is None:
            odd.append(key)  # fp8 and unsigned kinds: safetensors converts them
        elif end == begin:
            out[key] = torch.empty(info["shape"], dtype=dtype)
        else:
            raw = data[begin:end]
            if begin % DTYPE_SIZES[info["dtype"]]:
                raw = raw.clone()  # misaligned for its type: an aligned copy
            out[key] = raw.view(dtype).reshape(info["shape"])
    if odd:
        with safe_open(path, framework="pt", device="cpu") as fh:
            out.update({k: fh.get_tensor(k) for k in odd})
    return {k: out[k] for k in wanted}


_ST_TO_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def data_start(path: str | os.PathLike) -> int:
    """Byte offset where a (validated) safetensors file's tensor data begins."""
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def read_rows(path: str, info: Mapping, start: int, rows: Optional[tuple[int, int]] = None,
              out: Optional[memoryview] = None) -> torch.Tensor:
    """One tensor (or a block of its rows) read into a private buffer, not mmapped: reading a 6 GB
    checkpoint layer by layer keeps only the current layer in memory. With ``out`` (exactly the
    bytes needed) the tensor is read into that caller-owned buffer and is a view of it."""
    shape = list(info["shape"])
    dtype = info["dtype"]
    row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[dtype]
    first, count = rows if rows is not None else (0, shape[0])
    offset = start + info["data_offsets"][0] + first * row_bytes
    nbytes = count * row_bytes
    if out is None:
        out = memoryview(bytearray(nbytes))
    elif len(out) != nbytes:
        raise ValueError(f"buffer of {len(out)} bytes for a {nbytes}-byte read")
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        done = 0
        while done < nbytes:
            got = fh.readinto(out[done:])
            if not got:
                raise LoraError("file ended while reading a tensor", file=path, fix="the file is truncated")
            done += got
    if not nbytes:
        return torch.empty([count, *shape[1:]], dtype=_ST_TO_TORCH[dtype])
    return torch.frombuffer(out, dtype=_ST_TO_TORCH[dtype]).reshape(count, *shape[1:])


# safetensors orders tensors by dtype (its enum order, descending), then by name
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64"]
_TORCH_TO_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def _ordered(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...], str]]:
    entries = [(_TORCH_TO_ST[dtype], tuple(shape), key) for key, (dtype, shape) in specs.items()]
    return sorted(entries, key=lambda e: (-_DTYPE_ORDER.index(e[0]), e[2]))


def _header_text(specs, metadata) -> tuple[bytes, int]:
    """(padded JSON header, data length) as safetensors lays them out for tensors of these specs."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for dtype, shape, key in _ordered(specs):
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return text + b" " * ((-len(text)) % 8), offset


def _header_and_data_size(specs, metadata) -> tuple[int, int]:
    text, data = _header_text(specs, metadata)
    return 8 + len(text), data


def safetensors_size(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> int:
    """Exact size of a safetensors file of tensors of these dtypes and shapes (as written here)."""
    header, data = _header_and_data_size(specs, metadata)
    return header + data


def data_chunks(tensors: Mapping[str, torch.Tensor]):
    """The data section of a serialized file, tensor by tensor in safetensors' order, without copying."""
    by_key = {key: tensor for key, tensor in tensors.items()}
    specs = {key: (t.dtype, tuple(t.shape)) for key, t in tensors.items()}
    for _, _, key in _ordered(specs):
        tensor = by_key[key].detach().cpu().contiguous()
        yield tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""


def header_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Bytes before the data section (8-byte length + padded JSON) of a serialization."""
    return _header_and_data_size({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata)[0]


def header_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and padded JSON header that precede ``data_chunks(tensors)`` in a file."""
    text, _ = _header_text({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata)
    return struct.pack("<Q", len(text)) + text

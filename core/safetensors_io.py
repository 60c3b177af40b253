"""Reading and writing safetensors files safely: validate before trusting (writes: core/atomic.py).

The header is checked by hand, as strictly as the safetensors library checks it, before anything
touches the data, so a truncated, empty or hostile file (or a pickle renamed .safetensors) gets a
:class:`LoraError` naming it and the tensor instead of a traceback, a Rust panic or, worse, an
unpickle. Nothing here ever calls ``torch.load``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
from safetensors import safe_open

from .errors import LoraError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# safetensors' dtype names and torch's: fp8 included (ComfyUI ships fp8 checkpoints and LoRAs); an old
# torch without some of these types reads such files as an unknown dtype
_ST_TO_TORCH = {name: getattr(torch, attr) for name, attr in (
    ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64")) if hasattr(torch, attr)}
_TORCH_TO_ST = {dtype: name for name, dtype in _ST_TO_TORCH.items()}
# safetensors orders tensors by dtype (its enum order, descending), then by name
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64"]
_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
_MAX_DEPTH = 128  # serde_json's recursion limit, which the library parses with
_MAX_EXTENT = 2**63 - 1  # the largest tensor torch can describe (its sizes and strides are int64)
_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
_CORRUPT = "the file is corrupt or was written by a broken tool; get it again or re-save it with safetensors"


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Validated header of a safetensors file: ({key: {dtype, shape, data_offsets}}, metadata).

    As strict as the safetensors library (``SafeTensors::read_metadata`` and ``validate``), so a
    file accepted here is one ComfyUI can load too: UTF-8 JSON of at most 100 MB, ``__metadata__`` a
    map of strings to strings, known dtypes, shapes and offsets of non-negative integers, and tensor
    data that covers the data section exactly (no overlap, no gap, nothing after the last tensor).
    Raises LoraError naming the file (and the tensor) for anything else, without reading tensor data.
    """
    path = str(path)
    raw, data_len = _raw_header(path)
    header = _parse_json(path, raw)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    for key, info in header.items():
        _check_entry(path, key, info)
    _check_layout(path, header, data_len)
    return header, metadata


def _raw_header(path: str) -> tuple[bytes, int]:
    """(header JSON bytes, length of the data section), after the size and pickle checks."""
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
            if head[:4] == b"GGUF":
                raise LoraError("this is a GGUF file (a quantized model), not a safetensors file", file=path,
                                fix="a LoRA is a .safetensors file; a GGUF model can be the base CHECKPOINT of "
                                "resize or --base of batch (with the gguf library: pip install gguf)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER and header_len <= size - 8:
                raise LoraError(f"header of {header_len:,} bytes is over the {_MAX_HEADER:,}-byte limit of "
                                "safetensors", file=path, fix="this is not a safetensors file ComfyUI can load; "
                                "re-save it with safetensors (keep long texts out of its metadata)")
            if header_len > size - 8:
                raise LoraError(f"header length {header_len} runs past the end of the {size}-byte file",
                                file=path, fix="the file is truncated or not a safetensors file; get it again")
            raw = fh.read(header_len)
    except OSError as exc:
        raise LoraError(f"cannot read file ({exc.strerror or exc})", file=path,
                        fix="check the path and its permissions") from exc
    return raw, size - 8 - header_len


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: a key given twice is refused (safetensors silently keeps the last one)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_json(path: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:  # the C scanner counts its depth: no stack overflow, just this
        raise LoraError("header JSON is nested too deeply (a safetensors header is at most three levels deep)",
                        file=path, fix=_CORRUPT) from None
    except _Duplicate as exc:
        raise LoraError(f"header names {str(exc)!r} twice", file=path, layer=_printable(str(exc)),
                        fix=_CORRUPT) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8, an int of 5000 digits
        raise LoraError(f"header is not valid safetensors JSON ({_printable(str(exc))[:200]})", file=path,
                        fix="the file is corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise LoraError(f"header is a JSON {_json_type(header)}, not an object", file=path,
                        fix="the file is corrupt or not a safetensors file")
    for key in header:
        _check_text(path, key, "tensor name")
    return header


def _check_metadata(path: str, metadata: object) -> dict[str, str]:
    """``__metadata__`` as safetensors defines it: absent, null or a map of strings to strings."""
    fix = "re-save the file with safetensors; its metadata must map text keys to text values"
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise LoraError(f"__metadata__ is a JSON {_json_type(metadata)}, not a map of strings to strings",
                        file=path, fix=fix)
    for key, value in metadata.items():
        _check_text(path, key, "metadata key")
        if not isinstance(value, str):
            raise LoraError(f"metadata entry {_printable(key)!r} is a JSON {_json_type(value)}, not a string",
                            file=path, fix=fix)
        _check_text(path, value, f"metadata entry {_printable(key)!r}")
    return dict(metadata)


def _check_text(path: str, text: str, what: str) -> None:
    """JSON lets a string hold half a surrogate pair (``\\ud800``); UTF-8, and so safetensors, does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LoraError(f"{what} {_printable(text)!r} holds an unpaired UTF-16 surrogate", file=path,
                        fix=_CORRUPT) from None


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _too_deep(value: object, levels: int) -> bool:
    """Whether parsed JSON nests more than ``levels`` containers deep (stops there: no deep recursion)."""
    if not isinstance(value, (dict, list)):
        return False
    if levels <= 0:
        return True
    return any(_too_deep(item, levels - 1) for item in (value.values() if isinstance(value, dict) else value))


def _is_size(value: object) -> bool:
    """A JSON integer ≥ 0 (safetensors' usize): not a bool, a float such as 2.0, a string or a negative."""
    return type(value) is int and value >= 0


def _check_entry(path: str, key: str, info: object) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LoraError("malformed tensor entry in header (needs dtype, shape and data_offsets)", file=path,
                        layer=key, fix=_CORRUPT)
    for field, value in info.items():  # unknown fields are ignored, as by safetensors, within its JSON depth
        if field not in ("dtype", "shape", "data_offsets") and _too_deep(value, _MAX_DEPTH - 3):
            raise LoraError(f"header field {_printable(field)!r} is nested more than {_MAX_DEPTH} levels deep",
                            file=path, layer=key, fix=_CORRUPT)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_TO_TORCH:
        raise LoraError(f"unknown dtype {dtype!r}", file=path, layer=key, fix="re-save the LoRA in fp16/bf16/fp32")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise LoraError(f"shape {shape!r} is not a list of integers ≥ 0", file=path, layer=key, fix=_CORRUPT)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise LoraError(f"data_offsets {offsets!r} are not two integers ≥ 0", file=path, layer=key, fix=_CORRUPT)
    start, end = offsets
    if start > end:
        raise LoraError(f"data_offsets [{start}, {end}] end before they start", file=path, layer=key, fix=_CORRUPT)
    extent = DTYPE_SIZES[dtype]
    for dim in shape:  # zeros aside: [0, 2**70] has no data but no tensor can have that shape either
        extent *= max(dim, 1)
        if extent > _MAX_EXTENT:
            raise LoraError(f"shape {shape} {dtype} is too large for any tensor", file=path, layer=key,
                            fix=_CORRUPT)
    if math.prod(shape) * DTYPE_SIZES[dtype] != end - start:
        raise LoraError(f"tensor of shape {shape} {dtype} does not fit its {end - start} bytes", file=path,
                        layer=key, fix=_CORRUPT)


def _check_layout(path: str, header: Mapping[str, Mapping], data_len: int) -> None:
    """The tensors' bytes, sorted by offset, cover the data section exactly, as safetensors requires."""
    spans = sorted((tuple(info["data_offsets"]), key) for key, info in header.items())
    for (start, end), key in spans:
        if end > data_len:
            raise LoraError(f"tensor data [{start}:{end}] lies past the end of the file's {data_len} data bytes",
                            file=path, layer=key, fix="the file is truncated; get it again")
    position, previous = 0, None
    for (start, end), key in spans:
        if start < position:
            raise LoraError(f"tensor data [{start}:{end}] overlaps that of {previous} (which ends at {position})",
                            file=path, layer=key, fix=_CORRUPT)
        if start > position:
            after = f"after {previous}" if previous else "at the start of the data"
            raise LoraError(f"{start - position} bytes {after} belong to no tensor (a gap; safetensors "
                            "requires tensor data to be contiguous)", file=path, layer=key, fix=_CORRUPT)
        position, previous = end, key
    if position < data_len:
        raise LoraError(f"{data_len - position} bytes after the last tensor belong to no tensor (safetensors "
                        "rejects a file its header does not cover)", file=path, layer=previous, fix=_CORRUPT)


def tensor_dtype(name: str) -> torch.dtype:
    """torch's dtype for a safetensors dtype name of a validated header."""
    try:
        return _ST_TO_TORCH[name]
    except KeyError:
        raise LoraError(f"tensor dtype {name} is not supported by this torch", fix="update torch") from None


_HASH_CHUNK = 8 << 20
_HASHING: Optional[ThreadPoolExecutor] = None  # one thread: every digest's chunks are hashed in order
_HASHING_LOCK = threading.Lock()


class StreamDigest:
    """The sha256 of a file, computed from the very bytes a read parses, chunk by chunk on a side thread
    while the read goes on (and after it returns): one pass over the file, not a second read to hash it.
    ``hexdigest()`` waits for the chunks still queued."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._last: Optional[Future] = None

    def feed(self, chunk) -> None:
        global _HASHING
        with _HASHING_LOCK:
            if _HASHING is None:
                _HASHING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
            self._last = _HASHING.submit(self._sha.update, chunk)  # hashlib drops the GIL for big chunks

    def hexdigest(self) -> str:
        if self._last is not None:
            self._last.result()
        return self._sha.hexdigest()


def load_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None,
                 header: Mapping[str, Mapping] | None = None,
                 digest: Optional[StreamDigest] = None) -> dict[str, torch.Tensor]:
    """Tensors of a validated file, as stored (no dtype conversion); all of them unless ``keys``.

    ``header``: what :func:`read_header` returned for this file, so it is not parsed twice. ``digest``
    (whole files only) is fed every byte of the file as it is read."""
    path = str(path)
    if header is None:
        header, _ = read_header(path)
    wanted = list(header) if keys is None else list(keys)
    if keys is not None:
        if digest is not None:
            raise ValueError("a digest covers the whole file: read all of it")
        with safe_open(path, framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in wanted}
    # The whole file: one read into one buffer, tensors as views of it. safe_open copies every tensor
    # out of its mmap through Python-level storage slicing (0.9 s for a 442 MiB LoRA); a bytearray
    # would be zero-filled first (another 0.3 s): an uninitialised uint8 tensor is read into instead.
    with open(path, "rb", buffering=0) as fh:
        head = fh.read(8)
        start = 8 + struct.unpack("<Q", head)[0]
        if digest is not None:
            digest.feed(head + fh.read(start - 8))
        data = torch.empty(os.fstat(fh.fileno()).st_size - start, dtype=torch.uint8)
        fh.seek(start)
        view, done = memoryview(data.numpy()), 0
        while done < len(view):
            got = fh.readinto(view[done:done + _HASH_CHUNK])
            if not got:
                raise LoraError("file ended while reading its tensors", file=path, fix="the file is truncated")
            if digest is not None:
                digest.feed(view[done:done + got])
            done += got
    out: dict[str, torch.Tensor] = {}
    for key in wanted:
        info = header[key]
        begin, end = info["data_offsets"]
        dtype = _ST_TO_TORCH[info["dtype"]]
        if end == begin:
            out[key] = torch.empty(info["shape"], dtype=dtype)
        else:
            raw = data[begin:end]
            if begin % DTYPE_SIZES[info["dtype"]]:
                raw = raw.clone()  # misaligned for its type: an aligned copy
            out[key] = raw.view(dtype).reshape(info["shape"])
    return out


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


def _st_dtype(dtype: torch.dtype, key: str) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise LoraError(f"{dtype} has no safetensors dtype", layer=key, fix="write in fp16, bf16 or fp32 (-t 16, "
                        "bf16 or 32)") from None


def _ordered(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...], str]]:
    entries = [(_st_dtype(dtype, key), tuple(shape), key) for key, (dtype, shape) in specs.items()]
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

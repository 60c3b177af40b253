"""Value checks by bit pattern, in NumPy and memcmp: one thread, and no OpenMP team.

These run on the reader and writer threads while the main thread's BLAS holds both OpenMP threads: a
torch reduction there starts a team of its own on busy cores and waits for it (an aminmax of an SDXL
LoRA's 2,000 factors took 0.6 s beside a decomposition, 0.05 s alone). An IEEE value is Inf or NaN
exactly when its exponent bits are all ones, so two integer maxima over the bits decide finiteness:
the signed one finds a positive non-finite value, the unsigned one a negative.
"""
from __future__ import annotations

import ctypes
import sys

import numpy as np
import torch

# dtype -> (integer view, its unsigned twin, smallest +Inf/NaN pattern, smallest -Inf/NaN pattern)
_PATTERNS = {
    torch.float16: (torch.int16, np.uint16, 0x7C00, 0xFC00),
    torch.bfloat16: (torch.int16, np.uint16, 0x7F80, 0xFF80),
    torch.float32: (torch.int32, np.uint32, 0x7F800000, 0xFF800000),
}


def _memcmp():
    try:
        # the process's own symbols hold libc's memcmp (find_library would run ldconfig at import)
        libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
        fn = libc.memcmp
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_MEMCMP = _memcmp()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value of a float tensor is NaN or ±Inf (fp16, bf16 and fp32 on the CPU by their bits, fp8
    widened to fp16 first; anything else by torch's own isfinite)."""
    if not tensor.numel():
        return True
    if tensor.element_size() == 1:  # fp8: torch has no fp8 reductions, and every fp8 value fits fp16
        tensor = tensor.to(torch.float16)
    pattern = _PATTERNS.get(tensor.dtype)
    if pattern is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    signed_view, unsigned, positive, negative = pattern
    bits = tensor.detach().reshape(-1).view(signed_view).numpy()
    return int(bits.max()) < positive and int(bits.view(unsigned).max()) < negative


def bits_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same dtype, shape and bytes (so NaN equals the same NaN, and -0.0 differs from 0.0); two Nones are equal."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or _MEMCMP is None:
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    a, b = a.detach().contiguous(), b.detach().contiguous()
    nbytes = a.numel() * a.element_size()
    return nbytes == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), nbytes) == 0

"""Which device a run may use, checked against what this torch has before any work.

torch.device() accepts ``cuda:7`` on a machine without CUDA and fails only at the first tensor,
deep in a run and with a raw RuntimeError; this check names the device and what is available.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import UsageError


def available_devices() -> list[str]:
    """Device names this process can compute on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += [f"xpu:{i}" for i in range(xpu.device_count())]
    return names


def resolve_device(text: Optional[str]) -> Optional[torch.device]:
    """``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"`` ... -> torch.device, or None for the default (CPU).

    Raises UsageError naming the device and the available ones when torch cannot use it."""
    if text is None:
        return None
    name = text.strip().lower()
    available = available_devices()
    fix = "use one of: " + ", ".join(available)
    if not name:
        raise UsageError("the device is empty", fix=fix)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"unknown device {text!r}", fix=fix) from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UsageError(f"device {text!r}: there is one CPU device", fix="use cpu")
        return torch.device("cpu")
    if device.type not in ("cuda", "mps", "xpu"):
        raise UsageError(f"device {text!r} is not one this tool computes on", fix=fix)
    of_type = [n for n in available if n.split(":")[0] == device.type]
    if not of_type:
        why = {"cuda": "torch sees no CUDA device (no NVIDIA GPU, no driver, or a CPU-only torch build)",
               "mps": "torch sees no Apple GPU (MPS)", "xpu": "torch sees no Intel GPU (XPU)"}[device.type]
        raise UsageError(f"device {text!r} is not available: {why}", fix=fix)
    if device.index is not None and f"{device.type}:{device.index}" not in of_type and device.type != "mps":
        raise UsageError(f"device {text!r} does not exist: torch sees {len(of_type)} {device.type.upper()} "
                         f"device{'s' if len(of_type) != 1 else ''}", fix=fix)
    if device.type == "mps" and device.index not in (None, 0):
        raise UsageError(f"device {text!r} does not exist: there is one MPS device", fix="use mps")
    return device


# Cores the command may keep busy, when the command itself chose torch's thread count (console_threads): the
# norm workers (core/norms.py) use this many; None inside ComfyUI or under an explicit OMP_NUM_THREADS.
CPU_THREADS: Optional[int] = None
_SIDE_THREADS = 2  # the pipeline's reader (with its hash thread) and writer (with its read-back) beside BLAS


def console_threads() -> None:
    """torch's intra-op threads for a command-line run, unless OMP_NUM_THREADS says otherwise: the cores
    less the pipeline's side threads, at least one. The work is thousands of small GEMMs and r×r
    eigenproblems per LoRA; on a 2-core machine two BLAS threads beside the side threads cost more than
    they gain (8 SDXL r64 LoRAs: 33-34 s at 2 threads, 22-23 s at 1; one LoRA 5.4 s against 4.3 s)."""
    global CPU_THREADS
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores - _SIDE_THREADS))
    CPU_THREADS = cores

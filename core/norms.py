"""Reference norms of base weights: spectral (iterative, 1e-3 relative) and Frobenius (exact), cached.

The spectral norm uses Lanczos bidiagonalization: a handful of matrix-vector products per layer
instead of a full SVD, stopping when the residual proves the tolerance. Layers are worked on by
one thread per core (at most MAX_WORKERS): a matrix-vector product is bound by memory and leaves
the other cores idle, and one worker's file read overlaps another's Lanczos (all SDXL norms on two
cores: 13.5 s -> 9.4 s). The cache keeps results per checkpoint fingerprint across runs
(``core.norms_cache``).

Only finite norms are used or cached. The Frobenius norm is the check, at no extra cost: a NaN or Inf
anywhere in a layer makes it non-finite, and only then is the layer searched for the bad value
(``BaseWeights.nonfinite_error``). A run on a corrupt checkpoint still measures (and caches) every
sound layer, then fails naming the first bad one and the count.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .base import BaseWeights, NonFiniteWeight, Offset
from .norms_cache import NormCache, layer_cache_key

_MAX_STEPS = 40
# The residual rule proves *a* singular value near θ, not the largest: when the start vector has little of v₁
# and σ₂ is close (a 32×32 random layer of a tiny model: σ₂/σ₁ = 0.969), θ settles on σ₂ first. Small layers
# take the exact SVD (about a millisecond at this size); larger ones are checked from a second start (_CLOSE).
_EXACT_BELOW = 256
_CLOSE = 0.8
MAX_WORKERS = 4


def spectral_norm(weight: torch.Tensor, rtol: float = 1e-3, seed: int = 0) -> float:
    """Largest singular value of ``weight`` (convs flattened) in fp32, within ``rtol`` relative.

    Golub–Kahan–Lanczos bidiagonalization with full reorthogonalization: two matrix-vector
    products a step, and the top Ritz value converges in a handful of steps on trained weights
    (far faster than power iteration, whose rate is (σ₂/σ₁)²). It stops on the residual of the top
    Ritz pair, β·|p_k| ≤ rtol·θ, which proves a singular value within rtol·θ of θ: a rule on how
    much θ still moves (tried first) stopped up to 1 % short on noise-like spectra, where θ creeps
    up for many steps; the residual rule was within 4e-6 there and 5e-7 on SDXL-shaped layers
    (8-9 steps on average). The residual proves *a* singular value, not the largest: when σ₂ is
    close and the start holds little of v₁, θ can settle on σ₂ (seen on a 32×32 layer, σ₂/σ₁ = 0.969).
    So small layers take the exact SVD, and when the second Ritz value is within 20 % of the top one
    (the spectra where that can happen; trained layers' dominant directions are far apart) a second
    run from another random start must agree, the larger answer winning. A spectrum that does not
    settle in _MAX_STEPS falls back to the exact SVD, so the answer is never a silent guess. Vectors
    live in preallocated blocks; the tiny bidiagonal's SVDs run in NumPy, whose call costs a tenth
    of torch's at this size.
    """
    w = weight.to(torch.float32).flatten(1)
    if min(w.shape) <= _EXACT_BELOW:
        return float(torch.linalg.matrix_norm(w, ord=2))
    top, second = _lanczos_top(w, rtol, seed)
    if top is None:
        return float(torch.linalg.matrix_norm(w, ord=2))
    if second >= _CLOSE * top:
        other, _ = _lanczos_top(w, rtol, seed + 1)
        if other is None:
            return float(torch.linalg.matrix_norm(w, ord=2))
        top = max(top, other)
    return top


def _lanczos_top(w: torch.Tensor, rtol: float, seed: int) -> tuple[Optional[float], float]:
    """(top Ritz value once its residual proves rtol, the second Ritz value), or (None, 0) if unsettled."""
    n, m = w.shape
    steps = min(_MAX_STEPS, min(n, m) - 1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    us = torch.empty(steps, n, device=w.device)  # left Lanczos vectors, one per row
    vs = torch.empty(steps + 1, m, device=w.device)  # right Lanczos vectors
    start = torch.randn(m, generator=generator).to(w.device)
    vs[0] = start / start.norm()
    u, v = torch.empty(n, device=w.device), torch.empty(m, device=w.device)
    coefficients = torch.empty(steps + 1, device=w.device)
    bidiagonal = np.zeros((steps, steps + 1))
    for k in range(steps):
        torch.mv(w, vs[k], out=u)
        if k:
            u.sub_(us[k - 1], alpha=float(bidiagonal[k - 1, k]))
            torch.mv(us[:k], u, out=coefficients[:k])
            u.addmv_(us[:k].T, coefficients[:k], alpha=-1)
        alpha = float(torch.linalg.vector_norm(u))
        if alpha == 0.0:
            break
        torch.div(u, alpha, out=us[k])
        torch.mv(w.T, us[k], out=v)
        v.sub_(vs[k], alpha=alpha)
        torch.mv(vs[:k + 1], v, out=coefficients[:k + 1])
        v.addmv_(vs[:k + 1].T, coefficients[:k + 1], alpha=-1)
        beta = float(torch.linalg.vector_norm(v))
        bidiagonal[k, k], bidiagonal[k, k + 1] = alpha, beta
        left, values, _ = np.linalg.svd(bidiagonal[:k + 1, :k + 1])
        if beta <= 1e-12 * values[0] or beta * abs(left[k, 0]) <= rtol * values[0]:
            # the k×(k+1) bidiagonal's top value lies between the k×k one's and σ₁: return it
            ritz = np.linalg.svd(bidiagonal[:k + 1, :k + 2], compute_uv=False)
            return float(ritz[0]), float(ritz[1]) if len(ritz) > 1 else 0.0
        torch.div(v, beta, out=vs[k + 1])
    return None, 0.0


# Bumped when a norm's algorithm changes what it returns: entries cached by an older one are never read.
# 2: spectral norms are checked against σ₂ (small layers exact, close Ritz values rerun from a second start).
NORMS_VERSION = 2


def cache_id(base: BaseWeights) -> str:
    return base.fingerprint if NORMS_VERSION == 1 else f"{base.fingerprint}|norms{NORMS_VERSION}"


def frobenius_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(weight.to(torch.float32)))


def _finite(values: dict, kinds: tuple[str, ...]) -> bool:
    """Every wanted norm is present and a finite number (a cache written by an older version may hold NaN)."""
    return all(isinstance(values.get(k), (int, float)) and math.isfinite(values[k]) for k in kinds)


def _workers(device, layers: int) -> int:
    """One per torch thread on the CPU (per core when the command chose torch's threads: core.devices), at
    most MAX_WORKERS; two on a GPU, where one worker's Python overlaps the other's kernels and each fp32
    layer copy costs VRAM the host may need."""
    from . import devices

    on_cpu = device is None or torch.device(device).type == "cpu"
    threads = max(torch.get_num_threads(), devices.CPU_THREADS or 0)
    return max(1, min(MAX_WORKERS if on_cpu else 2, threads, layers))


def reference_norms(base: BaseWeights, targets: Iterable[tuple[str, Offset]], *,
                    kinds: tuple[str, ...] = ("spectral", "frobenius"), device=None,
                    cache: Optional[NormCache] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> dict[tuple[str, Offset], dict]:
    """Norms of each (name, row slice) of the base; computes only what the cache lacks. Cache
    writes, progress and a cancel (``progress`` raising) stay on the calling thread."""
    targets = list(dict.fromkeys(targets))
    out: dict[tuple[str, Offset], dict] = {}
    todo = []
    for target in targets:
        cached = cache.get(cache_id(base), layer_cache_key(*target)) if cache is not None else None
        if cached is not None and _finite(cached, kinds):
            out[target] = cached
        else:
            todo.append(target)

    def measure(target: tuple[str, Offset]) -> dict:
        weight = base.weight(*target, device=device, reuse=True)
        frobenius = frobenius_norm(weight)  # always: it is the finiteness check (NaN/Inf anywhere -> not finite)
        if not math.isfinite(frobenius):
            raise base.nonfinite_error(*target, weight)
        values = {}
        if "frobenius" in kinds:
            values["frobenius"] = frobenius
        if "spectral" in kinds:
            values["spectral"] = spectral_norm(weight)
        if not _finite(values, tuple(values)):  # not reachable from a finite weight; never cache it anyway
            raise base.nonfinite_error(*target, weight)
        return values

    if not todo:
        return out
    pool = ThreadPoolExecutor(max_workers=_workers(device, len(todo)), thread_name_prefix="lora-resize-norms")
    corrupt: list[NonFiniteWeight] = []
    try:
        futures = [pool.submit(measure, target) for target in todo]
        for done, (target, future) in enumerate(zip(todo, futures), 1):
            try:
                out[target] = values = future.result()
            except NonFiniteWeight as exc:  # go on: the sound layers are cached, the count is reported
                corrupt.append(exc)
            else:
                if cache is not None:
                    cache.put(cache_id(base), layer_cache_key(*target), values)
            if progress:
                progress(done, len(todo))  # may raise to cancel (ComfyUI's interrupt)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error or a cancel stops the queued layers
    if corrupt:
        first = corrupt[0]
        more = f"; {len(corrupt) - 1} more base layers hold NaN/Inf too" if len(corrupt) > 1 else ""
        raise NonFiniteWeight(first.problem + more, file=first.file, layer=first.layer, fix=first.fix)
    return out

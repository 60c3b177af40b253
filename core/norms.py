"""Reference norms of base weights: spectral (iterative, 1e-3 relative) and Frobenius (exact), cached.

The spectral norm uses block subspace iteration with a Rayleigh–Ritz step: a handful of GEMMs with
a thin block instead of a full SVD, stopping when the top Ritz value settles. The cache keeps
results per checkpoint fingerprint across runs (``core.norms_cache``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .base import BaseWeights, Offset
from .norms_cache import NormCache, layer_cache_key

_BLOCK = 8
_MAX_ITER = 40


def spectral_norm(weight: torch.Tensor, rtol: float = 1e-3, seed: int = 0) -> float:
    """Largest singular value of ``weight`` (convs flattened) in fp32, within ``rtol`` relative.

    Block subspace iteration on the thin side; the Ritz value rises monotonically towards σ_max.
    It stops once two successive steps change it by less than rtol/1000; a spectrum too flat to
    settle in _MAX_ITER steps falls back to the exact SVD, so the answer is never a silent guess.
    """
    w = weight.to(torch.float32).flatten(1)
    if w.shape[0] < w.shape[1]:
        w = w.T  # w is [n, m] with n >= m
    m = w.shape[1]
    if m <= 4 * _BLOCK:
        return float(torch.linalg.matrix_norm(w, ord=2))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(m, _BLOCK, generator=generator).to(w.device))
    history: list[float] = []
    for _ in range(_MAX_ITER):
        u, _ = torch.linalg.qr(w @ v)  # [n, b]
        z = w.T @ u  # [m, b]: the singular values of zᵀ = uᵀ W are Ritz values
        history.append(float(torch.linalg.svdvals(z)[0]))
        v, _ = torch.linalg.qr(z)
        if len(history) >= 3 and all(abs(history[-1] - h) <= rtol * 1e-3 * history[-1] for h in history[-3:-1]):
            return history[-1]
    return float(torch.linalg.matrix_norm(w, ord=2))


def frobenius_norm(weight: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(weight.to(torch.float32)))


def reference_norms(base: BaseWeights, targets: Iterable[tuple[str, Offset]], *,
                    kinds: tuple[str, ...] = ("spectral", "frobenius"), device=None,
                    cache: Optional[NormCache] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> dict[tuple[str, Offset], dict]:
    """Norms of each (name, row slice) of the base; computes only what the cache lacks."""
    targets = list(dict.fromkeys(targets))
    out: dict[tuple[str, Offset], dict] = {}
    todo = []
    for target in targets:
        cached = cache.get(base.fingerprint, layer_cache_key(*target)) if cache is not None else None
        if cached is not None and all(k in cached for k in kinds):
            out[target] = cached
        else:
            todo.append(target)
    for done, (name, offset) in enumerate(todo, 1):
        weight = base.weight(name, offset, device=device)
        values = {}
        if "frobenius" in kinds:
            values["frobenius"] = frobenius_norm(weight)
        if "spectral" in kinds:
            values["spectral"] = spectral_norm(weight)
        out[(name, offset)] = values
        if cache is not None:
            cache.put(base.fingerprint, layer_cache_key(name, offset), values)
        if progress:
            progress(done, len(todo))
    return out

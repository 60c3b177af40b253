"""SVD of every layer's ΔW without forming it: QR of B and Aᵀ, then the SVD of the small core.

For ΔW = s·B·A with B [n, r], A [r, m]: B = Q_b R_b, Aᵀ = Q_a R_a, so ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ and
the SVD of the r×r core gives ΔW = (Q_b P) Σ (Q_a V)ᵀ exactly, in O((n + m) r²) instead of O(n m r).
Layers of one shape are batched. Dense kinds (LoHa, LoKr, full diffs) and very high ranks take a
full (or, for a fixed target rank, randomized) SVD of ΔW.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .delta import delta_weight, effective_down
from .formats.reader import layer_key
from .model import Layer, LoraFile

log = logging.getLogger("lora_resize")
ProgressFn = Callable[[int, int], None]


@dataclass
class Decomposed:
    """A layer as ΔW = U · diag(S) · Vh (fp32, S descending, the layer's scale and sign folded in).

    For factored layers U and Vh are not stored: U = B · M and Vh = N · A with the small r×r
    matrices M, N, computed from the layer's own factors only for the directions a recipe keeps.
    That keeps memory at the size of the LoRA itself and skips work for dropped directions.
    """

    key: str
    layer: Layer
    S: torch.Tensor  # [k]
    dense_U: Optional[torch.Tensor] = None  # [out, k], dense kinds only
    dense_Vh: Optional[torch.Tensor] = None  # [k, in_features], dense kinds only
    M: Optional[torch.Tensor] = None  # [r, k]: U = B_flat @ M
    N: Optional[torch.Tensor] = None  # [k, r]: Vh = N @ A_eff

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def left(self, keep=slice(None)) -> torch.Tensor:
        """Columns ``keep`` of U, fp32."""
        if self.dense_U is not None:
            return self.dense_U[:, keep]
        up = self.layer.factors["up"].to(torch.float32).flatten(1)
        return up @ self.M[:, keep]

    def right(self, keep=slice(None)) -> torch.Tensor:
        """Rows ``keep`` of Vh, fp32."""
        if self.dense_Vh is not None:
            return self.dense_Vh[keep]
        return self.N[keep] @ effective_down(self.layer)

    @property
    def U(self) -> torch.Tensor:
        return self.left()

    @property
    def Vh(self) -> torch.Tensor:
        return self.right()

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one row of a rebuilt ``down`` factor: (in,) or (in, kh, kw)."""
        return tuple(self.layer.shape[1:])

    def params_per_rank(self) -> int:
        """Elements one kept singular value costs in a plain LoRA: a column of up plus a row of down."""
        return self.layer.out_features + self.layer.in_features


def _is_dense(layer: Layer) -> bool:
    if layer.kind != "lora":
        return True
    return layer.rank > min(layer.out_features, layer.in_features) / 2


def _triangular_factor(factors: torch.Tensor) -> Optional[torch.Tensor]:
    """R of the thin QR X = Q R (batched), by CholeskyQR2: two passes of Gram + Cholesky, all
    GEMM-bound. None when a Gram matrix is singular (a zero or repeated column)."""
    q, r = factors, None
    eye = torch.eye(factors.shape[-1], dtype=factors.dtype, device=factors.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.transpose(1, 2) @ q, upper=True)
        if bool(info.any()):
            return None
        q = q @ torch.linalg.solve_triangular(chol, eye, upper=True)
        r = chol if r is None else chol @ r
    return r


def _factored_batch(layers: list[Layer], device) -> list[tuple]:
    """Per layer (S, M, N) with U = B·M and Vh = N·A, or (S, U, Vh) when a factor is rank-deficient."""
    ups = torch.stack([l.factors["up"].to(device=device, dtype=torch.float32).flatten(1) for l in layers])
    downs = torch.stack([effective_down(l).to(device) for l in layers])
    scales = torch.tensor([l.scale for l in layers], dtype=torch.float32, device=device)
    r_b = _triangular_factor(ups)  # B = Q_b R_b
    r_a = _triangular_factor(downs.transpose(1, 2))  # Aᵀ = Q_a R_a
    if r_b is None or r_a is None:  # Householder, explicit U and Vh
        q_b, r_b = torch.linalg.qr(ups)
        q_a, r_a = torch.linalg.qr(downs.transpose(1, 2))
        p, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2) * scales[:, None, None], full_matrices=False)
        U, Vh = q_b @ p, vh @ q_a.transpose(1, 2)
        return [("dense", s[i].cpu(), U[i].cpu(), Vh[i].cpu()) for i in range(len(layers))]
    p, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2) * scales[:, None, None], full_matrices=False)
    eye = torch.eye(r_b.shape[-1], dtype=r_b.dtype, device=r_b.device)
    M = torch.linalg.solve_triangular(r_b, eye, upper=True) @ p  # U = B R_b⁻¹ P
    N = vh @ torch.linalg.solve_triangular(r_a, eye, upper=True).transpose(1, 2)  # Vh = Vcᵀ R_a⁻ᵀ A
    return [("factored", s[i].cpu(), M[i].cpu(), N[i].cpu()) for i in range(len(layers))]


def _dense(layer: Layer, device, rank: Optional[int] = None, niter: int = 2
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = delta_weight(layer, device).flatten(1)
    if rank is not None and rank < min(delta.shape) // 4:
        U, S, V = torch.svd_lowrank(delta, q=min(rank + 8, min(delta.shape)), niter=niter)
        return U[:, :rank].cpu(), S[:rank].cpu(), V[:, :rank].T.contiguous().cpu()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    # numerical rank: singular values below fp32 round-off of ΔW are noise, not directions
    noise = float(S[0]) * max(delta.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    keep = int((S > noise).sum()) if rank is None else min(rank, int((S > noise).sum()))
    return U[:, :keep].cpu(), S[:keep].cpu(), Vh[:keep].cpu()


def decompose(lora: LoraFile | Iterable[Layer], *, device: Optional[torch.device | str] = None,
              dense_rank: Optional[int] = None, niter: int = 2,
              progress: Optional[ProgressFn] = None) -> list[Decomposed]:
    """Decompose every layer once; recipes then only score and cut. All-zero layers are skipped.

    ``dense_rank``: when every recipe wants at most this rank, dense layers use a randomized SVD.
    """
    layers = list(lora.layers.values()) if isinstance(lora, LoraFile) else list(lora)
    device = torch.device(device) if device is not None else torch.device("cpu")
    groups: dict[tuple, list[Layer]] = defaultdict(list)
    dense: list[Layer] = []
    for layer in layers:
        if _is_dense(layer):
            dense.append(layer)
        else:
            groups[(layer.out_features, layer.in_features, layer.rank)].append(layer)
    total, done = len(layers), 0
    results: dict[str, Decomposed] = {}
    batch_limit = 64
    for group in groups.values():
        for start in range(0, len(group), batch_limit):
            chunk = group[start:start + batch_limit]
            for layer, (form, S, first, second) in zip(chunk, _factored_batch(chunk, device)):
                if form == "dense":
                    item = Decomposed(layer_key(layer), layer, S, dense_U=first, dense_Vh=second)
                else:
                    item = Decomposed(layer_key(layer), layer, S, M=first, N=second)
                results[layer_key(layer)] = item
            done += len(chunk)
            if progress:
                progress(done, total)
    for layer in dense:
        U, S, Vh = _dense(layer, device, dense_rank, niter)
        results[layer_key(layer)] = Decomposed(layer_key(layer), layer, S, dense_U=U, dense_Vh=Vh)
        done += 1
        if progress:
            progress(done, total)
    ordered = []
    for layer in layers:
        item = results[layer_key(layer)]
        if item.S.numel() == 0 or float(item.S[0]) <= 1e-12:
            log.warning("%s: layer is all zeros and is skipped", item.key)
            continue
        ordered.append(item)
    return ordered

"""SVD of every layer's ΔW without forming it: QR of B and Aᵀ, then the SVD of the small core.

For ΔW = s·B·A with B [n, r], A [r, m]: B = Q_b R_b, Aᵀ = Q_a R_a, so ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ and
the SVD of the r×r core gives ΔW = (Q_b P) Σ (Q_a V)ᵀ exactly, in O((n + m) r²) instead of O(n m r).
Only R_b and R_a are needed (from Gram matrices); Q is never formed.
Layers of one shape are batched. Dense kinds (LoHa, LoKr, full diffs) and very high ranks take a
full (or, for a fixed target rank, randomized) SVD of ΔW.
Every layer's factors and scale must be finite on the way in (a merge or a node may have made them)
and its singular values finite on the way out: a NaN would otherwise compare false in every
selection and an Inf become Inf factors.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from .buffers import GrowBuffers
from .delta import delta_weight, effective_down
from .errors import LoraError
from .formats.reader import layer_key
from .formats.writer import value_range
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
    dense_U: torch.Tensor | None = None  # [out, k], dense kinds only
    dense_Vh: torch.Tensor | None = None  # [k, in_features], dense kinds only
    M: torch.Tensor | None = None  # [r, k]: U = B_flat @ M
    N: torch.Tensor | None = None  # [k, r]: Vh = N @ A_eff

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def left(self, keep=slice(None), weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Columns ``keep`` of U (each times ``weights`` when given: folded into the r×k matrix), fp32."""
        if self.dense_U is not None:
            return self.dense_U[:, keep] if weights is None else self.dense_U[:, keep] * weights
        small = self.M[:, keep] if weights is None else self.M[:, keep] * weights
        return self.layer.factors["up"].to(torch.float32).flatten(1) @ small

    def right(self, keep=slice(None), weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``keep`` of Vh (each times ``weights`` when given), fp32."""
        if self.dense_Vh is not None:
            return self.dense_Vh[keep] if weights is None else weights[:, None] * self.dense_Vh[keep]
        small = self.N[keep] if weights is None else weights[:, None] * self.N[keep]
        return small @ effective_down(self.layer)

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


_TOO_LARGE = ("lower the merge weights or the alpha; if the file itself holds such values, it is corrupt: "
              "re-download or re-train it")


def _check_scale(layer: Layer) -> None:
    if not math.isfinite(layer.scale):
        raise LoraError(f"its scale (alpha / rank) is {layer.scale}", layer=layer_key(layer), fix=_TOO_LARGE)


def _check_input(layer: Layer) -> None:
    """Finite factors and scale, or a LoraError naming the layer (one min/max pass per factor)."""
    _check_scale(layer)
    for role, tensor in layer.factors.items():
        if tensor.is_floating_point() and not all(math.isfinite(v) for v in value_range(tensor)):
            raise LoraError(f"its {role} factor holds NaN or Inf values (a merge weight that large overflows fp32)",
                            layer=layer_key(layer), fix=_TOO_LARGE)


def _check_output(item: "Decomposed") -> None:
    """Singular values of finite factors can still overflow fp32 (σ beyond 3.4e38): refused by name."""
    if item.S.numel() and not all(math.isfinite(v) for v in value_range(item.S)):
        raise LoraError("its singular values overflow fp32 (ΔW = scale·B·A is too large to represent)",
                        layer=item.key, fix=_TOO_LARGE)


def _is_dense(layer: Layer) -> bool:
    if layer.kind != "lora":
        return True
    return layer.rank > min(layer.out_features, layer.in_features) / 2


def _stacked(buffers: GrowBuffers, key: str, tensors: list[torch.Tensor], dtype: torch.dtype,
             device) -> torch.Tensor:
    """[batch, rows, cols] of 2-D tensors in a reused buffer, converted in one copy each."""
    out = buffers.take(key, (len(tensors), *tensors[0].shape), dtype, device)
    for i, tensor in enumerate(tensors):
        out[i].copy_(tensor)
    return out


GRAM_CHUNK_BYTES = 1 << 20  # fp64 rows converted at a time: the slab stays in L2 between the copy and the GEMM


def _gram64(tensors: list[torch.Tensor], transposed: bool, buffers: GrowBuffers) -> torch.Tensor:
    """[batch, r, r] fp64 Grams XᵀX (or XXᵀ when ``transposed``) of fp16/bf16/fp32 factors, converted a slab of
    rows (columns) at a time into one small reused buffer: an fp64 copy of the whole stack (4× an fp16 LoRA,
    written to memory and read back by the GEMM) cost more than the GEMM here. Exact products of the values as
    stored, summed in fp64, as the stacked version."""
    first = tensors[0]
    r = first.shape[0] if transposed else first.shape[1]
    length = first.shape[1] if transposed else first.shape[0]
    step = max(1, min(length, GRAM_CHUNK_BYTES // (8 * r)))
    grams = torch.zeros((len(tensors), r, r), dtype=torch.float64)
    for i, tensor in enumerate(tensors):
        for start in range(0, length, step):
            stop = min(length, start + step)
            if transposed:
                slab = buffers.take("gram_slab", (r, stop - start), torch.float64)
                slab.copy_(tensor[:, start:stop])
                grams[i].addmm_(slab, slab.T)
            else:
                slab = buffers.take("gram_slab", (stop - start, r), torch.float64)
                slab.copy_(tensor[start:stop])
                grams[i].addmm_(slab.T, slab)
    return grams


def _refuse_nonfinite(layers: list[Layer], stack, role: str) -> None:
    """Name the layer of a factor stack whose Gram diagonal is not finite: the per-factor min/max pass runs
    only then. Finite factors whose fp32 product (a LoCon mid folded in) overflowed are refused by the
    first such layer; a Gram that overflowed in fp32 (GPU) on finite values is not an error here."""
    for layer in layers:
        _check_input(layer)
    for layer, matrix in zip(layers, stack):
        if not bool(torch.isfinite(matrix).all()):
            raise LoraError(f"its {role} factor overflows fp32 once its LoCon mid is folded in",
                            layer=layer_key(layer), fix=_TOO_LARGE)


def _gram_factor(gram: torch.Tensor) -> torch.Tensor | None:
    chol, info = torch.linalg.cholesky_ex(gram, upper=True)
    return None if bool(info.any()) else chol


def _gram_finite(g: torch.Tensor, on_nonfinite: Callable[[], None] | None) -> bool:
    """Whether every Gram's diagonal is finite; ``on_nonfinite`` (which may raise) is called when not."""
    if bool(torch.isfinite(torch.diagonal(g, dim1=1, dim2=2)).all()):
        return True
    if on_nonfinite is not None:
        on_nonfinite()
    return False


def _factor_of_gram(g: torch.Tensor, on_nonfinite: Callable[[], None] | None = None) -> torch.Tensor | None:
    """R from an fp64 Gram (of a stack, or ``_gram64``'s), after the finite check of its diagonal."""
    return _gram_factor(g) if _gram_finite(g, on_nonfinite) else None


def _triangular_factor(factors: torch.Tensor, transposed: bool = False,
                       on_nonfinite: Callable[[], None] | None = None) -> torch.Tensor | None:
    """R of the thin QR X = Q R (batched; X = ``factors``, or its transpose when ``transposed``),
    from Gram matrices and Cholesky: all GEMM-bound, Q never kept. None when a Gram matrix is
    singular (a zero or repeated column).

    fp64 input: one pass, the Gram accurate enough for any LoRA factor (cond < 1e6). fp32 input
    (GPUs, where fp64 can run at 1/64 speed): shifted CholeskyQR3 (Fukaya et al., SISC 2020). Plain
    CholeskyQR2 squares the condition number in the first Gram and fails for cond ≳ 3e3 in fp32 (trained
    up matrices reach 1e4); a shift of the first Gram by ~u·‖X‖² makes that pass succeed up to cond ~1/u and
    leaves a Q of cond ≲ 1e3, which the two plain passes then make orthogonal.

    The first Gram's diagonal (each column's sum of squares) is finite exactly when every value is (in
    fp64, no finite fp32 value can overflow it): ``on_nonfinite`` is called otherwise, and may raise. That
    is the input check of factored layers, at no cost; None is returned when it does not raise.
    """
    def gram(x):
        return x @ x.transpose(1, 2) if transposed else x.transpose(1, 2) @ x

    if factors.dtype == torch.float64:
        return _factor_of_gram(gram(factors), on_nonfinite)
    rows, cols = (factors.shape[-1], factors.shape[-2]) if transposed else (factors.shape[-2], factors.shape[-1])
    eye = torch.eye(cols, dtype=factors.dtype, device=factors.device)
    unit = float(torch.finfo(factors.dtype).eps) / 2
    q, r = factors, None
    for step in range(3):
        g = gram(q)
        if step == 0:
            if not _gram_finite(g, on_nonfinite):
                return None
            norm2 = torch.diagonal(g, dim1=1, dim2=2).sum(-1)  # ‖X‖_F² per matrix
            g = g + (11 * (rows * cols + cols * (cols + 1)) * unit * norm2)[:, None, None] * eye
        chol = _gram_factor(g)
        if chol is None:
            return None
        r = chol if r is None else chol @ r
        if step < 2:  # the last Q is never used
            inverse = torch.linalg.solve_triangular(chol, eye, upper=True)
            q = inverse.transpose(1, 2) @ q if transposed else q @ inverse
    return r


def _factored_batch(layers: list[Layer], device, buffers: GrowBuffers) -> list[tuple]:
    """Per layer (S, M, N) with U = B·M and Vh = N·A, or (S, U, Vh) when a factor is rank-deficient."""
    downs_flat = [effective_down(l) if "mid" in l.factors else l.factors["down"].flatten(1) for l in layers]
    ups_flat = [l.factors["up"].flatten(1) for l in layers]
    scales = torch.tensor([l.scale for l in layers], dtype=torch.float32, device=device)
    if device.type == "cpu":  # fp64 Grams from small slabs (B = Q_b R_b, Aᵀ = Q_a R_a)
        r_b = _factor_of_gram(_gram64(ups_flat, False, buffers), lambda: _refuse_nonfinite(layers, ups_flat, "up"))
        r_a = _factor_of_gram(_gram64(downs_flat, True, buffers),
                              lambda: _refuse_nonfinite(layers, downs_flat, "down"))
        ups = downs = None
    else:  # GPUs: fp32 stacks and shifted CholeskyQR3 (fp64 runs at a fraction of the speed there)
        ups = _stacked(buffers, "up", ups_flat, torch.float32, device)
        downs = _stacked(buffers, "down", downs_flat, torch.float32, device)
        r_b = _triangular_factor(ups, on_nonfinite=lambda: _refuse_nonfinite(layers, ups, "up"))
        r_a = _triangular_factor(downs, transposed=True, on_nonfinite=lambda: _refuse_nonfinite(layers, downs, "down"))
    if r_b is None or r_a is None:  # Householder, explicit U and Vh
        if ups is None:  # the CPU path kept no stacks
            ups = _stacked(buffers, "up", ups_flat, torch.float32, device)
            downs = _stacked(buffers, "down", downs_flat, torch.float32, device)
        q_b, r_b = torch.linalg.qr(ups)
        q_a, r_a = torch.linalg.qr(downs.transpose(1, 2))
        p, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2) * scales[:, None, None], full_matrices=False)
        U, Vh = q_b @ p, vh @ q_a.transpose(1, 2)
        return [("dense", s[i].cpu(), U[i].cpu(), Vh[i].cpu()) for i in range(len(layers))]
    del ups, downs
    # C = s R_b R_aᵀ = P Σ Vcᵀ from the eigenpairs of CᵀC in fp64 (r×r: cheap, and σ accurate to
    # 1e-8 relative down to σ₁·1e-4, far below any kept direction); a batched SVD costs twice this.
    core = (r_b @ r_a.transpose(1, 2)).to(torch.float64) * scales.to(torch.float64)[:, None, None]
    lam, vc = torch.linalg.eigh(core.transpose(1, 2) @ core)
    lam, vc = lam.flip(-1), vc.flip(-1)  # descending
    s = lam.clamp_min(0).sqrt()
    noise = s[:, :1] * s.shape[-1] * torch.finfo(torch.float32).eps  # below fp32 round-off: not a direction
    significant = s > noise
    inverse = torch.where(significant, 1.0 / torch.where(significant, s, 1.0), 0.0)
    eye = torch.eye(r_b.shape[-1], dtype=r_b.dtype, device=r_b.device)
    # U = B R_b⁻¹ P = B (R_b⁻¹ C) Vc Σ⁻¹ = B (s R_aᵀ) Vc Σ⁻¹ ;  Vh = Vcᵀ Q_aᵀ = Vcᵀ R_a⁻ᵀ A
    M = (r_a.transpose(1, 2).to(torch.float64) * scales.to(torch.float64)[:, None, None]) @ vc * inverse[:, None, :]
    N = vc.transpose(1, 2) @ torch.linalg.solve_triangular(r_a, eye, upper=True).transpose(1, 2).to(torch.float64)
    s, M, N = s.to(torch.float32).cpu(), M.to(torch.float32).cpu(), N.to(torch.float32).cpu()
    kept = significant.sum(dim=1).tolist()
    return [("factored", s[i, :k], M[i, :, :k], N[i, :k]) for i, k in enumerate(kept)]


def _dense(layer: Layer, device, rank: int | None = None, niter: int = 2
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = delta_weight(layer, device).flatten(1)
    if not all(math.isfinite(v) for v in value_range(delta)):
        raise LoraError("its ΔW overflows fp32 (the factors are finite, their product is not)",
                        layer=layer_key(layer), fix=_TOO_LARGE)
    if rank is not None and rank < min(delta.shape) // 4:
        U, S, V = torch.svd_lowrank(delta, q=min(rank + 8, min(delta.shape)), niter=niter)
        return U[:, :rank].cpu(), S[:rank].cpu(), V[:, :rank].T.contiguous().cpu()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    # numerical rank: singular values below fp32 round-off of ΔW are noise, not directions
    noise = float(S[0]) * max(delta.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    keep = int((S > noise).sum()) if rank is None else min(rank, int((S > noise).sum()))
    return U[:, :keep].cpu(), S[:keep].cpu(), Vh[:keep].cpu()


def decompose(lora: LoraFile | Iterable[Layer], *, device: torch.device | str | None = None,
              dense_rank: int | None = None, niter: int = 2,
              progress: ProgressFn | None = None) -> list[Decomposed]:
    """Decompose every layer once; recipes then only score and cut. All-zero layers are skipped.

    ``dense_rank``: when every recipe wants at most this rank, dense layers use a randomized SVD.
    """
    layers = list(lora.layers.values()) if isinstance(lora, LoraFile) else list(lora)
    device = torch.device(device) if device is not None else torch.device("cpu")
    groups: dict[tuple, list[Layer]] = defaultdict(list)
    dense: list[Layer] = []
    for layer in layers:
        if _is_dense(layer):
            _check_input(layer)
            dense.append(layer)
        else:  # factors checked from the first Gram's diagonal (_triangular_factor)
            _check_scale(layer)
            groups[(layer.out_features, layer.in_features, layer.rank)].append(layer)
    total, done = len(layers), 0
    results: dict[str, Decomposed] = {}
    buffers = GrowBuffers()
    for (out_features, in_features, rank), group in groups.items():
        # at most 64 layers and ~16M elements per factor stack: bounded memory for wide layers
        batch_limit = max(1, min(64, (1 << 24) // (max(out_features, in_features) * rank)))
        for start in range(0, len(group), batch_limit):
            chunk = group[start:start + batch_limit]
            for layer, (form, S, first, second) in zip(chunk, _factored_batch(chunk, device, buffers)):
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
        _check_output(item)
        if item.S.numel() == 0 or float(item.S[0]) <= 1e-12:
            log.warning("%s: layer is all zeros and is skipped", item.key)
            continue
        ordered.append(item)
    return ordered

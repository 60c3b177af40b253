"""Run kohya sd-scripts' own ``networks/resize_lora.py`` at several ``--dynamic_param`` values in one process.

    python bench/kohya_economy.py SD_SCRIPTS OUT_DIR RATIO [RATIO ...] [--check N] [--low-rank] -- RESIZE_LORA_ARGS...

Why: its ``extract_linear``/``extract_conv`` call ``torch.linalg.svd(W)`` with the default ``full_matrices=True``,
which for a 10240×1280 SDXL layer also builds a 10240×10240 U it never reads (it keeps ``U[:, :rank]``,
``S`` and ``Vh[:rank]``). On this 2-core VM that is 30-40 min per SDXL ratio and hours per Flux ratio, and the
same SVDs are recomputed for every ratio. Here their script runs unmodified except that ``torch.linalg.svd`` is
the economy SVD (the same LAPACK driver, the same leading vectors to rounding) and remembers each matrix's
result by its bytes, so the three ratios of an evaluation pay for one set of SVDs. Their rank rules, scaling,
dtype casts, metadata and writer are theirs. ``--check N`` compares the first N layers against the dense call.

``--low-rank`` (for Flux, where even the economy SVD of a 21504×3072 ΔW takes tens of seconds here, hours for a
LoRA): the matrix kohya passes is its own up·down product, of rank ≤ the LoRA's rank r, so its SVD is computed
exactly from a 2·new_rank-column range: Q = qr(ΔW·Ω), SVD of QᵀΔW (exact in exact arithmetic for rank ≤ 2·new_rank;
the singular values past it are zeros that no kohya rule counts). ``--check`` measures it against LAPACK's.

Never vendored: SD_SCRIPTS is a checkout (``fetch github:kohya-ss/sd-scripts``), put on ``sys.path`` here.
Prints one JSON line per ratio: ``{"ratio", "path", "seconds"}`` (the first includes the SVDs).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import torch

_dense_svd = torch.linalg.svd
_memo: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_keep = [0]  # columns of U / rows of Vh worth remembering: --new_rank caps every rank kohya keeps
_checks = [0, 0.0]  # layers left to check against the dense SVD, worst relative difference seen
_low_rank = [False]


def _range_svd(A: torch.Tensor, k: int):
    """SVD of a matrix of rank ≤ k/2 from its exact range (a Gaussian sketch of width k, then QR)."""
    g = torch.Generator(device=A.device).manual_seed(0)
    omega = torch.randn(A.shape[1], k, generator=g, device=A.device, dtype=A.dtype)
    Q, _ = torch.linalg.qr(A @ omega)
    Uc, S, Vh = _dense_svd(Q.T @ A, full_matrices=False)
    return Q @ Uc, S, Vh


def _economy_svd(A: torch.Tensor, full_matrices: bool = True, *, driver=None, out=None):
    if out is not None or A.dim() != 2:
        return _dense_svd(A, full_matrices=full_matrices, driver=driver, out=out)
    key = (tuple(A.shape), A.dtype, hashlib.md5(A.detach().contiguous().cpu().numpy().tobytes()).hexdigest())
    if key not in _memo:
        small = min(A.shape)
        if _low_rank[0] and 2 * _keep[0] < small:
            U, S, Vh = _range_svd(A, 2 * _keep[0])
        else:
            U, S, Vh = _dense_svd(A, full_matrices=False, driver=driver)
        k = min(_keep[0], S.numel())
        if _checks[0] > 0:  # the dense call's leading part, as their slicing reads it
            _checks[0] -= 1
            # with --low-rank, against LAPACK's economy SVD (a dense 21504² U would not fit the time either)
            Ud, Sd, Vhd = _dense_svd(A, full_matrices=not _low_rank[0], driver=driver)
            full = (Ud[:, :k] * Sd[:k]) @ Vhd[:k]
            ours = (U[:, :k] * S[:k]) @ Vh[:k]
            diff = float((full - ours).norm() / full.norm().clamp_min(1e-30))
            diff = max(diff, float((Sd[:S.numel()] - S).abs().max() / Sd[0].clamp_min(1e-30)))
            _checks[1] = max(_checks[1], diff)
        _memo[key] = (U[:, :k].clone(), S.clone(), Vh[:k].clone())
    return _memo[key]


def main(argv: list[str]) -> None:
    split = argv.index("--")
    head, rest = argv[:split], argv[split + 1:]
    check = 0
    if "--check" in head:
        at = head.index("--check")
        check = int(head[at + 1])
        del head[at:at + 2]
    if "--low-rank" in head:
        head.remove("--low-rank")
        _low_rank[0] = True
    scripts, out_dir, ratios = head[0], head[1], head[2:]
    sys.path.insert(0, scripts)
    os.chdir(scripts)
    from networks import resize_lora  # noqa: E402  (their module, from their checkout)

    parser = resize_lora.setup_parser()
    torch.linalg.svd = _economy_svd
    _checks[0] = check
    for ratio in ratios:
        path = os.path.join(out_dir, f"kohya_sv_ratio_{ratio}.safetensors")
        args = parser.parse_args([*rest, "--dynamic_method", "sv_ratio", "--dynamic_param", ratio, "--save_to", path])
        _keep[0] = args.new_rank
        started = time.perf_counter()
        resize_lora.resize(args)
        record = {"ratio": float(ratio), "path": path, "seconds": time.perf_counter() - started}
        if check:
            record["checked_layers"] = check - _checks[0]
            record["max_rel_diff_vs_dense"] = _checks[1]
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

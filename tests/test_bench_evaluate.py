"""bench/evaluate.py measures errors without forming ΔW: its factored formula must equal the dense one."""
from __future__ import annotations

import importlib.util
import os

import torch

from core.decompose import decompose
from core.formats import read_lora
from core.recipe import parse_recipe
from core.resize import apply_recipe
from tests.helpers import dense_delta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = os.path.join(ROOT, "tests", "fixtures", "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")


def _bench_module(name: str):
    """A bench/ script as a module (bench/ is not a package the tests import)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_factored_error_equals_the_dense_error_for_svd_and_random_projection():
    evaluate = _bench_module("evaluate")
    lora = read_lora(LORA)
    items = decompose(lora)
    for text in ("rank=2", "rank=1,method=randproj,seed=3", "spn_lora=1,thr=-0.3"):
        result = apply_recipe(items, parse_recipe(text), {}, template=lora, dtype=torch.float32)
        errors = evaluate.factored_errors(items, result.lora)
        assert errors.keys() == {item.key for item in items}
        for item in items:
            source = dense_delta(item.layer)
            rebuilt = result.lora.layers.get(item.key)
            dense = float((source - (dense_delta(rebuilt) if rebuilt is not None else 0)).pow(2).sum())
            assert abs(errors[item.key] - dense) <= 1e-4 * float(source.pow(2).sum()) + 1e-12, (text, item.key)
        dropped = sum(errors.values())
        assert dropped > 0


def test_kohya_shim_svds_keep_what_kohya_reads():
    """bench/kohya_economy.py stands in for kohya's dense ``torch.linalg.svd(ΔW)``: the leading ``new_rank``
    triplets (all kohya slices) must equal the dense SVD's, for the economy and the exact-range (--low-rank) path,
    and a repeated matrix (the next ratio) must come from the memo."""
    shim = _bench_module("kohya_economy")
    g = torch.Generator().manual_seed(0)
    rank, new_rank = 12, 16
    up = torch.randn(300, rank, generator=g) * torch.logspace(0, -2, rank)
    delta = up @ torch.randn(rank, 200, generator=g)
    Ud, Sd, Vhd = torch.linalg.svd(delta)  # what kohya calls: full_matrices=True
    dense = (Ud[:, :new_rank] * Sd[:new_rank]) @ Vhd[:new_rank]
    for low_rank in (False, True):
        shim._memo.clear()
        shim._keep[0], shim._low_rank[0] = new_rank, low_rank
        U, S, Vh = shim._economy_svd(delta.clone())
        assert U.shape == (300, new_rank) and Vh.shape == (new_rank, 200)
        assert torch.allclose(S[:rank], Sd[:rank], rtol=1e-5)
        assert float(S[rank:new_rank].abs().max()) < 1e-5 * float(Sd[0])  # zeros past the rank, as dense gives
        kept = (U[:, :new_rank] * S[:new_rank]) @ Vh[:new_rank]
        assert float((kept - dense).norm() / dense.norm()) < 1e-5
        assert shim._economy_svd(delta.clone())[0] is U  # the next ratio: no second SVD
    # a matrix of higher rank than the sketch: --low-rank falls back to LAPACK when 2·new_rank ≥ its width
    shim._memo.clear()
    shim._keep[0] = 120
    full = torch.randn(200, 150, generator=g)
    U, S, Vh = shim._economy_svd(full)
    assert torch.allclose(S, torch.linalg.svdvals(full), rtol=1e-5)

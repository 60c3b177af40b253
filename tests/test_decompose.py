"""Decomposition without forming B·A: exact keep-all, Eckart–Young truncation, batching, dense kinds."""

import pytest
import torch

from core.decompose import decompose
from core.model import Layer
from core.resize import rebuild_layer
from tests.helpers import dense_delta, lora_layer, synthetic_lora


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_keep_all_reproduces_delta():
    lora = synthetic_lora(count=6, rank=16)
    items = decompose(lora)
    assert len(items) == 6
    for item in items:
        rebuilt = rebuild_layer(item, torch.ones(item.rank, dtype=torch.bool))
        assert rebuilt.rank == 16 and rebuilt.scale == 1.0
        assert _rel(dense_delta(rebuilt), dense_delta(item.layer)) < 1e-5


def test_singular_values_match_full_svd_of_delta():
    layer = lora_layer("x", 96, 80, 12, alpha=3.0, seed=3)
    (item,) = decompose([layer])
    reference = torch.linalg.svdvals(dense_delta(layer))[:12]
    assert torch.allclose(item.S.double(), reference, rtol=1e-5)
    assert bool((item.S[:-1] >= item.S[1:]).all())


@pytest.mark.parametrize("keep", [1, 4, 9])
def test_truncation_error_is_the_discarded_energy(keep):
    layer = lora_layer("x", 128, 64, 16, alpha=8.0, seed=5)
    (item,) = decompose([layer])
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:keep] = True
    rebuilt = rebuild_layer(item, mask)
    error = float((dense_delta(rebuilt) - dense_delta(layer)).norm())
    eckart_young = float(item.S[keep:].double().pow(2).sum().sqrt())
    assert rebuilt.rank == keep
    assert abs(error - eckart_young) / eckart_young < 1e-4


def test_conv_and_tucker_layers():
    conv = lora_layer("c", 32, 16, 4, alpha=2.0, seed=1, conv=(3, 3))
    (item,) = decompose([conv])
    rebuilt = rebuild_layer(item, torch.ones(item.rank, dtype=torch.bool))
    assert tuple(rebuilt.factors["down"].shape) == (4, 16, 3, 3)
    assert tuple(rebuilt.factors["up"].shape) == (32, 4, 1, 1)
    assert _rel(dense_delta(rebuilt), dense_delta(conv)) < 1e-5

    g = torch.Generator().manual_seed(2)
    tucker = Layer("t", "lora", {"up": torch.randn(24, 4, 1, 1, generator=g),
                                 "down": torch.randn(4, 8, 1, 1, generator=g),
                                 "mid": torch.randn(4, 4, 3, 3, generator=g)}, shape=(24, 8, 3, 3), alpha=4.0)
    (item,) = decompose([tucker])
    rebuilt = rebuild_layer(item, torch.ones(item.rank, dtype=torch.bool))
    assert "mid" not in rebuilt.factors
    assert _rel(dense_delta(rebuilt), dense_delta(tucker)) < 1e-5


def test_negative_scale_and_fp16_factors():
    layer = lora_layer("x", 64, 48, 8, alpha=-4.0, seed=7, dtype=torch.float16)
    (item,) = decompose([layer])
    assert bool((item.S > 0).all())
    rebuilt = rebuild_layer(item, torch.ones(item.rank, dtype=torch.bool))
    assert _rel(dense_delta(rebuilt), dense_delta(layer)) < 1e-5


def test_dense_kinds_use_full_svd():
    g = torch.Generator().manual_seed(4)
    loha = Layer("h", "loha", {"w1a": torch.randn(32, 4, generator=g), "w1b": torch.randn(4, 24, generator=g),
                               "w2a": torch.randn(32, 4, generator=g), "w2b": torch.randn(4, 24, generator=g)},
                 shape=(32, 24), alpha=2.0)
    (item,) = decompose([loha])
    assert item.rank <= 16  # the Hadamard product of two rank-4 maps has rank ≤ 16
    rebuilt = rebuild_layer(item, torch.ones(item.rank, dtype=torch.bool))
    assert _rel(dense_delta(rebuilt), dense_delta(loha)) < 1e-5


def test_all_zero_layer_is_skipped_with_warning(caplog):
    zero = lora_layer("z", 32, 32, 4)
    zero.factors["up"] = torch.zeros_like(zero.factors["up"])
    items = decompose([zero, lora_layer("y", 32, 32, 4)])
    assert [item.key for item in items] == ["y"]
    assert "all zeros" in caplog.text


def test_batches_give_the_same_result_as_single_layers():
    layers = [lora_layer(f"l{i}", 64, 64, 8, alpha=4.0, seed=i) for i in range(5)]
    together = decompose(layers)
    alone = [decompose([layer])[0] for layer in layers]
    for a, b in zip(together, alone):
        assert torch.allclose(a.S, b.S, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_slab_grams_equal_the_stacked_fp64_gram(dtype, monkeypatch):
    """The CPU path's Grams, converted to fp64 a slab at a time (several slabs per factor here), equal the Gram of
    the whole fp64 stack to fp64 round-off, for up (XᵀX) and down (XXᵀ) factors, and so give the same R."""
    from core import decompose as module
    from core.buffers import GrowBuffers

    monkeypatch.setattr(module, "GRAM_CHUNK_BYTES", 8 * 16 * 100)  # 100 rows of r=16 a slab: 13 slabs of 1300
    g = torch.Generator().manual_seed(3)
    ups = [(torch.randn(1300, 16, generator=g) * torch.logspace(0, -3, 16)).to(dtype) for _ in range(3)]
    downs = [u.T.contiguous() for u in ups]
    for tensors, transposed in ((ups, False), (downs, True)):
        got = module._gram64(tensors, transposed, GrowBuffers())
        stack = torch.stack([t.double() for t in tensors])
        want = stack @ stack.transpose(1, 2) if transposed else stack.transpose(1, 2) @ stack
        assert float((got - want).abs().max() / want.abs().max()) < 1e-14
        r_got, r_want = module._factor_of_gram(got), module._triangular_factor(stack, transposed=transposed)
        assert float((r_got - r_want).abs().max() / r_want.abs().max()) < 1e-12


@pytest.mark.parametrize("transposed", [False, True])
def test_triangular_factor_both_precisions_equal_householder(transposed):
    """The CPU path (one fp64 Gram pass) and the GPU path (fp32 shifted CholeskyQR3) give QR's R, here on
    ill-conditioned factors (cond ≈ 1e4) like trained LoRA up matrices. Plain CholeskyQR2 in fp32 fails
    here on some CPUs' BLAS (its first Gram has cond 1e8 > 1/u): the shift is what makes it hold."""
    from core.decompose import _triangular_factor

    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(3, 640, 24, generator=g, dtype=torch.float64))
    x = q * torch.logspace(0, -4, 24, dtype=torch.float64)  # columns decaying over 4 decades
    x = x @ torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))[0]
    _, r_ref = torch.linalg.qr(x)
    r_ref = r_ref * torch.sign(torch.diagonal(r_ref, dim1=1, dim2=2))[..., None]  # positive diagonal
    stacked = x.transpose(1, 2).contiguous() if transposed else x
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 5e-5)):  # one fp32 pass: 0.87; fp32 Householder 5e-5
        r = _triangular_factor(stacked.to(dtype), transposed=transposed)
        assert r is not None and r.dtype == dtype
        # relative to each row's scale: the small rows of R are what truncation decides on
        error = ((r.double() - r_ref).norm(dim=2) / r_ref.norm(dim=2)).max()
        assert float(error) < tol

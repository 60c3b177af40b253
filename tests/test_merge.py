"""Merges are exact: the concatenated LoRA's ΔW is the weighted sum, for any ranks, alphas and signs."""
import pytest
import torch

from core.errors import LoraError
from core.merge import join_sources, merge, set_join_toggles
from core.model import Layer, LoraFile
from tests.helpers import dense_delta, lora_layer


def _lora(rank, alpha, seed, names=("a", "b")):
    return LoraFile({n: lora_layer(n, 48, 40, rank, alpha=alpha, seed=seed + i) for i, n in enumerate(names)},
                    architecture="sdxl")


def test_weighted_concat_is_the_exact_sum_with_negative_weights_and_mixed_ranks():
    first, second = _lora(4, 2.0, 0), _lora(16, None, 10, names=("a", "c"))
    merged = merge([(first, 0.7), (second, -1.3)])
    assert set(merged.layers) == {"a", "b", "c"}
    a = merged.layers["a"]
    assert a.rank == 20 and a.scale == 1.0
    expected = 0.7 * dense_delta(first.layers["a"]) - 1.3 * dense_delta(second.layers["a"])
    assert float((dense_delta(a) - expected).norm() / expected.norm()) < 1e-6
    only_b = 0.7 * dense_delta(first.layers["b"])
    assert float((dense_delta(merged.layers["b"]) - only_b).norm() / only_b.norm()) < 1e-6


def test_dense_member_makes_a_full_diff_layer():
    g = torch.Generator().manual_seed(1)
    full = LoraFile({"a": Layer("a", "full", {"diff": torch.randn(48, 40, generator=g)}, shape=(48, 40))},
                    architecture="sdxl")
    merged = merge([(_lora(4, 2.0, 0), 1.0), (full, 0.5)])
    assert merged.layers["a"].kind == "full"
    expected = dense_delta(_lora(4, 2.0, 0).layers["a"]) + 0.5 * dense_delta(full.layers["a"])
    assert torch.allclose(dense_delta(merged.layers["a"]), expected, atol=1e-5)


def test_join_toggles_switch_sources():
    first, second = _lora(4, 4.0, 0), _lora(8, 2.0, 5)
    joined = merge([(first, 1.0), (second, 1.0)], join=True)
    assert [s["segments"]["a"] for s in join_sources(joined)] == [[0, 4], [4, 12]]
    only_second = set_join_toggles(joined, [0, 1])
    assert torch.allclose(dense_delta(only_second.layers["a"]), dense_delta(second.layers["a"]), atol=1e-5)
    half_first = set_join_toggles(joined, [0.5, 0])
    assert torch.allclose(dense_delta(half_first.layers["a"]), 0.5 * dense_delta(first.layers["a"]), atol=1e-5)


def test_architecture_and_shape_mismatch_are_refused():
    other = LoraFile({"a": lora_layer("a", 48, 40, 4)}, architecture="flux")
    with pytest.raises(LoraError, match="different architectures"):
        merge([(_lora(4, 2.0, 0), 1.0), (other, 1.0)])
    wrong = LoraFile({"a": lora_layer("a", 48, 20, 4)}, architecture="sdxl")
    with pytest.raises(LoraError, match="different shapes"):
        merge([(_lora(4, 2.0, 0), 1.0), (wrong, 1.0)])

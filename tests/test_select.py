"""Scoring and selection: the seed tool's rule, kohya's dynamic rules without the off-by-one, caps."""
import math

import torch

from core.decompose import decompose
from core.recipe import parse_recipe
from core.select import References, _kohya_count, score, select
from tests.helpers import lora_layer, synthetic_lora


def test_score_is_log10_sigma_minus_weighted_log_references():
    (item,) = decompose([lora_layer("x", 64, 32, 8, alpha=8.0, seed=1)])
    refs = References(spectral=4.0, frobenius=20.0)
    recipe = parse_recipe("spn_ckpt=1,fro_ckpt=3,params=1,rescale=2,thr=-1")
    expected = (torch.log10(item.S) + math.log10(2)
                - 0.2 * math.log10(4.0) - 0.6 * math.log10(20.0) - 0.2 * math.log10(64 + 32))
    assert torch.allclose(score(item, recipe, refs), expected, atol=1e-6)
    lora_self = parse_recipe("spn_lora,thr=-1")
    assert float(score(item, lora_self, None)[0]) == 0.0  # σ_max against itself


def test_threshold_keeps_scores_at_or_above():
    items = decompose(synthetic_lora(count=4, rank=12))
    refs = {item.key: References(frobenius=10.0) for item in items}
    recipe = parse_recipe("fro_ckpt=1,thr=-1.5")
    selection = select(items, recipe, refs)
    for item in items:
        expected = int((torch.log10(item.S) - 1.0 >= -1.5).sum())
        assert int(selection.masks[item.key].sum()) == expected


def test_rank_caps_and_fixed_rank():
    items = decompose(synthetic_lora(count=3, rank=12))
    fixed = select(items, parse_recipe("rank=5"), {})
    assert all(int(m.sum()) == 5 for m in fixed.masks.values())
    capped = select(items, parse_recipe("spn_lora,thr=-9,rank=3"), {})
    assert all(int(m.sum()) == 3 and bool(m[:3].all()) for m in capped.masks.values())


def test_kohya_rules_can_keep_the_whole_layer():
    S = torch.tensor([4.0, 2.0, 1.0, 0.5])
    assert _kohya_count(S, "sv_ratio", 10.0) == 4  # kohya caps at 3: it never keeps a layer whole
    assert _kohya_count(S, "sv_ratio", 3.0) == 2
    assert _kohya_count(S, "sv_cumulative", 0.8) == 2  # 6/7.5 = 0.8 reached with two values
    assert _kohya_count(S, "sv_cumulative", 1.0) == 4
    fro = math.sqrt((16 + 4) / 21.25)
    assert _kohya_count(S, "sv_fro", fro) == 2
    assert _kohya_count(S, "sv_fro", fro + 1e-3) == 3

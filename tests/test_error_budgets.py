"""Error budgets (err=, err_ckpt=), KJNodes' knee (sv_knee=) and padding (pad=), through the CLI.

The budget tests recompute everything from dense ΔW in fp64 (their own SVD, their own score order, the
base norms from the base's tensors) and check the written file (fp32, read back): it keeps exactly the
values the independent count keeps, its error is ≤ P, and dropping one more value would exceed P.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from core.base import open_base
from core.cli import main
from core.errors import LoraError, UsageError
from core.formats import read_lora
from core.pad import pad_layer
from core.recipe import parse_recipe
from core.select import knee_count
from tests.helpers import dense_delta, lora_layer

FIXTURES = Path(__file__).parent / "fixtures"
LORA = FIXTURES / "lora" / "sd15_kohya_locon_r4a2_c2a1.safetensors"  # 91 layers, ranks 4 (73) and 2 (18)
BASE = FIXTURES / "base" / "sd15_tiny_base.safetensors"
ORIGINAL_RANK = 73 * 4 + 18 * 2  # 328


@pytest.fixture(scope="module")
def base_copy(tmp_path_factory) -> Path:
    """The base in a private folder, so its norms cache is this module's own."""
    path = tmp_path_factory.mktemp("base") / BASE.name
    shutil.copy(BASE, path)
    return path


@pytest.fixture(scope="module")
def original() -> dict:
    """Per layer: dense ΔW (fp64) and its singular values above fp64 round-off, from the fixture file."""
    table = {}
    for layer in read_lora(str(LORA)):
        delta = dense_delta(layer)
        S = torch.linalg.svdvals(delta)
        table[layer.name] = (delta, S[S > S[0] * 1e-5])  # above the fp32 round-off of ΔW (~1e-8 of σ₁)
    return table


@pytest.fixture(scope="module")
def base_norms(base_copy, original) -> dict[str, float]:
    base = open_base(str(base_copy))
    return {name: float(torch.linalg.norm(base.weight(name, None).double())) for name in original}


def _run(tmp_path: Path, recipe: str, checkpoint: str = "-", dtype: str = "32") -> Path:
    out = tmp_path / "out"
    assert main([checkpoint, str(LORA), "-o", str(out), "-r", recipe, "-t", dtype, "-q"]) == 0
    (written,) = out.glob("*.safetensors")
    return written


def _independent(original: dict, percent: float, reference: float, log_refs: dict[str, float]):
    """(ranks kept per layer, the next value's σ²) when values are dropped in ascending score
    order, score = log10 σ − log_ref(layer), while the dropped σ² stay within (P/100)²·reference."""
    entries = sorted((math.log10(float(s)) - log_refs.get(name, 0.0), float(s) ** 2, name)
                     for name, (_, S) in original.items() for s in S)
    allowed = (percent / 100) ** 2 * reference
    dropped, count = 0.0, 0
    while count < len(entries) and dropped + entries[count][1] <= allowed:
        dropped += entries[count][1]
        count += 1
    ranks = {name: len(S) for name, (_, S) in original.items()}
    for _, _, name in entries[:count]:
        ranks[name] -= 1
    return ranks, entries[count][1] if count < len(entries) else math.inf


def _measured(original: dict, written: Path) -> tuple[dict[str, int], float]:
    """Ranks of the written file and Σ‖ΔW − ΔW'‖² from dense ΔW (a dropped layer counts whole)."""
    resized = {layer.name: layer for layer in read_lora(str(written))}
    ranks = {name: resized[name].rank if name in resized else 0 for name in original}
    squared = 0.0
    for name, (delta, _) in original.items():
        approx = dense_delta(resized[name]) if name in resized else torch.zeros_like(delta)
        squared += float((delta - approx).pow(2).sum())
    return ranks, squared


# (recipe, budget %, total rank kept of 328)
LORA_BUDGETS = [("err=2", 2.0, 327), ("err=10", 10.0, 310), ("err=30", 30.0, 233), ("fro_ckpt=1,err=10", 10.0, 315)]


@pytest.mark.parametrize("recipe, percent, total_rank", LORA_BUDGETS)
def test_err_hits_its_budget_exactly(tmp_path, base_copy, original, base_norms, recipe, percent, total_rank):
    weighted = recipe.startswith("fro_ckpt")
    written = _run(tmp_path, recipe, str(base_copy) if weighted else "-")
    energy = sum(float(S.pow(2).sum()) for _, S in original.values())
    log_refs = {name: math.log10(norm) for name, norm in base_norms.items()} if weighted else {}
    expected, next_energy = _independent(original, percent, energy, log_refs)
    ranks, squared = _measured(original, written)
    assert ranks == expected
    assert sum(ranks.values()) == total_rank
    error = math.sqrt(squared / energy)
    assert error <= percent / 100 * (1 + 1e-6)
    assert math.sqrt((squared + next_energy) / energy) > percent / 100  # one more dropped value exceeds P
    assert f"_{recipe.replace('_', '').replace('=', '').replace(',', '_')}_th" in written.name
    provenance = json.loads(read_lora(str(written)).metadata["lora_resize"])
    assert written.name.endswith(f"_th{float(provenance['threshold']):.2f}.safetensors".replace(".00.", "."))


# (budget % of the base's norm, total rank kept)
CKPT_BUDGETS = [(0.01, 328), (0.05, 323), (0.2, 274)]


@pytest.mark.parametrize("percent, total_rank", CKPT_BUDGETS)
def test_err_ckpt_hits_its_budget_against_the_base(tmp_path, base_copy, original, base_norms, percent, total_rank):
    written = _run(tmp_path, f"err_ckpt={percent}", str(base_copy))
    reference = sum(norm ** 2 for norm in base_norms.values())
    expected, next_energy = _independent(original, percent, reference, {})
    ranks, squared = _measured(original, written)
    assert ranks == expected
    assert sum(ranks.values()) == total_rank
    assert math.sqrt(squared / reference) <= percent / 100 * (1 + 1e-6)
    assert math.sqrt((squared + next_energy) / reference) > percent / 100
    assert f"_errckpt{percent:g}_th" in written.name


def test_err_ckpt_counts_rescale_and_err_does_not(tmp_path, base_copy, original, base_norms):
    """rescale=2 doubles ΔW: relative to itself nothing changes, relative to the base the error doubles."""
    plain = _measured(original, _run(tmp_path / "a", "err=10"))[0]
    assert _measured(original, _run(tmp_path / "b", "err=10,rescale=2"))[0] == plain
    reference = sum(norm ** 2 for norm in base_norms.values())
    rescaled = {name: (2 * delta, 2 * S) for name, (delta, S) in original.items()}
    expected, _ = _independent(rescaled, 0.05, reference, {})
    written = _run(tmp_path / "c", "err_ckpt=0.05,rescale=2", str(base_copy))
    ranks, squared = _measured(rescaled, written)
    assert ranks == expected
    assert sum(ranks.values()) == 327  # 323 without: each dropped value costs twice as much
    assert math.sqrt(squared / reference) <= 0.05 / 100 * (1 + 1e-6)


def test_zero_budget_keeps_everything_and_a_full_one_keeps_nothing(tmp_path, capsys):
    ranks = {layer.name: layer.rank for layer in read_lora(str(_run(tmp_path / "zero", "err=0")))}
    assert len(ranks) == 91 and sum(ranks.values()) == ORIGINAL_RANK
    assert main(["-", str(LORA), "-o", str(tmp_path / "all"), "-r", "err=100", "-q"]) == 1
    assert "keeps nothing" in capsys.readouterr().err
    assert not list((tmp_path / "all").glob("*.safetensors"))


def test_rank_caps_a_budget(tmp_path):
    ranks = [layer.rank for layer in read_lora(str(_run(tmp_path, "err=10,rank=3,conv_rank=1")))]
    assert max(ranks) == 3 and sum(ranks) == 211


def test_pad_keeps_delta_and_gives_every_layer_rank_n(tmp_path, original):
    written = _run(tmp_path / "pad", "err=10,pad=4")
    assert written.name == f"{LORA.stem}_err10_pad4_th-1.66.safetensors"
    plain = {layer.name: layer for layer in read_lora(str(_run(tmp_path / "plain", "err=10")))}
    padded = read_lora(str(written))
    assert len(padded) == len(plain) == 91
    for layer in padded:
        assert layer.factors["up"].shape[1] == 4 and layer.factors["down"].shape[0] == 4
        assert layer.alpha == 4.0 and layer.scale == 1.0
        delta, reference = dense_delta(layer), dense_delta(plain[layer.name])
        assert float((delta - reference).norm() / reference.norm()) <= 1e-6
    widened = read_lora(str(_run(tmp_path / "wide", "rank=4,pad=8")))
    for layer in widened:
        delta = original[layer.name][0]
        assert layer.rank == 8
        assert float((dense_delta(layer) - delta).norm() / delta.norm()) <= 1e-6


def test_pad_refuses_a_layer_that_keeps_more(tmp_path, capsys):
    assert main(["-", str(LORA), "-o", str(tmp_path), "-r", "err=10,pad=3", "-q"]) == 1
    message = capsys.readouterr().err
    assert "more than pad=3" in message and "rank=3,pad=3" in message
    assert not list(tmp_path.glob("*.safetensors"))
    layer = lora_layer("x", 16, 8, 4, alpha=4.0)
    with pytest.raises(LoraError, match="keeps 4 values"):
        pad_layer(layer, 2)


def test_knee_is_kjnodes_kneedle_rule():
    S = torch.tensor([10.0, 9.0, 8.0, 7.0, 1.0, 0.5, 0.2, 0.1])
    assert knee_count(S, 1.0) == 4  # the elbow after 7: y − (1 − x) peaks at 0.126
    assert knee_count(S, 0.5) == 2  # a flatter line: the curve never rises above it, at least 2 kept
    assert knee_count(S, 2.0) == 8  # a steep line: the tail is above it, everything kept
    assert knee_count(torch.tensor([3.0, 1.0]), 1.0) == 2
    assert knee_count(torch.full((5,), 2.0), 1.0) == 5  # a flat spectrum has no knee


def test_knee_through_the_cli(tmp_path, original):
    ranks = {layer.name: layer.rank for layer in read_lora(str(_run(tmp_path, "sv_knee=1")))}
    assert ranks == {name: knee_count(S.float(), 1.0) for name, (_, S) in original.items()}
    assert sum(ranks.values()) == 200


@pytest.mark.parametrize("text, words", [
    ("err=1,thr=-2,fro_ckpt", "choose one selection"),
    ("err=1,err_ckpt=1", "choose one selection"),
    ("sv_knee=1,sv_ratio=4", "choose one selection"),
    ("err=100.5", "≤ 100"),
    ("err=-1", "≥ 0"),
    ("sv_knee=0", "> 0"),
    ("rank=16,pad=8", "more than pad=8"),
    ("fro_ckpt,size=1,pad=4", "pad= fixes"),
    ("pad=0", "≥ 1"),
    ("pad=2.5", "whole number"),
])
def test_budget_and_pad_tokens_are_checked(text, words):
    with pytest.raises(UsageError, match=words):
        parse_recipe(text)


def test_budget_recipes_parse():
    plain = parse_recipe("err=1")
    assert plain.budget == ("err", 1.0) and plain.scored and not plain.needs_base and plain.weights == {}
    ckpt = parse_recipe("err_ckpt=0.5,spn_lora=3,params=1")
    assert ckpt.budget == ("err_ckpt", 0.5) and ckpt.needs_base
    assert ckpt.weights == {"spn_lora": 0.75, "params": 0.25}
    assert parse_recipe("pad=16").pad == 16  # keep everything, padded
    assert parse_recipe("sv_knee=0.5,rank=8,pad=8").slug() == "rank8_svknee0.5_pad8"

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


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("bench_evaluate", os.path.join(ROOT, "bench", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_factored_error_equals_the_dense_error_for_svd_and_random_projection():
    evaluate = _evaluate_module()
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

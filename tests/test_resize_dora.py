"""DoRA through a resize: with a base, magnitudes are refitted to the new directions (least squares);
without one they are kept and the report says so."""
import os

import torch

from core.base import StateDictBase
from core.decompose import decompose
from core.delta import dora_delta
from core.formats import read_lora
from core.recipe import parse_recipe
from core.resize import apply_recipe
from tests.conftest import FIXTURES

DORA = os.path.join(FIXTURES, "lora", "sd15_peft_dora.safetensors")


def _base(lora):
    g = torch.Generator().manual_seed(0)
    return StateDictBase({l.name: torch.randn(l.shape, generator=g) * 0.05 for l in lora}, fingerprint="test")


def _dora_error(source, resized, base):
    total = 0.0
    for key, layer in source.layers.items():
        weight = base.weight(layer.name)
        before = weight + dora_delta(layer, weight)
        after = weight + dora_delta(resized.layers[key], weight)
        total += float((after - before).pow(2).sum())
    return total ** 0.5


def test_keep_all_keeps_magnitudes_and_truncation_refits_them():
    lora = read_lora(DORA)
    base = _base(lora)
    items = decompose(lora)
    keep_all = apply_recipe(items, parse_recipe("spn_lora,thr=-99"), {}, template=lora, dtype=torch.float32,
                            base=base)
    for key, layer in lora.layers.items():
        assert torch.allclose(keep_all.lora.layers[key].dora_scale.float(), layer.dora_scale.float(), rtol=1e-5)
    assert "refitted" in keep_all.notes[0]
    refit = apply_recipe(items, parse_recipe("rank=1"), {}, template=lora, dtype=torch.float32, base=base)
    kept = apply_recipe(items, parse_recipe("rank=1"), {}, template=lora, dtype=torch.float32)
    assert "kept as they were" in kept.notes[0]
    changed = [k for k in lora.layers
               if not torch.equal(refit.lora.layers[k].dora_scale, kept.lora.layers[k].dora_scale)]
    assert len(changed) == len(lora.layers)
    assert _dora_error(lora, refit.lora, base) < _dora_error(lora, kept.lora, base)


def test_peft_output_of_a_dora_lora_warns_that_comfyui_ignores_the_magnitudes(tmp_path, caplog):
    """ComfyUI 0.3.64 never reads lora_magnitude_vector (pinned in tests/host/test_host_load.py): say so."""
    from core.formats import write_lora

    source = read_lora(DORA)
    with caplog.at_level("WARNING", logger="lora_resize"):
        write_lora(source, tmp_path / "kohya.safetensors", convention="kohya")
    assert "lora_magnitude_vector" not in caplog.text
    with caplog.at_level("WARNING", logger="lora_resize"):
        write_lora(source, tmp_path / "peft.safetensors", convention="peft")
    assert "does not read" in caplog.text and "-f kohya" in caplog.text

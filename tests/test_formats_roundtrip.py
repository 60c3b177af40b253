"""Every fixture reads, writes in each format, and reads back to the same ΔW; ΔW is the producer's maths."""
import os

import pytest
import torch
from safetensors import safe_open

from core.delta import delta_weight
from core.formats import read_lora, write_lora
from core.formats.conventions import split_key
from tests.conftest import FIXTURES

LORA_DIR = os.path.join(FIXTURES, "lora")
ALL = sorted(f for f in os.listdir(LORA_DIR) if f.endswith(".safetensors") and "ia3" not in f)
EXPECTED_ARCH = {
    "flux_kohya_r4a1": "flux", "flux_peft_r4": "flux", "sd15_kohya_locon_r4a2_c2a1": "sd15",
    "sd15_kohya_via_diffusers": "sd15", "sd15_lycoris_full_diff": "sd15", "sd15_lycoris_locon_dora_r4a2": "sd15",
    "sd15_lycoris_loha_r4a2": "sd15", "sd15_lycoris_lokr_r4a2": "sd15", "sd15_peft_dora": "sd15",
    "sd15_peft_r4a8_meta": "sd15", "sdxl_kohya_r1a1_fp16_trimmed": "sdxl", "sdxl_peft_r8a4": "sdxl",
    "flux_peft_norm_out_r4": "flux", "sd15_diffusers_attnprocs_r4": "sd15",
}


def _raw(path):
    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _tolerance(lora) -> float:
    dtypes = {d for layer in lora for d in layer.dtypes()}
    return 1e-6 if dtypes <= {torch.float32} else 4e-3


@pytest.mark.parametrize("name", ALL)
def test_reads_every_key(name):
    path = os.path.join(LORA_DIR, name)
    lora = read_lora(path)
    assert lora.unknown_keys == []
    assert len(lora) > 0
    stem = name[: -len(".safetensors")]
    if stem in EXPECTED_ARCH:
        assert lora.architecture == EXPECTED_ARCH[stem]
    raw = _raw(path)
    prefixes = {split_key(k)[0] for k in raw}
    assert {layer.source_key for layer in lora} == prefixes


@pytest.mark.parametrize("convention", ["kohya", "peft", "comfy"])
@pytest.mark.parametrize("name", ALL)
def test_write_and_reread_same_delta(name, convention, tmp_path):
    source = read_lora(os.path.join(LORA_DIR, name))
    out = tmp_path / f"out_{convention}.safetensors"
    size = write_lora(source, out, convention=convention)
    assert size == os.path.getsize(out)
    again = read_lora(out, arch=source.architecture)
    assert again.unknown_keys == []
    tolerance = _tolerance(source)
    # compare per target weight: fused/split conversions change the layer count, never the weight change
    expected_deltas, got_deltas = _deltas_by_weight(source), _deltas_by_weight(again)
    assert got_deltas.keys() == expected_deltas.keys()
    for weight, expected in expected_deltas.items():
        got = got_deltas[weight]
        # kohya names a fused weight whole: slices it lacks (Flux proj_mlp of linear1) come back as zero rows
        height = max(got.shape[0], expected.shape[0])
        got, expected = (torch.cat([t, t.new_zeros(height - t.shape[0], t.shape[1])]) for t in (got, expected))
        rel = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        assert rel <= tolerance, (weight, rel)
    for key, layer in source.layers.items():
        if layer.dora_scale is not None:
            match = [l for l in again if l.name == layer.name]
            assert match and torch.equal(match[0].dora_scale.flatten().float(), layer.dora_scale.flatten().float())


def _deltas_by_weight(lora):
    """{canonical weight name: ΔW of all layers touching it, placed at their rows}."""
    out = {}
    for layer in lora:
        delta = delta_weight(layer).double().flatten(1)
        if layer.offset is None:
            out[layer.name] = out.get(layer.name, 0) + delta
        else:
            out.setdefault(layer.name, {})[layer.offset[1]] = delta
    for name, value in list(out.items()):
        if isinstance(value, dict):  # row slices in place, gaps as zero rows
            height = max(start + d.shape[0] for start, d in value.items())
            full = torch.zeros(height, next(iter(value.values())).shape[1], dtype=torch.float64)
            for start, d in value.items():
                full[start:start + d.shape[0]] = d
            out[name] = full
    return out


def test_producer_maths_loha_lokr_locon():
    """ΔW from raw tensors with the producers' formulas, independent of core.delta."""
    raw = _raw(os.path.join(LORA_DIR, "sd15_lycoris_loha_r4a2.safetensors"))
    lora = read_lora(os.path.join(LORA_DIR, "sd15_lycoris_loha_r4a2.safetensors"))
    p = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    f = {k: raw[f"{p}.{k}"].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    expected = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * f["alpha"] / 4
    layer = next(l for l in lora if l.source_key == p)
    assert torch.allclose(delta_weight(layer), expected, rtol=1e-5, atol=1e-7)

    raw = _raw(os.path.join(LORA_DIR, "sd15_lycoris_lokr_r4a2.safetensors"))
    lora = read_lora(os.path.join(LORA_DIR, "sd15_lycoris_lokr_r4a2.safetensors"))
    p = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    w2 = raw[f"{p}.lokr_w2_a"].float() @ raw[f"{p}.lokr_w2_b"].float()
    expected = torch.kron(raw[f"{p}.lokr_w1"].float(), w2) * raw[f"{p}.alpha"].float() / 4
    layer = next(l for l in lora if l.source_key == p)
    assert torch.allclose(delta_weight(layer), expected, rtol=1e-5, atol=1e-7)
    full_halves = [l for l in lora if "w1" in l.factors and "w2" in l.factors]
    assert full_halves and all(l.scale == 1.0 for l in full_halves)  # LoKr with both halves full ignores alpha

    raw = _raw(os.path.join(LORA_DIR, "sd15_kohya_locon_r4a2_c2a1.safetensors"))
    lora = read_lora(os.path.join(LORA_DIR, "sd15_kohya_locon_r4a2_c2a1.safetensors"))
    p = "lora_unet_down_blocks_0_resnets_0_conv1"
    up, down = raw[f"{p}.lora_up.weight"].float(), raw[f"{p}.lora_down.weight"].float()
    expected = (up.flatten(1) @ down.flatten(1)).reshape(32, 32, 3, 3) * raw[f"{p}.alpha"].float() / 2
    layer = next(l for l in lora if l.source_key == p)
    assert layer.shape == (32, 32, 3, 3) and layer.kind_label == "locon"
    assert torch.allclose(delta_weight(layer), expected, rtol=1e-5, atol=1e-7)


def test_scale_rules():
    meta = read_lora(os.path.join(LORA_DIR, "sd15_peft_r4a8_meta.safetensors"))
    assert {l.scale for l in meta} == {2.0}  # lora_alpha 8 / r 4 from lora_adapter_metadata
    no_alpha = read_lora(os.path.join(LORA_DIR, "sdxl_peft_r8a4.safetensors"))
    assert {l.scale for l in no_alpha} == {1.0}  # diffusers 0.32 drops alpha: scale 1
    kohya = read_lora(os.path.join(LORA_DIR, "sd15_kohya_locon_r4a2_c2a1.safetensors"))
    assert {round(l.scale, 6) for l in kohya} == {0.5}  # 2/4 linear, 1/2 conv
    via = read_lora(os.path.join(LORA_DIR, "sd15_kohya_via_diffusers.safetensors"))
    assert {l.scale for l in via} == {1.0}  # int64 alpha = rank


def test_layer_counts_by_kind():
    counts = {}
    for name in ALL:
        lora = read_lora(os.path.join(LORA_DIR, name))
        for layer in lora:
            counts.setdefault(name, {}).setdefault(layer.kind_label, 0)
            counts[name][layer.kind_label] += 1
    assert counts["sd15_lycoris_locon_dora_r4a2.safetensors"] == {"lora+dora": 54, "locon+dora": 8}
    assert counts["sd15_lycoris_full_diff.safetensors"] == {"full": 62}
    assert counts["sd15_peft_dora.safetensors"]["lora+dora"] == 32
    assert "locon" in counts["sd15_kohya_locon_r4a2_c2a1.safetensors"]

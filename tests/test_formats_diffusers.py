"""A file written by diffusers + PEFT themselves (tools/make_diffusers_fixtures.py): every layer's ΔW
equals what PEFT's own layers add, including Flux's norm_out.linear, whose rows diffusers orders
(scale, shift) and BFL (shift, scale); it writes back to the same ΔW in every format."""
import os

import torch
from safetensors import safe_open

from core.delta import delta_weight
from core.formats import read_lora, write_lora
from tests.conftest import FIXTURES

NAME = "flux_peft_norm_out_r4"


def _expected() -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(FIXTURES, "lora_expected", f"{NAME}.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _check(lora, expected):
    assert len(lora.layers) == len(expected) == 10
    for layer in lora:
        module = layer.source_key[len("transformer."):] if layer.source_key.startswith("transformer.") \
            else None
        ours = delta_weight(layer)
        if layer.name == "diffusion_model.final_layer.adaLN_modulation.1":
            theirs = expected["norm_out.linear"]
            half = theirs.shape[0] // 2
            theirs = torch.cat([theirs[half:], theirs[:half]])  # ComfyUI's swap_scale_shift
        else:
            theirs = expected[module]
        assert ours.shape == theirs.shape, layer.name
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-6, layer.name


def test_producer_file_reads_to_peft_delta():
    lora = read_lora(os.path.join(FIXTURES, "lora", f"{NAME}.safetensors"))
    assert lora.architecture == "flux" and lora.unknown_keys == []
    assert "diffusion_model.final_layer.adaLN_modulation.1" in lora.layers
    _check(lora, _expected())


def _by_weight(lora) -> dict[str, torch.Tensor]:
    """ΔW per changed weight, row slices (q, k, v of a fused qkv) put in place; kohya fuses them."""
    out: dict[str, torch.Tensor] = {}
    for layer in lora:
        delta = delta_weight(layer).flatten(1)
        start = layer.offset[1] if layer.offset else 0
        height = max(out[layer.name].shape[0] if layer.name in out else 0, start + delta.shape[0])
        full = torch.zeros(height, delta.shape[1])
        if layer.name in out:
            full[: out[layer.name].shape[0]] = out[layer.name]
        full[start:start + delta.shape[0]] += delta
        out[layer.name] = full
    return out


def test_every_output_format_keeps_it(tmp_path):
    source = read_lora(os.path.join(FIXTURES, "lora", f"{NAME}.safetensors"))
    expected = _by_weight(source)
    for convention in ("kohya", "comfy", "peft"):
        out = tmp_path / f"{convention}.safetensors"
        write_lora(source, out, convention=convention)
        again = _by_weight(read_lora(out, arch="flux"))
        assert again.keys() == expected.keys(), convention
        for name, delta in expected.items():
            other = again[name]
            height = max(delta.shape[0], other.shape[0])  # kohya writes a fused weight whole (zero rows)
            padded = [torch.cat([t, torch.zeros(height - t.shape[0], t.shape[1])]) for t in (delta, other)]
            assert torch.allclose(padded[1], padded[0], rtol=1e-6, atol=1e-7), (convention, name)


def test_old_diffusers_attention_processor_file():
    """diffusers 0.14's LoRA attention processors (to_q_lora.up/down under ...attn1.processor.), as
    its own save_attn_procs wrote them: SGM names, scale 1, ΔW = up·down for all 128 projections."""
    name = "sd15_diffusers_attnprocs_r4"
    lora = read_lora(os.path.join(FIXTURES, "lora", f"{name}.safetensors"))
    assert lora.architecture == "sd15" and lora.unknown_keys == []
    with safe_open(os.path.join(FIXTURES, "lora_expected", f"{name}.safetensors"), "pt") as fh:
        expected = {k: fh.get_tensor(k) for k in fh.keys()}
    assert len(lora.layers) == len(expected) == 128
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0" in lora.layers
    assert "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_q" in lora.layers
    for layer in lora:
        module = layer.source_key.replace(".processor.", ".").replace("_lora", "")
        module = module + ".0" if module.endswith(".to_out") else module
        assert layer.scale == 1.0
        assert torch.allclose(delta_weight(layer), expected[module], rtol=1e-6, atol=1e-8), layer.name

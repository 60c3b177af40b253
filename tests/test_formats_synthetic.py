"""Formats no shared fixture covers yet, built key by key as their producers name them:
old diffusers attention processors, LoCon Tucker (lora_mid), LoHa Tucker (hada_t1/t2), LoKr Tucker."""
import pytest
import torch
from safetensors.torch import save_file

from core.delta import delta_weight
from core.formats import read_lora, write_lora


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_old_diffusers_attention_processors(tmp_path):
    g = _g()
    root = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor."
    tensors = {}
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        tensors[f"{root}{proj}_lora.up.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{root}{proj}_lora.down.weight"] = torch.randn(4, 32, generator=g)
    path = tmp_path / "attnproc.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path, arch="sd15")
    assert lora.unknown_keys == []
    base = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1."
    assert set(lora.layers) == {base + p for p in ("to_q", "to_k", "to_v", "to_out.0")}
    layer = lora.layers[base + "to_out.0"]
    assert layer.scale == 1.0
    expected = tensors[f"{root}to_out_lora.up.weight"] @ tensors[f"{root}to_out_lora.down.weight"]
    assert torch.allclose(delta_weight(layer), expected)


def test_locon_tucker_mid(tmp_path):
    g = _g(1)
    p = "lora_unet_down_blocks_0_resnets_0_conv1"
    up, down, mid = torch.randn(32, 4, 1, 1, generator=g), torch.randn(4, 16, 1, 1, generator=g), \
        torch.randn(4, 4, 3, 3, generator=g)
    path = tmp_path / "tucker.safetensors"
    save_file({f"{p}.lora_up.weight": up, f"{p}.lora_down.weight": down, f"{p}.lora_mid.weight": mid,
               f"{p}.alpha": torch.tensor(2.0)}, str(path))
    (layer,) = read_lora(path, arch="sd15")
    assert layer.shape == (32, 16, 3, 3) and layer.kind_label == "locon+tucker"
    # LyCORIS: W = einsum(mid, up, down) "i j k l, o i, j m -> o m k l"
    expected = torch.einsum("ijkl,oi,jm->omkl", mid, up.flatten(1), down.flatten(1)) * 0.5
    assert torch.allclose(delta_weight(layer), expected, atol=1e-5)
    out = tmp_path / "again.safetensors"
    write_lora(read_lora(path, arch="sd15"), out)
    assert torch.allclose(delta_weight(next(iter(read_lora(out, arch="sd15")))), expected, atol=1e-5)


def test_loha_and_lokr_tucker(tmp_path):
    g = _g(2)
    p = "lora_unet_down_blocks_0_resnets_0_conv1"
    r = 4
    w = {f"hada_w{i}_{ab}": torch.randn(r, 32 if ab == "a" else 16, generator=g) for i in (1, 2) for ab in "ab"}
    t = {f"hada_t{i}": torch.randn(r, r, 3, 3, generator=g) for i in (1, 2)}
    path = tmp_path / "loha.safetensors"
    save_file({f"{p}.{k}": v for k, v in {**w, **t}.items()} | {f"{p}.alpha": torch.tensor(2.0)}, str(path))
    (layer,) = read_lora(path, arch="sd15")
    assert layer.shape == (32, 16, 3, 3) and layer.kind_label == "loha+tucker"
    half = [torch.einsum("ijkl,ip,jr->prkl", t[f"hada_t{i}"], w[f"hada_w{i}_a"], w[f"hada_w{i}_b"]) for i in (1, 2)]
    assert torch.allclose(delta_weight(layer), half[0] * half[1] * 0.5, rtol=1e-4, atol=1e-5)

    k = {"lokr_w1": torch.randn(2, 4, generator=g), "lokr_w2_a": torch.randn(r, 16, generator=g),
         "lokr_w2_b": torch.randn(r, 4, generator=g), "lokr_t2": torch.randn(r, r, 3, 3, generator=g)}
    path = tmp_path / "lokr.safetensors"
    save_file({f"{p}.{name}": v for name, v in k.items()} | {f"{p}.alpha": torch.tensor(2.0)}, str(path))
    (layer,) = read_lora(path, arch="sd15")
    w2 = torch.einsum("ijkl,ip,jr->prkl", k["lokr_t2"], k["lokr_w2_a"], k["lokr_w2_b"])
    expected = torch.kron(k["lokr_w1"][:, :, None, None], w2.contiguous()) * 0.5
    assert layer.shape == (32, 16, 3, 3)
    assert torch.allclose(delta_weight(layer), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffixes", [(".lora_up.weight", ".lora_down.weight", ".lora_mid.weight")])
def test_tucker_mid_that_does_not_chain_is_refused(tmp_path, suffixes):
    from core.errors import LoraError

    p = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = tmp_path / "bad.safetensors"
    save_file({p + suffixes[0]: torch.ones(32, 4, 1, 1), p + suffixes[1]: torch.ones(4, 16, 1, 1),
               p + suffixes[2]: torch.ones(3, 4, 3, 3)}, str(path))
    with pytest.raises(LoraError, match="Tucker factors do not chain"):
        read_lora(path, arch="sd15")


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full"])
def test_flux_norm_out_rows_are_bfl_with_halves_swapped(tmp_path, kind):
    """diffusers' norm_out.linear gives (scale, shift) where BFL's final_layer.adaLN_modulation.1 gives
    (shift, scale): read as the BFL weight with the halves swapped, written back unchanged."""
    from safetensors import safe_open

    g = _g(5)
    prefix = "transformer.norm_out.linear"
    others = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=g),
              "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=g)}
    tensors = {
        "lora": {f"{prefix}.lora_A.weight": torch.randn(4, 64, generator=g),
                 f"{prefix}.lora_B.weight": torch.randn(128, 4, generator=g)},
        "loha": {f"{prefix}.hada_w1_a": torch.randn(128, 2, generator=g),
                 f"{prefix}.hada_w1_b": torch.randn(2, 64, generator=g),
                 f"{prefix}.hada_w2_a": torch.randn(128, 2, generator=g),
                 f"{prefix}.hada_w2_b": torch.randn(2, 64, generator=g)},
        "lokr": {f"{prefix}.lokr_w1": torch.randn(8, 4, generator=g),
                 f"{prefix}.lokr_w2": torch.randn(16, 16, generator=g)},
        "full": {f"{prefix}.diff": torch.randn(128, 64, generator=g),
                 f"{prefix}.diff_b": torch.randn(128, generator=g)},
    }[kind]
    path = tmp_path / "flux_norm_out.safetensors"
    save_file({**tensors, **others}, str(path))
    lora = read_lora(path, arch="flux")
    assert lora.unknown_keys == []
    layer = lora.layers["diffusion_model.final_layer.adaLN_modulation.1"]
    if kind == "lora":
        diffusers = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]
    elif kind == "loha":
        t = tensors
        diffusers = (t[f"{prefix}.hada_w1_a"] @ t[f"{prefix}.hada_w1_b"]) * \
            (t[f"{prefix}.hada_w2_a"] @ t[f"{prefix}.hada_w2_b"])
    elif kind == "lokr":
        diffusers = torch.kron(tensors[f"{prefix}.lokr_w1"], tensors[f"{prefix}.lokr_w2"])
    else:
        diffusers = tensors[f"{prefix}.diff"]
        bias = tensors[f"{prefix}.diff_b"]
        assert torch.equal(layer.bias_diff, torch.cat([bias[64:], bias[:64]]))
    swapped = torch.cat([diffusers[64:], diffusers[:64]])  # ComfyUI's swap_scale_shift
    assert torch.allclose(delta_weight(layer), swapped, rtol=1e-5, atol=1e-5)
    for convention in ("kohya", "comfy", "peft"):
        out = tmp_path / f"{convention}.safetensors"
        write_lora(lora, out, convention=convention)
        again = read_lora(out, arch="flux").layers["diffusion_model.final_layer.adaLN_modulation.1"]
        assert torch.allclose(delta_weight(again), swapped, rtol=1e-5, atol=1e-5), convention
    with safe_open(str(tmp_path / "peft.safetensors"), "pt") as fh:  # PEFT: the producer's own rows again
        for key, value in tensors.items():
            assert torch.equal(fh.get_tensor(key), value), key

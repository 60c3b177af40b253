"""Our names against ComfyUI's own key maps (comfy.lora) for small real SDXL, SD1.5 and Flux models."""
import pytest

from core import naming

# Key-map conventions we deliberately do not read, and why.
NOT_READ = (
    "lora_prior_",  # Stable Cascade
    "base_model.model.",  # only HunyuanDiT/PixArt register it
    "transformer.norm_out.linear",  # Flux final modulation: needs a scale/shift row swap, not read yet
    "lycoris_norm_out_linear", "lora_transformer_norm_out_linear",
)
# Text-encoder modules LoRA trainers target (comfy.lora.LORA_CLIP_MAP): the host names only these
# for kohya/diffusers prefixes; embeddings etc. exist only under "text_encoders.".
TE_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
             "mlp.fc2", "SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
             "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


# How many of the host model's LoRA-targetable weights each convention names (regression floor).
MIN_WRITTEN = {("sdxl", "kohya"): 836, ("sdxl", "peft"): 276, ("sdxl", "comfy"): 842, ("sd15", "kohya"): 300,
               ("sd15", "peft"): 172, ("sd15", "comfy"): 303, ("flux", "kohya"): 68, ("flux", "peft"): 53,
               ("flux", "comfy"): 73}


def _target(value):
    """(model key without .weight, row offset or None) of a key-map value."""
    if isinstance(value, str):
        return value, None
    return value[0], value[1]


@pytest.mark.parametrize("arch", ["sdxl", "sd15", "flux"])
def test_every_host_key_maps_to_the_same_weight(comfy_hosts, arch):
    host = comfy_hosts[arch]()
    checked, t5_numbered = 0, {}
    for key, value in host.key_map.items():
        model_key, offset = _target(value)
        if not model_key.endswith(".weight") or key.startswith(NOT_READ) or key.endswith((".bias", ".weight")):
            continue
        # Flux's T5 under both lora_te2_ (OneTrainer) and lora_te3_ (sd-scripts): both read
        assert_reads_as_the_host(naming, key, arch, model_key, offset)
        checked += 1
        t5_numbered[key[:9]] = t5_numbered.get(key[:9], 0) + ("t5xxl" in model_key)
    assert checked > {"sdxl": 3000, "sd15": 1000, "flux": 200}[arch]
    if arch == "flux":
        assert t5_numbered["lora_te2_"] == t5_numbered["lora_te3_"] > 0


@pytest.mark.parametrize("arch", ["sdxl", "sd15", "flux"])
@pytest.mark.parametrize("convention", ["kohya", "peft", "comfy"])
def test_names_we_write_are_loaded_by_the_host(comfy_hosts, arch, convention):
    host = comfy_hosts[arch]()
    existing = {k for k, v in host.model.model.state_dict().items() if v.dim() >= 2}
    existing |= {k for k, v in host.clip.cond_stage_model.state_dict().items() if v.dim() >= 2}
    targets = {}
    for key, value in host.key_map.items():
        model_key, offset = _target(value)
        if model_key.endswith(".weight") and offset is None and model_key in existing:
            targets[model_key[: -len(".weight")]] = model_key
    written = 0
    for name, model_key in targets.items():
        if not name.startswith("diffusion_model.") and convention != "comfy" and not name.endswith(TE_LAYERS):
            continue  # embeddings, projections: only ComfyUI's own format names them
        if name.startswith("t5xxl.") and convention == "peft":
            continue  # the host has no diffusers names for T5
        if convention == "peft" and arch != "flux" and (".attn1." in name or ".attn2." in name):
            continue  # host limitation: ComfyUI 0.3.64 maps diffusers attention keys only as ...processor.to_q
        parts = naming.split_parts(name, arch, convention)
        if parts:
            for prefix, part in parts:
                model, offset = _target(host.key_map[prefix])
                assert model == model_key, prefix
            written += 1
            continue
        try:
            prefix = naming.from_canonical(name, arch, convention)
        except Exception as exc:  # only weights that have no name in that convention may refuse
            assert convention == "peft" and "has no peft name" in str(exc), (name, exc)
            continue
        assert _target(host.key_map.get(prefix, (None, None)))[0] == model_key, (name, prefix)
        written += 1
    assert written >= MIN_WRITTEN[(arch, convention)]


def assert_reads_as_the_host(naming, key: str, arch: str, model_key: str, offset) -> None:
    """The pack reads LoRA key ``key`` as the weight (and row slice) ComfyUI's key map patches with it."""
    target = naming.to_canonical(key, arch)
    assert target is not None, key
    assert target.name == model_key[: -len(".weight")], key
    if offset is not None:
        assert target.part is not None, key
        start_units, length_units = target.part
        unit = offset[2] // length_units
        assert (start_units * unit, length_units * unit) == (offset[1], offset[2]), key

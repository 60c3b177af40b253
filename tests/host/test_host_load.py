"""Files we write load in the real host with zero unloaded keys, and its adapters give our ΔW."""
import logging
import os
import re

import pytest
import torch
from safetensors import safe_open

from core.delta import delta_weight
from core.formats import read_lora, write_lora
from tests.conftest import FIXTURES

LORA_DIR = os.path.join(FIXTURES, "lora")
FILES = sorted(f for f in os.listdir(LORA_DIR) if f.endswith(".safetensors"))


def _host_load(comfy_models, arch, path):
    """(patch dict, unloaded keys) from comfy.lora.load_lora with the host model's key map."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils

    host = comfy_models[arch]()
    state = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path), safe_load=True))
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    try:
        patches = comfy.lora.load_lora(state, host.key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    unloaded = [m.split(": ", 1)[1] for m in records if m.startswith("lora key not loaded")]
    return patches, unloaded


def _host_delta(adapter, shape, function=None):
    """ΔW the host's weight adapter adds to a zero weight of ``shape`` (fp32, strength 1); ``function``
    is the patch key's own transform (Flux norm_out.linear: swap_scale_shift)."""
    weight = torch.zeros(shape, dtype=torch.float32)
    function = function or (lambda a: a)
    if isinstance(adapter, tuple):  # ("diff", (tensor,))
        return function(adapter[1][0].float().reshape(shape))
    return adapter.calculate_weight(weight, "key", 1.0, 1.0, None, function, torch.float32)


_UNET_ATTENTION = re.compile(r"^unet\..*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.")


def _assert_only_attention_is_unloaded(comfy_hosts, source, out):
    """The host limitations README names, pinned: ComfyUI 0.3.64 maps SD1.5/SDXL diffusers attention keys only
    as ``...processor.to_q``, so exactly the UNet attention keys of a PEFT file stay unloaded, and it never reads
    PEFT's ``lora_magnitude_vector`` (DoRA); every other key loads."""
    patches, unloaded = _host_load(comfy_hosts, source.architecture, out)
    with safe_open(str(out), "pt") as fh:
        written = list(fh.keys())
    expected = {k for k in written if _UNET_ATTENTION.match(k) or k.endswith(".lora_magnitude_vector")}
    assert set(unloaded) == expected
    has_attention = any(".attn1." in l.name or ".attn2." in l.name for l in source if l.name.startswith("diffusion_"))
    assert any(_UNET_ATTENTION.match(k) for k in expected) == has_attention
    assert len(patches) > 0 or not (set(written) - expected)


@pytest.mark.parametrize("convention", ["kohya", "comfy", "peft"])
@pytest.mark.parametrize("name", FILES)
def test_written_file_loads_in_host_with_same_delta(comfy_hosts, name, convention, tmp_path):
    source = read_lora(os.path.join(LORA_DIR, name))
    out = tmp_path / f"{convention}.safetensors"
    write_lora(source, out, convention=convention)
    if convention == "peft" and source.architecture != "flux":
        _assert_only_attention_is_unloaded(comfy_hosts, source, out)
        return
    written = read_lora(out, arch=source.architecture)
    patches, unloaded = _host_load(comfy_hosts, source.architecture, out)
    assert unloaded == []
    assert len(patches) >= len({(l.name, l.offset) for l in written}) - 0
    by_target = {}
    for key, adapter in patches.items():
        model_key, offset = (key, None) if isinstance(key, str) else (key[0], key[1])
        # a row slice is identified by start/length: the host model's widths differ from the fixture's
        function = key[2] if not isinstance(key, str) and len(key) > 2 else None
        by_target[(model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key,
                   offset[1] / offset[2] if offset else None)] = (adapter, function)
    compared = 0
    for layer in written:
        if layer.dora_scale is not None:
            continue  # the host's DoRA result depends on the base weight: compared in the next test
        offset = layer.offset[1] / layer.offset[2] if layer.offset else None
        adapter, function = by_target[(layer.name, offset)]
        ours = delta_weight(layer)
        theirs = _host_delta(adapter, layer.shape, function)
        scale = float(ours.norm()) or 1.0
        assert float((theirs - ours).norm()) / scale < 1e-5, layer.name
        compared += 1
    assert compared == sum(1 for l in written if l.dora_scale is None)


@pytest.mark.parametrize("name", ["sd15_lycoris_locon_dora_r4a2.safetensors"])
def test_dora_written_file_matches_host_on_the_original(comfy_hosts, name, tmp_path):
    """The host applies our rewritten DoRA file exactly as it applies the producer's file."""
    out = tmp_path / "dora.safetensors"
    source = read_lora(os.path.join(LORA_DIR, name))
    write_lora(source, out, convention="kohya", dtype=torch.float32)
    original, _ = _host_load(comfy_hosts, "sd15", os.path.join(LORA_DIR, name))
    rewritten, unloaded = _host_load(comfy_hosts, "sd15", out)
    assert unloaded == [] and original.keys() == rewritten.keys()
    g = torch.Generator().manual_seed(0)
    for key in list(original)[:12]:
        layer = next(l for l in source if f"{l.name}.weight" == key)
        base = torch.randn(layer.shape, generator=g)
        a = original[key].calculate_weight(base.clone(), key, 1.0, 1.0, None, lambda x: x, torch.float32)
        b = rewritten[key].calculate_weight(base.clone(), key, 1.0, 1.0, None, lambda x: x, torch.float32)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), key

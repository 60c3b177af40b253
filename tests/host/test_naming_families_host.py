"""Every family's naming table against ComfyUI 0.3.64's own key maps, on the tiny real models of family_models.py.

Two directions, as tests/host/test_naming_host.py does for SD1.5/SDXL/Flux:
- every key the host maps to a weight (trainer conventions the host registers for that model class) reads, under
  the family, as exactly that weight (and row slice);
- every LoRA-targetable weight, written in each output convention the family declares, gets a key the host maps
  back to that same weight (fused weights through their named parts).
"""
from __future__ import annotations

import pytest

from core import naming
from tests.host.test_naming_host import assert_reads_as_the_host

# test-model family -> registered naming family
FAMILY_OF = {"wan21_t2v": "wan", "wan21_i2v": "wan", "wan22_ti2v_5b": "wan", "qwen_image": "qwen_image",
             "sd3": "sd3", "hunyuan_video": "hunyuan_video", "ltxv": "ltxv", "hidream": "hidream",
             "lumina2": "lumina2", "chroma": "chroma", "sdxl_refiner": "sdxl_refiner"}
# Host keys we deliberately do not read, and why.
NOT_READ = (
    "lora_prior_",  # Stable Cascade's prefix, registered for any CLIP-G-only model
    "base_model.model.",  # flash-sd3's prefix (ComfyUI maps it; no trainer we know writes it)
    "text_encoders.",  # generic names of every tensor, embeddings included (checked by the writer test)
)
# Fewest keys each family must check (a floor that catches a table that silently stops matching).
MIN_CHECKED = {"wan": 20, "qwen_image": 60, "sd3": 150, "hunyuan_video": 100, "ltxv": 50, "hidream": 150,
               "lumina2": 40, "chroma": 80, "sdxl_refiner": 300}


def _target(value):
    return (value, None) if isinstance(value, str) else (value[0], value[1])


@pytest.fixture(scope="module")
def family_hosts(comfy_hosts):
    from tests.host.family_models import FAMILY_BUILDERS

    return FAMILY_BUILDERS


@pytest.mark.parametrize("model", sorted(FAMILY_OF))
def test_every_host_key_reads_as_its_weight(family_hosts, model):
    host = family_hosts[model]()
    arch = FAMILY_OF[model]
    checked = 0
    for key, value in host.key_map.items():
        model_key, offset = _target(value)
        if not model_key.endswith(".weight") or key.startswith(NOT_READ) or key.endswith((".weight", ".bias")):
            continue
        if arch == "sd3" and key.startswith("lora_te") and "t5xxl" in model_key and not key.startswith("lora_te3_"):
            continue  # OneTrainer's alternative numbering of T5 (te2 beside te3) is not read
        assert_reads_as_the_host(naming, key, arch, model_key, offset)
        checked += 1
    assert checked >= MIN_CHECKED[arch]


@pytest.mark.parametrize("model", sorted(FAMILY_OF))
def test_names_we_write_are_loaded_by_the_host(family_hosts, model):
    from tests.host.family_models import host_state

    host = family_hosts[model]()
    arch = FAMILY_OF[model]
    family = naming.family(arch)
    state = host_state(host)
    mapped = {}
    for key, value in host.key_map.items():
        model_key, offset = _target(value)
        mapped.setdefault(key, (model_key, offset))
    weights = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() >= 2
               and k.startswith("diffusion_model.")]
    written = 0
    for convention in family.outputs:
        for name in weights:
            parts = naming.split_parts(name, arch, convention)
            if parts:
                for prefix, part in parts:
                    assert mapped[prefix][0] == f"{name}.weight", (convention, prefix)
                    assert mapped[prefix][1] is not None, (convention, prefix)
                written += 1
                continue
            try:
                prefix = naming.from_canonical(name, arch, convention)
            except Exception as exc:  # only weights with no diffusers module may refuse, and only in peft
                assert convention == "peft" and "has no peft name" in str(exc), (name, exc)
                continue
            assert mapped.get(prefix, (None, None))[0] == f"{name}.weight", (convention, name, prefix)
            assert naming.to_canonical(prefix, arch).name == name, (convention, prefix)
            written += 1
    assert written >= len(weights) * len(family.outputs) * 0.6

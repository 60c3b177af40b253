"""Files LyCORIS itself wrote (Tucker LoCon/LoHa, LoKr): ΔW equals what LyCORIS' forward applies."""
import os

import pytest
from safetensors import safe_open

from core.delta import delta_weight
from core.formats import read_lora, write_lora
from tests.conftest import FIXTURES

NAMES = ["sd15_lycoris_locon_tucker_r4a2", "sd15_lycoris_loha_tucker_r4a2", "sd15_lycoris_lokr_tucker_r4a2",
         "sd15_lycoris_lokr_t2_r4a2"]
KINDS = {"sd15_lycoris_locon_tucker_r4a2": {"locon+tucker", "lora"},
         "sd15_lycoris_loha_tucker_r4a2": {"loha+tucker", "loha"},
         "sd15_lycoris_lokr_tucker_r4a2": {"lokr"},
         "sd15_lycoris_lokr_t2_r4a2": {"lokr+tucker", "lokr"}}  # lokr_t2 on the 3x3 convs


def _expected(name):
    with safe_open(os.path.join(FIXTURES, "lora_expected", f"{name}.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.parametrize("name", NAMES)
def test_delta_equals_lycoris_forward(name, tmp_path):
    lora = read_lora(os.path.join(FIXTURES, "lora", f"{name}.safetensors"))
    expected = _expected(name)
    assert lora.architecture == "sd15" and {l.source_key for l in lora} == set(expected)
    for layer in lora:
        reference = expected[layer.source_key]
        assert layer.shape == tuple(reference.shape)
        assert float((delta_weight(layer) - reference).norm() / reference.norm()) < 1e-6, layer.source_key
    assert {l.kind_label for l in lora} == KINDS[name]
    out = tmp_path / "again.safetensors"
    write_lora(lora, out)
    for layer in read_lora(out, arch="sd15"):
        reference = expected[layer.source_key]
        assert float((delta_weight(layer) - reference).norm() / reference.norm()) < 1e-6

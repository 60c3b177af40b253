"""Bad input: the project's own error, naming the file and the layer; nothing is ever left behind."""
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from core.cli import main
from core.errors import LoraError
from core.formats import read_lora, write_lora
from tests.conftest import FIXTURES

GOOD = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
LAYER = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def _expect(path, *words):
    with pytest.raises(LoraError) as info:
        read_lora(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _expect(path, "empty")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    data = open(GOOD, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    _expect(path, "truncated")


def test_header_offsets_past_the_end(tmp_path):
    path = tmp_path / "offsets.safetensors"
    header = json.dumps({f"{LAYER}.lora_up.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    _expect(path, "past the end", LAYER)


def test_header_length_past_the_end(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    _expect(path, "past the end")


def test_pickle_is_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": Boom()}, protocol=2))
    _expect(path, "pickle")
    assert not (tmp_path / "pwned").exists()
    zipped = tmp_path / "model.safetensors"
    torch.save({"a": torch.zeros(1)}, zipped)
    _expect(zipped, "pickle")


def test_checkpoint_given_as_lora(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    _expect(path, "checkpoint", "not a LoRA")


def test_shapes_that_do_not_chain(tmp_path):
    path = tmp_path / "chain.safetensors"
    save_file({f"{LAYER}.lora_up.weight": torch.ones(64, 4), f"{LAYER}.lora_down.weight": torch.ones(5, 32)},
              str(path))
    _expect(path, LAYER, "do not chain")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf(tmp_path, bad):
    path = tmp_path / "nan.safetensors"
    up = torch.ones(64, 4)
    up[3, 1] = bad
    save_file({f"{LAYER}.lora_up.weight": up, f"{LAYER}.lora_down.weight": torch.ones(4, 32)}, str(path))
    _expect(path, LAYER, "NaN or Inf")


def test_ia3_is_refused_clearly(tmp_path):
    path = tmp_path / "ia3.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.ia3_l": torch.ones(32, 1)},
              str(path))
    _expect(path, "IA3", "not supported")


def test_unknown_keys_are_listed_not_dropped_silently(tmp_path, caplog):
    path = tmp_path / "extra.safetensors"
    tensors = {f"{LAYER}.lora_up.weight": torch.ones(64, 4), f"{LAYER}.lora_down.weight": torch.ones(4, 32),
               "some_other_thing.weight": torch.ones(2), "lora_unet_not_a_real_block.lora_up.weight": torch.ones(8, 4),
               "lora_unet_not_a_real_block.lora_down.weight": torch.ones(4, 8)}
    save_file(tensors, str(path))
    lora = read_lora(path)
    # issue 9: a LoRA-shaped group no table knows is a layer under its own name, not a dropped key
    assert len(lora) == 2 and lora.layers["lora_unet_not_a_real_block"].verbatim
    assert lora.unknown_keys == ["some_other_thing.weight"]
    assert "some_other_thing.weight" in caplog.text


def test_no_overwrite_and_no_partial_output(tmp_path, capsys):
    lora = read_lora(GOOD)
    out = tmp_path / "out.safetensors"
    write_lora(lora, out)
    before = out.read_bytes()
    with pytest.raises(LoraError, match="already exists"):
        write_lora(lora, out)
    assert out.read_bytes() == before
    # a failing conversion (bad input) leaves nothing at the output path, and no temp files
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    target = tmp_path / "converted.safetensors"
    assert main(["convert", str(bad), "-o", str(target)]) == 1
    assert "empty" in capsys.readouterr().err
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "out.safetensors"]


def test_a_base_of_another_architecture_or_width_is_named():
    """A LoRA checked against the wrong base fails before any norm is computed, naming both."""
    from core.base import StateDictBase
    from core.recipe import parse_recipe
    from core.resize import resize
    from tests.helpers import synthetic_lora

    lora = synthetic_lora(count=3, rank=4, arch="sdxl")
    lora.path = "mine.safetensors"
    weights = {l.name: torch.zeros(l.shape) for l in lora}
    recipe = [parse_recipe("fro_ckpt=1,thr=-3")]
    other = StateDictBase(weights, fingerprint="x", label="the loaded MODEL/CLIP", architecture="sd15")
    with pytest.raises(LoraError, match=r"mine\.safetensors: this LoRA is for SDXL, but the base model "
                                        r"\(the loaded MODEL/CLIP\) is SD15"):
        list(resize(lora, recipe, base=other))
    first = next(iter(lora)).name
    narrow = StateDictBase({**weights, first: torch.zeros(8, 8)}, fingerprint="y", architecture="sdxl")
    with pytest.raises(LoraError, match=r"layer .*: the LoRA changes a \(64, 64\) weight, but the base's .* is "
                                        r"\(8, 8\)"):
        list(resize(lora, recipe, base=narrow))
    same = StateDictBase({l.name: torch.randn(l.shape) for l in lora}, fingerprint="z", architecture="sdxl")
    (result,) = resize(lora, recipe, base=same)
    assert len(result.lora.layers) == 3

"""Issue 9, deliverables 1-2: names are open, and no write is ever a silently wrong file.

- Layers whose names no naming table knows are read under their own key prefix (``Layer.verbatim``), written
  back under the same keys with ``-f keep`` (and by ComfyUI's generic ``lora_unet_`` rule in kohya format when
  they are ComfyUI-style ``diffusion_model.X``), and resized like any other layer.
- Entries that are not low-rank (1-D norm diffs, lone ``.diff_b``, ``.diff_m``, ``.set_weight``) come out
  byte-exact whatever the recipe.
- A format that cannot name some layers fails before any work, naming them; a file with no LoRA layer is
  refused saying what it looks like; a file that does not read back as meant is never moved into place.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.cli import main
from core.delta import delta_weight
from core.errors import LoraError
from core.formats import read_lora, write_lora

g = torch.Generator().manual_seed(9)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# prefix -> (the factor tensors, as a trainer no table knows would write them)
UNKNOWN = {
    "lora_unet_foo_bar_baz": {".lora_down.weight": _rand(4, 24), ".lora_up.weight": _rand(32, 4) * 0.1,
                              ".alpha": torch.tensor(2.0)},
    "my_custom.block.0.proj": {".lora_A.weight": _rand(4, 40), ".lora_B.weight": _rand(48, 4) * 0.1},
    "transformer.something.new": {".lora.down.weight": _rand(3, 16), ".lora.up.weight": _rand(20, 3) * 0.1},
    "diffusion_model.my_new_block.0.ffn": {".lora_down.weight": _rand(4, 36), ".lora_up.weight": _rand(28, 4),
                                           ".diff_b": _rand(28)},
}
# entries carried as they are: a norm's 1-D diff and bias, a lone bias diff, Wan's modulation, diff_m, set_weight
EXTRAS = {
    "diffusion_model.my_new_block.0.norm3.diff": _rand(36, dtype=torch.bfloat16),
    "diffusion_model.my_new_block.0.norm3.diff_b": _rand(36, dtype=torch.bfloat16),
    "diffusion_model.head.head.diff_b": _rand(12),
    "diffusion_model.my_new_block.0.modulation.diff": _rand(1, 6, 36, dtype=torch.bfloat16),
    "diffusion_model.my_new_block.0.modulation.diff_m": _rand(1, 6, 36, dtype=torch.bfloat16),
    "my_custom.block.0.scale.set_weight": _rand(40),
}


def _unknown_file(tmp_path, name="unknown.safetensors"):
    tensors = {prefix + suffix: t for prefix, parts in UNKNOWN.items() for suffix, t in parts.items()}
    tensors.update(EXTRAS)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path, tensors


def _stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                    b.reshape(-1).view(torch.uint8))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm())


def test_unknown_names_are_layers_under_their_own_names(tmp_path):
    path, _ = _unknown_file(tmp_path)
    lora = read_lora(path)
    assert sorted(lora.layers) == sorted(UNKNOWN)
    assert all(layer.verbatim for layer in lora)
    assert lora.layers["my_custom.block.0.proj"].shape == (48, 40)  # up rows × down columns
    assert lora.layers["lora_unet_foo_bar_baz"].scale == 0.5
    assert lora.layers["diffusion_model.my_new_block.0.ffn"].bias_diff is not None
    assert sorted(lora.passthrough) == sorted(EXTRAS)
    assert lora.unknown_keys == []


def test_inspect_counts_what_comfyui_patches(tmp_path, capsys):
    path, _ = _unknown_file(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # 4 layers + 1 bias diff on a layer + 5 applied extras (.diff, .diff_b ×2, modulation .diff, .set_weight);
    # ComfyUI 0.3.64 ignores .diff_m
    assert (info["lora_layers"], info["verbatim_layers"], info["layer_count"]) == (4, 4, 10)
    assert info["passthrough"] == sorted(EXTRAS)


def test_keep_writes_every_key_back_byte_for_byte(tmp_path, capsys):
    path, tensors = _unknown_file(tmp_path)
    out = tmp_path / "kept.safetensors"
    assert main(["convert", str(path), "-o", str(out), "-f", "keep"]) == 0
    written = _stored(out)
    assert sorted(written) == sorted(tensors)
    assert all(_bytes_equal(written[k], t) for k, t in tensors.items())
    again = read_lora(out)
    for name, layer in read_lora(path).layers.items():
        assert _relative(delta_weight(layer), delta_weight(again.layers[name])) == 0.0


def test_kohya_names_comfy_style_layers_by_the_generic_rule(tmp_path, capsys):
    tensors = {f"diffusion_model.my_new_block.0.ffn{s}": t for s, t in UNKNOWN["diffusion_model.my_new_block.0.ffn"]
               .items()}
    tensors.update({k: v for k, v in EXTRAS.items() if k.startswith("diffusion_model.")})
    path = tmp_path / "comfy_style.safetensors"
    save_file(tensors, str(path))
    out = tmp_path / "kohya.safetensors"
    assert main(["convert", str(path), "-o", str(out)]) == 0  # default -f kohya
    written = _stored(out)
    assert {k for k in written if k.startswith("lora_unet_")} == {
        "lora_unet_my_new_block_0_ffn.lora_down.weight", "lora_unet_my_new_block_0_ffn.lora_up.weight",
        "lora_unet_my_new_block_0_ffn.diff_b"}
    extras = {k: v for k, v in EXTRAS.items() if k.startswith("diffusion_model.")}
    assert all(_bytes_equal(written[k], t) for k, t in extras.items())
    source, again = read_lora(path), read_lora(out)
    layer = source.layers["diffusion_model.my_new_block.0.ffn"]
    assert _relative(delta_weight(layer), delta_weight(again.layers["lora_unet_my_new_block_0_ffn"])) == 0.0


def test_resize_of_unknown_names_keeps_names_ranks_and_extras(tmp_path, capsys):
    path, tensors = _unknown_file(tmp_path)
    out_dir = tmp_path / "out"
    assert main(["-", str(path), "-o", str(out_dir), "-r", "rank=2", "-f", "keep", "-t", "32"]) == 0
    (out,) = out_dir.iterdir()
    written = _stored(out)
    assert all(_bytes_equal(written[k], t) for k, t in EXTRAS.items())
    source, resized = read_lora(path), read_lora(out)
    assert sorted(resized.layers) == sorted(source.layers) and all(layer.verbatim for layer in resized)
    for name, layer in source.layers.items():
        assert resized.layers[name].rank == 2
        exact = delta_weight(layer).double()
        sigma = torch.linalg.svdvals(exact.flatten(1))
        truncation = float(sigma[2:].norm() / sigma.norm())  # what a rank-2 SVD cut must lose, no more
        assert truncation > 0.05
        assert abs(_relative(exact, delta_weight(resized.layers[name])) - truncation) < 1e-5
    # the PEFT-style layer stays PEFT-style (no alpha tensor), the kohya one kohya
    assert "my_custom.block.0.proj.lora_B.weight" in written and "my_custom.block.0.proj.alpha" not in written
    assert "lora_unet_foo_bar_baz.lora_up.weight" in written


@pytest.mark.parametrize("fmt, names", [("comfy", ["lora_unet_foo_bar_baz", "my_custom.block.0.proj"]),
                                        ("kohya", ["my_custom.block.0.proj", "transformer.something.new"]),
                                        ("peft", ["lora_unet_foo_bar_baz", "diffusion_model.my_new_block.0.ffn"])])
def test_a_format_that_cannot_name_layers_fails_before_any_work(tmp_path, capsys, fmt, names):
    path, _ = _unknown_file(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(["convert", str(path), "-o", str(out_dir / "c.safetensors"), "-f", fmt]) == 1
    err = capsys.readouterr().err
    assert "needs a table" in err and "-f keep" in err and all(name in err for name in names)
    assert main(["-", str(path), "-o", str(out_dir), "-r", "rank=2", "-f", fmt]) == 1
    err = capsys.readouterr().err
    assert "needs a table" in err and "decompose" not in err
    assert list(out_dir.iterdir()) == []  # nothing written, no temp left


@pytest.mark.parametrize("tensors, words", [
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4), "first_stage_model.x.weight": torch.zeros(2)},
     "looks like a model checkpoint"),
    ({f"blocks.{i}.attn.weight": torch.zeros(4, 4) for i in range(6)}, "looks like a model checkpoint"),
    ({"emb_params": torch.zeros(2, 768)}, "looks like a textual-inversion embedding"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, "looks like a textual-inversion embedding"),
    ({"foo": torch.zeros(3), "bar": torch.zeros(2, 2)}, "no key ends in a LoRA suffix"),
    ({"x.norm.diff": torch.zeros(8), "x.norm.diff_b": torch.zeros(8)}, "only 2 entries that are not low-rank"),
], ids=["checkpoint", "bare-checkpoint", "embedding", "sdxl-embedding", "random", "only-extras"])
def test_a_file_with_no_lora_layer_is_refused_saying_what_it_is(tmp_path, capsys, tensors, words):
    path = tmp_path / "not_a_lora.safetensors"
    save_file(tensors, str(path))
    count = f"0 of {len(tensors)} keys are LoRA factors"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["inspect", str(path)], ["convert", str(path), "-o", str(out_dir / "c.safetensors")],
                 ["-", str(path), "-o", str(out_dir), "-r", "rank=2"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert count in err and words in err and str(path) in err
    assert list(out_dir.iterdir()) == []


def _corrupt_one_chunk(monkeypatch):
    """The writer's byte stream with one tensor's bytes flipped: what a broken disk or a writer bug does."""
    import core.formats.writer as writer

    real = writer.data_chunks

    def chunks(tensors):
        for index, chunk in enumerate(real(tensors)):
            if index == 0:
                chunk = bytes(b ^ 0x40 for b in bytes(chunk))
            yield chunk
    monkeypatch.setattr(writer, "data_chunks", chunks)


def _drop_a_planned_factor(monkeypatch):
    """The writer's tensors with one factor scaled ×2 after planning (a conversion bug)."""
    import core.formats.writer as writer

    real = writer.planned_state_dict

    def planned(*args, **kwargs):
        tensors, meta, plan = real(*args, **kwargs)
        key = next(k for k in tensors if k.endswith(".lora_up.weight"))
        tensors[key] = tensors[key] * 2
        return tensors, meta, plan
    monkeypatch.setattr(writer, "planned_state_dict", planned)


@pytest.mark.parametrize("corrupt", [_corrupt_one_chunk, _drop_a_planned_factor], ids=["bytes", "factor"])
def test_a_file_that_does_not_read_back_as_meant_is_never_published(tmp_path, monkeypatch, corrupt):
    path, _ = _unknown_file(tmp_path)
    lora = read_lora(path)
    folder = tmp_path / "out"
    folder.mkdir()
    corrupt(monkeypatch)
    with pytest.raises(LoraError, match="does not read back as meant"):
        write_lora(lora, folder / "x.safetensors", convention="keep")
    assert os.listdir(folder) == []  # no file, no temp


@pytest.mark.parametrize("name", ["flux_peft_r4.safetensors", "sd15_kohya_locon_r4a2_c2a1.safetensors",
                                  "sd15_lycoris_loha_r4a2.safetensors"])
def test_every_known_write_still_reads_back(tmp_path, name):
    """The check accepts what it should: known LoRAs (Flux slices fused and split, LoCon convs, LoHa) cast to
    fp16, bf16 and fp32 in every format pass it, and differ from the source by rounding only."""
    source = os.path.join(os.path.dirname(__file__), "fixtures", "lora", name)
    lora = read_lora(source)
    for fmt in ("kohya", "peft", "comfy", "keep"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            out = tmp_path / f"{fmt}_{str(dtype)[6:]}.safetensors"
            write_lora(lora, out, convention=fmt, dtype=dtype)
            again = read_lora(out, arch=lora.architecture)
            ours = {n: delta_weight(layer) for n, layer in _whole(lora).items()}
            theirs = {n: delta_weight(layer) for n, layer in _whole(again).items()}
            assert ours.keys() == theirs.keys()
            worst = max(_relative(ours[n], theirs[n]) for n in ours)
            assert worst < {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype], (fmt, dtype)


def _whole(lora):
    """Each weight's layers with slices fused (formats differ in whether they name slices)."""
    from core.formats.writer import fuse_slices

    groups = {}
    for layer in lora:
        groups.setdefault(layer.name, []).append(layer)
    return {n: group[0] if group[0].offset is None else fuse_slices(n, group, lora.architecture)
            for n, group in groups.items()}


def _bias_file(tmp_path):
    """Two layers with bias diffs (lightx2v style): one strong, one whose σ are a thousandth of it."""
    tensors = {}
    for name, gain in (("diffusion_model.blocks.0.ffn.0", 1.0), ("diffusion_model.blocks.0.ffn.2", 1e-3)):
        tensors[f"{name}.lora_down.weight"] = _rand(4, 24)
        tensors[f"{name}.lora_up.weight"] = _rand(32, 4) * gain
        tensors[f"{name}.diff_b"] = _rand(32, dtype=torch.bfloat16)
    path = tmp_path / "biased.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("rescale", [1.0, 2.0])
def test_a_layer_that_keeps_nothing_keeps_its_bias_diff(tmp_path, capsys, rescale):
    """err=1 drops the weak layer's whole low-rank part (0.1 % of the energy); its .diff_b is still written,
    alone (ComfyUI applies a lone diff_b), scaled like ΔW by rescale=, and counted by size=."""
    path, tensors = _bias_file(tmp_path)
    out = tmp_path / "out"
    recipe = "err=1" + ("" if rescale == 1.0 else f",rescale={rescale:g}")
    assert main(["-", str(path), "-o", str(out), "-r", recipe, "-t", "32"]) == 0
    (written_path,) = out.glob("*.safetensors")
    written = _stored(written_path)
    weak = "diffusion_model.blocks.0.ffn.2"
    assert f"{weak}.lora_down.weight" not in written  # its low-rank part was dropped
    bias = written[f"{weak}.diff_b"]
    if rescale == 1.0:
        assert _bytes_equal(bias, tensors[f"{weak}.diff_b"])
    else:
        assert torch.equal(bias, (tensors[f"{weak}.diff_b"].float() * 2).to(torch.bfloat16))
        kept = written["lora_unet_blocks_0_ffn_0.diff_b"] if "lora_unet_blocks_0_ffn_0.diff_b" in written else \
            written["diffusion_model.blocks.0.ffn.0.diff_b"]
        assert torch.equal(kept, (tensors["diffusion_model.blocks.0.ffn.0.diff_b"].float() * 2).to(torch.bfloat16))
    assert "bias diffs are kept alone" in capsys.readouterr().out + "".join(read_lora(written_path).metadata.values())

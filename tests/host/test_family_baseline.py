"""Issue 9 baseline: what ComfyUI 0.3.64 loads for each family and trainer key style, and what the pack does with it.

For every (family, convention) of tests/host/family_loras.py, on the tiny real model of tests/host/family_models.py:
- ``test_host_loads_convention``: the host loads the file with zero "lora key not loaded" and patches exactly N
  targets (the pinned number below). These hold today and must keep holding: they prove the fixtures are real.
- ``test_host_refuses_convention``: the key styles ComfyUI itself does not load (Wan, LTX-Video and Lumina 2
  diffusers names; musubi's native HunyuanVideo MLP names), pinned as the host's own limitation.
- ``test_pack_reads_and_converts``: issue 9's "Done when" for the pack: ``inspect`` counts as many layers as the
  host patches, and ``convert`` to each output the host loads for that family writes a file that the host loads
  with zero unloaded keys, patching the same model weights with the same ΔW (relative 1e-3: a layer in the wrong
  slot or a dropped layer is off by 1.0). Cases that fail on today's code are ``xfail(strict=True)``, with today's
  numbers in the reason, so the session that fixes issue 9 flips them; cases that already pass (Chroma in every
  style, SDXL Refiner kohya -> kohya and SGM names, HunyuanVideo -> comfy) run as plain tests.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.host.family_loras import (
    CONVENTIONS,
    Convention,
    host_delta,
    host_load,
    max_relative_difference,
    patched_weights,
)

# (family, convention) -> targets the host patches (low-rank adapters + full diffs; slices of a fused weight count
# one each), measured with ComfyUI 0.3.64 on the tiny models.
HOST_PATCHES = {
    ("wan21_t2v", "musubi"): 20, ("wan21_t2v", "comfy"): 20, ("wan21_t2v", "lightx2v"): 56,
    ("wan21_i2v", "musubi"): 24, ("wan21_i2v", "comfy"): 24, ("wan21_i2v", "lightx2v"): 66,
    ("wan22_ti2v_5b", "musubi"): 20, ("wan22_ti2v_5b", "comfy"): 20,
    ("qwen_image", "musubi"): 24, ("qwen_image", "comfy"): 28, ("qwen_image", "diffusers"): 28,
    ("qwen_image", "lightning"): 28, ("qwen_image", "diffsynth"): 24,
    ("sd3", "kohya"): 69, ("sd3", "kohya_unet"): 19, ("sd3", "diffusers"): 25, ("sd3", "onetrainer"): 25,
    ("hunyuan_video", "diffusion_pipe"): 26, ("hunyuan_video", "musubi_converted"): 20,
    ("ltxv", "comfy"): 20,
    ("hidream", "simpletuner"): 94, ("hidream", "lycoris"): 94, ("hidream", "comfy"): 94,
    ("lumina2", "kohya"): 20, ("lumina2", "comfy"): 20,
    ("chroma", "kohya"): 20, ("chroma", "kohya_t5"): 34, ("chroma", "comfy"): 20, ("chroma", "diffusers"): 34,
    ("sdxl_refiner", "kohya"): 184, ("sdxl_refiner", "sgm"): 132,
}
# (family, convention) -> (patched, unloaded keys) for the key styles the host itself refuses.
HOST_REFUSES = {
    ("wan21_t2v", "diffusers"): (0, 40), ("hunyuan_video", "musubi"): (12, 24),
    ("ltxv", "diffusers"): (0, 40), ("lumina2", "diffusers"): (0, 12),
}
# Output formats whose keys the host maps for the family (PEFT/diffusers only where ComfyUI 0.3.64 has a table).
PEFT_FAMILIES = {"qwen_image", "sd3", "chroma", "hidream", "hunyuan_video"}  # HunyuanVideo: diffusion-pipe names

# Cases that fail on the current code, with the numbers measured: inspect layer count, and per output format the
# converted file's (patched, unloaded) in the host. Empty since issue 9 deliverable 4 (core/naming/families/); a
# new convention that the pack gets wrong goes here (and out of HELD) with its numbers.
TODAY: dict[tuple[str, str], str] = {}
# (family, convention, format) that pass on today's code: what held, keep it so.
HELD = {("chroma", c, f) for c in ("kohya", "comfy", "diffusers") for f in ("kohya", "comfy", "peft")} | {
    ("sdxl_refiner", "kohya", "kohya"), ("sdxl_refiner", "sgm", "kohya"), ("sdxl_refiner", "sgm", "comfy"),
    ("hunyuan_video", "diffusion_pipe", "comfy"), ("hunyuan_video", "musubi_converted", "comfy")}

# Flipped by issue 9 deliverables 1-2 (open names: layers no table knows keep their names; ComfyUI-style
# diffusion_model.X is written in kohya format by the host's generic lora_unet_ rule; extras carried byte-exact).
HELD |= {(f, c, fmt) for f in ("wan21_t2v", "wan21_i2v", "wan22_ti2v_5b") for c, fmts in
         (("musubi", ("kohya",)), ("comfy", ("kohya", "comfy")), ("lightx2v", ("kohya", "comfy"))) for fmt in fmts
         if (f, c) in {(c2.family, c2.name) for c2 in CONVENTIONS}} | {
    ("hidream", "comfy", "kohya"), ("hidream", "comfy", "comfy"), ("hidream", "simpletuner", "peft"),
    ("lumina2", "comfy", "kohya"), ("lumina2", "comfy", "comfy"), ("lumina2", "kohya", "kohya"),
    ("qwen_image", "diffusers", "peft"), ("sd3", "diffusers", "peft"), ("sd3", "kohya", "kohya"),
    ("sd3", "kohya_unet", "kohya")}

LOADED = [c for c in CONVENTIONS if c.host_loads]
REFUSED = [c for c in CONVENTIONS if not c.host_loads]


def _formats(c: Convention) -> list[str]:
    return ["kohya", "comfy"] + (["peft"] if c.family in PEFT_FAMILIES else [])


# Flipped by issue 9 deliverable 4 (one naming module per family): Wan musubi -> comfy; Qwen-Image, SD3,
# HiDream in every style and format; HunyuanVideo -> kohya; LTX-Video; Lumina 2 kohya -> comfy; SDXL Refiner
# kohya -> comfy. That is every case left.
HELD |= {(c.family, c.name, fmt) for c in LOADED for fmt in _formats(c)}


def _id(c: Convention) -> str:
    return f"{c.family}-{c.name}"


def _pack_cases():
    for c in LOADED:
        for fmt in _formats(c):
            marks = []
            if (c.family, c.name, fmt) not in HELD:
                marks = [pytest.mark.xfail(strict=True, reason=f"issue 9, today: {TODAY[(c.family, c.name)]}")]
            yield pytest.param(c, fmt, id=f"{_id(c)}-to-{fmt}", marks=marks)


@pytest.fixture(scope="module")
def lora_files(comfy_hosts, tmp_path_factory):
    """Each convention's LoRA written once as a .safetensors file (seed 0), with its tiny host model."""
    from tests.host.family_models import FAMILY_BUILDERS

    folder = tmp_path_factory.mktemp("family_loras")
    files = {}
    for c in CONVENTIONS:
        host = FAMILY_BUILDERS[c.family]()
        state = c.write(host, 0)
        path = folder / f"{c.family}_{c.name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[(c.family, c.name)] = (host, path, state)
    return files


def test_every_loaded_case_is_pinned():
    """The tables above cover every convention exactly once (a new convention needs its numbers measured)."""
    assert set(HOST_PATCHES) == {(c.family, c.name) for c in LOADED}
    assert set(HOST_REFUSES) == {(c.family, c.name) for c in REFUSED}
    assert set(TODAY) == {(c.family, c.name) for c in LOADED
                          if any((c.family, c.name, f) not in HELD for f in _formats(c))}


@pytest.mark.parametrize("conv", LOADED, ids=_id)
def test_host_loads_convention(lora_files, conv):
    host, path, state = lora_files[(conv.family, conv.name)]
    assert conv.example in state, f"{conv.trainer} writes keys like {conv.example}"
    load = host_load(host, path)
    assert load.unloaded == []
    assert len(load.patches) == HOST_PATCHES[(conv.family, conv.name)]
    assert load.lowrank > 0


@pytest.mark.parametrize("conv", REFUSED, ids=_id)
def test_host_refuses_convention(lora_files, conv):
    host, path, state = lora_files[(conv.family, conv.name)]
    assert conv.example in state
    load = host_load(host, path)
    patched, unloaded = HOST_REFUSES[(conv.family, conv.name)]
    assert (len(load.patches), len(load.unloaded)) == (patched, unloaded)
    if conv.name == "musubi":  # exactly musubi's MLP names (fc1/fc2 where ComfyUI has 0/2); attention loads
        assert all("_mlp_fc" in key for key in load.unloaded)
    else:
        assert sorted(load.unloaded) == sorted(state)


def _inspect_layers(path, capsys) -> int:
    from core.cli import main

    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["layer_count"]


@pytest.mark.parametrize("conv, fmt", list(_pack_cases()))
def test_pack_reads_and_converts(lora_files, conv, fmt, tmp_path, capsys):
    from core.cli import main

    host, path, _ = lora_files[(conv.family, conv.name)]
    source = host_load(host, path)
    assert _inspect_layers(path, capsys) == len(source.patches)
    out = tmp_path / f"converted_{fmt}.safetensors"
    assert main(["convert", str(path), "-o", str(out), "-f", fmt]) == 0
    assert os.path.isfile(out)
    converted = host_load(host, out)
    assert converted.unloaded == []
    assert patched_weights(converted) == patched_weights(source)
    assert max_relative_difference(host_delta(host, source), host_delta(host, converted)) < 1e-3


# Styles the host refuses whose layers the pack places anyway (issue 9 deliverable 4): the sibling style the host
# loads, written from the same seed over the same modules, gives the ΔW the converted file must apply.
SIBLING = {("wan21_t2v", "diffusers"): "comfy", ("ltxv", "diffusers"): "comfy"}


def _lumina_qkv_delta(state: dict) -> dict:
    """ΔW of Lumina 2 diffusers' split q/k/v, stacked as ComfyUI's fused attention.qkv (q rows, then k, then v)."""
    deltas = {}
    for block in sorted({k.split(".")[2] for k in state}):
        rows = [state[f"transformer.layers.{block}.attn.{p}.lora_B.weight"].float()
                @ state[f"transformer.layers.{block}.attn.{p}.lora_A.weight"].float() for p in ("to_q", "to_k", "to_v")]
        deltas[f"diffusion_model.layers.{block}.attention.qkv.weight"] = torch.cat(rows)
    return deltas


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
@pytest.mark.parametrize("conv", REFUSED, ids=_id)
def test_pack_converts_what_the_host_refuses(lora_files, conv, fmt, tmp_path, capsys):
    """Every layer of a style ComfyUI 0.3.64 cannot load is read, and the converted file loads with zero unloaded
    keys, applying the ΔW the trainer's names mean."""
    from core.cli import main

    host, path, state = lora_files[(conv.family, conv.name)]
    groups = {key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key}
    assert _inspect_layers(path, capsys) == len(groups)
    out = tmp_path / f"converted_{fmt}.safetensors"
    assert main(["convert", str(path), "-o", str(out), "-f", fmt]) == 0
    converted = host_load(host, out)
    assert converted.unloaded == []
    delta = host_delta(host, converted)
    if (conv.family, conv.name) in SIBLING:
        _, sibling_path, _ = lora_files[(conv.family, SIBLING[(conv.family, conv.name)])]
        sibling = host_load(host, sibling_path)
        assert patched_weights(converted) == patched_weights(sibling)
        assert max_relative_difference(host_delta(host, sibling), delta) < 1e-3
    elif conv.family == "lumina2":
        expected = _lumina_qkv_delta(state)
        assert patched_weights(converted) == set(expected)
        assert max_relative_difference(expected, delta) < 1e-3
    else:  # HunyuanVideo musubi: the host loads its attention keys itself and leaves the MLP's fc1/fc2
        source = host_load(host, path)
        expected = host_delta(host, source)
        for key in source.unloaded:
            m = re.fullmatch(r"lora_unet_double_blocks_(\d+)_(img|txt)_mlp_fc([12])\.lora_up\.weight", key)
            if m:
                prefix = key[: -len(".lora_up.weight")]
                scale = float(state[f"{prefix}.alpha"]) / state[f"{prefix}.lora_down.weight"].shape[0]
                weight = f"diffusion_model.double_blocks.{m[1]}.{m[2]}_mlp.{0 if m[3] == '1' else 2}.weight"
                expected[weight] = state[key].float() @ state[f"{prefix}.lora_down.weight"].float() * scale
        assert len(expected) == len(source.patches) + len(source.unloaded) // 3
        assert patched_weights(converted) == set(expected)
        assert max_relative_difference(expected, delta) < 1e-3


@pytest.mark.parametrize("conv", LOADED, ids=_id)
def test_keep_all_resize_without_a_base_loads_in_the_host(lora_files, conv, tmp_path):
    """``resize - LORA -r rank=4`` (every rank kept, written in fp32) gives a kohya file the host loads with zero
    unloaded keys, patching the same weights with the source's ΔW (each layer re-factored by its SVD)."""
    import glob

    from core.cli import main

    host, path, _ = lora_files[(conv.family, conv.name)]
    source = host_load(host, path)
    out = tmp_path / "out"
    assert main(["resize", "-", str(path), "-o", str(out), "-r", "rank=4", "-t", "32"]) == 0
    (written,) = glob.glob(str(out / "*.safetensors"))
    resized = host_load(host, written)
    assert resized.unloaded == []
    assert patched_weights(resized) == patched_weights(source)
    assert max_relative_difference(host_delta(host, source), host_delta(host, resized)) < 1e-5


@pytest.fixture(scope="module")
def base_files(lora_files, tmp_path_factory):
    """Each tiny model saved as a ComfyUI single file (``model.diffusion_model.`` + ``text_encoders.``) and as a
    bare diffusion-model file (UNETLoader's kind: the model's own keys, no encoders)."""
    from tests.host.family_models import host_state

    folder = tmp_path_factory.mktemp("family_bases")
    files = {}
    for family in {c.family for c in LOADED}:
        host = lora_files[next((c.family, c.name) for c in LOADED if c.family == family)][0]
        state = {k: v.contiguous() for k, v in host_state(host).items() if v.is_floating_point()}
        single = {(f"model.{k}" if k.startswith("diffusion_model.") else f"text_encoders.{k}"): v
                  for k, v in state.items()}
        bare = {k[len("diffusion_model."):]: v for k, v in state.items() if k.startswith("diffusion_model.")}
        for layout, tensors in (("single", single), ("bare", bare)):
            files[(family, layout)] = folder / f"{family}_{layout}.safetensors"
            save_file(tensors, str(files[(family, layout)]))
    return files


def _base_cases():
    for c in LOADED:
        yield pytest.param(c, "single", id=f"{_id(c)}-single")
        encoders = (("sd3", "kohya"), ("sdxl_refiner", "kohya"), ("chroma", "kohya_t5"))  # not in a bare file
        if (c.family, c.name) not in encoders:
            yield pytest.param(c, "bare", id=f"{_id(c)}-bare")


@pytest.mark.parametrize("conv, layout", list(_base_cases()))
def test_base_aware_resize_matches_every_layer_to_the_base(lora_files, base_files, conv, layout, tmp_path):
    """``resize BASE LORA -r fro_ckpt=1,thr=-10``: every layer is matched to its weight in the family's ComfyUI
    single file or bare diffusion-model file (a layer without one is an error, exit 1), and the file loads in the
    host like its source."""
    import glob

    from core.cli import main

    host, path, _ = lora_files[(conv.family, conv.name)]
    out = tmp_path / "out"
    base = base_files[(conv.family, layout)]
    assert main(["resize", str(base), str(path), "-o", str(out), "-r", "fro_ckpt=1,thr=-10",
                 "-t", "32"]) == 0
    (written,) = glob.glob(str(out / "*.safetensors"))
    source, resized = host_load(host, path), host_load(host, written)
    assert resized.unloaded == []
    assert patched_weights(resized) == patched_weights(source)
    assert max_relative_difference(host_delta(host, source), host_delta(host, resized)) < 1e-5


# ComfyUI's HunyuanVideo names -> Tencent's release names (what ComfyUI's process_unet_state_dict renames back)
TENCENT = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
           (".modulation.lin.", ".modulation.linear."), ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."),
           ("time_in.in_layer.", "time_in.mlp.0."), ("time_in.out_layer.", "time_in.mlp.2."),
           ("guidance_in.in_layer.", "guidance_in.mlp.0."), ("guidance_in.out_layer.", "guidance_in.mlp.2."),
           ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."),
           ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
           ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
           ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
           ("_attn.norm.query_norm.scale", "_attn_q_norm.weight"), ("_attn.norm.key_norm.scale", "_attn_k_norm.weight"),
           (".norm.query_norm.scale", ".q_norm.weight"), (".norm.key_norm.scale", ".k_norm.weight"))


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_tencent_named_hunyuan_base_reads_as_comfyui_names_it(lora_files, base_files, prefix, tmp_path):
    """A HunyuanVideo base in Tencent's release names (bare, as UNETLoader takes it, or under the single-file
    prefix) gives the same weights under the same names as ComfyUI's, and the same resize of a diffusion-pipe LoRA."""
    import glob

    from safetensors import safe_open

    from core.base import open_base
    from core.cli import main
    from core.naming import family

    comfy_file = base_files[("hunyuan_video", "bare")]
    tencent = {}
    with safe_open(str(comfy_file), "pt") as fh:
        for key in fh.keys():
            name = key
            for comfy, original in TENCENT:
                name = name.replace(comfy, original)
            assert family("hunyuan_video").base_key(name) == key  # the host's renames undo these
            tencent[prefix + name] = fh.get_tensor(key)
    renamed = sum(1 for key in tencent if "_attn_qkv." in key or "mlp.fc1." in key or "linear_1." in key)
    assert renamed >= 10
    tencent_file = tmp_path / "hunyuan_video_720_tencent_names.safetensors"
    save_file(tencent, str(tencent_file))
    ours, theirs = open_base(str(tencent_file)), open_base(str(comfy_file))
    assert ours.names() == theirs.names()
    for name in theirs.names():
        assert torch.equal(ours.weight(name), theirs.weight(name)), name

    _, lora, _ = lora_files[("hunyuan_video", "diffusion_pipe")]
    outputs = []
    for base in (comfy_file, tencent_file):
        out = tmp_path / base.stem
        assert main(["resize", str(base), str(lora), "-o", str(out), "-r", "fro_ckpt=1,thr=-2.5", "-t", "32"]) == 0
        (written,) = glob.glob(str(out / "*.safetensors"))
        with safe_open(written, "pt") as fh:
            outputs.append({key: fh.get_tensor(key) for key in fh.keys()})
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


# test-model family -> the naming family detection must pick from the trainer's key names alone. Chroma's block
# names are Flux's (ComfyUI's Chroma is a Flux model): without distilled_guidance_layer keys, metadata or T5 under
# lora_te1_ (which only a model without CLIP-L maps) it reads as Flux, whose tables write the same names.
DETECTED = {"wan21_t2v": "wan", "wan21_i2v": "wan", "wan22_ti2v_5b": "wan", "qwen_image": "qwen_image", "sd3": "sd3",
            "hunyuan_video": "hunyuan_video", "ltxv": "ltxv", "hidream": "hidream", "lumina2": "lumina2",
            "chroma": "flux", "sdxl_refiner": "sdxl_refiner", ("chroma", "kohya_t5"): "chroma"}


@pytest.mark.parametrize("conv", CONVENTIONS, ids=_id)
def test_family_detected_from_the_trainers_names(lora_files, conv):
    from core.formats.reader import read_lora

    _, path, _ = lora_files[(conv.family, conv.name)]
    lora = read_lora(path)
    assert lora.architecture == DETECTED.get((conv.family, conv.name), DETECTED[conv.family])
    assert not [layer.source_key for layer in lora if layer.verbatim]  # every layer named by the family's table

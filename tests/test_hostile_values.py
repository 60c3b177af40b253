"""Values checked where they are made (issue 12, deliverable 3): 34 hostile values, none written or printed.

Today a NaN or an overflow went straight into the file with exit 0 ("relative error nan%", or a
plausible 0.00%). Each case here goes through the CLI (``core.cli.main``: exit code, the message
names the file or layer and the fix, no traceback, the output folder stays empty) where a command
line can carry it, and through the core API where only a node or a caller can (Recipe objects built
directly, in-memory layers, merges, StateDictBase). The engine checks on its own, whatever the
recipe parser lets through.

Cases (34):
- base weights, CLI (4): NaN under fro_ckpt, Inf under subspace, NaN under spn_ckpt, -Inf under fro_ckpt
- base weights, API (5): the NaN layer is never cached while the sound ones are; a NaN that an older
  version cached is recomputed, not trusted; a diffusers folder names the file and the q/k/v key that
  holds the NaN; a StateDictBase (the nodes' MODEL) names its label and layer; subspace overlaps of a
  weight whose cached norms looked sound
- output dtype, CLI (4): alpha 3e38 at -t 16 refused (suggests bf16/fp32); at -t 32 and -t bf16 it
  works, ΔW right and no "nan" printed; a merge weight of 1e12 at -t 16 refused
- output dtype, API (5): rescale=1e30 at fp16; a merge with weight 1e7 written at fp16 (works at fp32);
  3.4e38 at bf16 (suggests fp32 only); rescale=1e30 through the CLI is refused (parser or engine); a factor
  that underflows to all zeros at fp16 is written with a warning naming it
- recipe numbers at the engine (12): rescale nan / inf / 0, sv_ratio nan, sv_fro nan, sv_cumulative nan,
  thr nan, size nan, size inf, a NaN method weight, niter 10⁹, sparse nan: refused by resize() before any
  decomposition and by apply_recipe() (the node's path)
- LoRA values (4): NaN in an in-memory factor, singular values overflowing fp32, NaN DoRA magnitude and
  Inf bias diff at the writer
"""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.base import StateDictBase, open_base
from core.cli import main
from core.decompose import decompose
from core.delta import delta_weight
from core.errors import LoraError
from core.formats import read_lora, write_lora
from core.merge import merge
from core.model import LoraFile
from core.norms import cache_id, frobenius_norm, reference_norms
from core.norms_cache import CACHE_NAME, NormCache
from core.recipe import Recipe
from core.resize import apply_recipe, reference_table, resize
from tests.conftest import FIXTURES
from tests.helpers import lora_layer

BASE = os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors")
LORA = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
POKED_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
POKED_NAME = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"  # its canonical name
BIG_ALPHA_KEY = "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"


def _poked_base(folder, value: float) -> str:
    """A copy of the tiny base with one value of one layer replaced (as a corrupt download would)."""
    tensors = load_file(BASE)
    weight = tensors[POKED_KEY].clone()
    weight[3, 5] = value
    tensors[POKED_KEY] = weight
    path = os.path.join(folder, "base.safetensors")
    save_file(tensors, path)
    return path


def _big_alpha_lora(folder) -> str:
    """The README's LoRA with one alpha of 3e38: fine in fp32, far beyond fp16."""
    tensors = load_file(LORA)
    tensors[BIG_ALPHA_KEY] = torch.tensor(3e38, dtype=torch.float32)
    path = os.path.join(folder, "big.safetensors")
    save_file(tensors, path)
    return path


def _cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def _out(tmp_path) -> str:
    folder = tmp_path / "out"
    folder.mkdir()
    return str(folder)


# --- base weights ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, recipe", [(float("nan"), "fro_ckpt=1,thr=-2.6"), (float("inf"), "subspace=1,thr=-1"),
                                           (float("nan"), "spn_ckpt=1,thr=-2"), (float("-inf"), "fro_ckpt=1,thr=-3.5")])
def test_cli_refuses_a_base_with_non_finite_weights_naming_file_and_layer(tmp_path, capsys, value, recipe):
    base = _poked_base(str(tmp_path), value)
    out = _out(tmp_path)
    code, stdout, err = _cli([base, LORA, "-o", out, "-r", recipe], capsys)
    assert code == 1
    assert base in err and POKED_KEY in err and "row 3, column 5" in err and "re-download" in err
    assert ("1 NaN" if math.isnan(value) else "1 Inf") in err
    assert os.listdir(out) == [] and "relative error" not in stdout
    cache = tmp_path / CACHE_NAME
    if cache.exists():  # whatever was cached is finite and never the corrupt layer
        text = cache.read_text()
        assert "NaN" not in text and "Infinity" not in text and POKED_NAME not in text


def test_a_non_finite_base_layer_is_never_cached_and_the_sound_ones_are(tmp_path):
    path = _poked_base(str(tmp_path), float("nan"))
    base = open_base(path)
    others = sorted(base.names() - {POKED_NAME})[:5]
    targets = [(name, None) for name in [others[0], POKED_NAME, *others[1:]]]
    cache = NormCache.for_checkpoint(path)
    with pytest.raises(LoraError, match="holds 1 NaN") as info:
        reference_norms(base, targets, cache=cache)
    assert info.value.file == path and info.value.layer == POKED_KEY
    assert cache.get(cache_id(base), POKED_NAME) is None
    cache.save()
    stored = json.loads((tmp_path / CACHE_NAME).read_text())[cache_id(base)]
    assert POKED_NAME not in stored and sorted(stored) == sorted(others)
    assert all(math.isfinite(v) for values in stored.values() for v in values.values())


def test_a_nan_that_an_older_version_cached_is_recomputed_not_trusted(tmp_path):
    path = str(tmp_path / "base.safetensors")
    shutil.copy(BASE, path)
    base = open_base(path)
    (tmp_path / CACHE_NAME).write_text(json.dumps({cache_id(base): {POKED_NAME: {"frobenius": float("nan"),
                                                                                 "spectral": float("nan")}}}))
    norms = reference_norms(base, [(POKED_NAME, None)], cache=NormCache.for_checkpoint(path))[(POKED_NAME, None)]
    expected = frobenius_norm(load_file(BASE)[POKED_KEY])
    assert abs(norms["frobenius"] - expected) <= 1e-6 * expected and math.isfinite(norms["spectral"])


def test_a_diffusers_folder_names_the_file_and_the_qkv_piece_holding_the_nan(tmp_path):
    (tmp_path / "transformer").mkdir()
    k = torch.full((4, 4), 2.0)
    k[2, 1] = float("nan")
    file = str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.ones(4, 4), "transformer_blocks.0.attn.to_k.weight": k,
               "transformer_blocks.0.attn.to_v.weight": torch.ones(4, 4)}, file)
    base = open_base(str(tmp_path))
    with pytest.raises(LoraError) as info:
        reference_norms(base, [("diffusion_model.double_blocks.0.img_attn.qkv", None)])
    assert info.value.file == file and info.value.layer == "transformer_blocks.0.attn.to_k.weight"
    assert "row 2, column 1" in str(info.value) and "corrupt" in str(info.value)


def test_a_loaded_model_with_inf_names_its_label_and_layer():
    weight = torch.randn(16, 8)
    weight[9, 0] = float("inf")
    base = StateDictBase({"diffusion_model.out.2": weight}, fingerprint="f", label="<loaded model>")
    with pytest.raises(LoraError) as info:
        reference_norms(base, [("diffusion_model.out.2", (0, 8, 8))], kinds=("spectral",))
    assert info.value.file == "<loaded model>" and info.value.layer == "diffusion_model.out.2"
    assert "1 Inf" in str(info.value) and "row 9, column 0" in str(info.value)


def test_subspace_overlaps_of_a_weight_whose_cached_norms_looked_sound_are_refused(tmp_path):
    """A loaded model's fingerprint samples values: a NaN it missed meets norms cached from the sound model."""
    lora = read_lora(LORA)
    weights = {POKED_NAME: load_file(BASE)[POKED_KEY].float()}
    items = [item for item in decompose(lora) if item.layer.name == POKED_NAME]
    sound = StateDictBase(dict(weights), fingerprint="same")
    cache = NormCache(str(tmp_path / CACHE_NAME))
    reference_norms(sound, [(POKED_NAME, None)], kinds=("frobenius",), cache=cache)
    weights[POKED_NAME] = weights[POKED_NAME].clone()
    weights[POKED_NAME][0, 0] = float("nan")
    recipe = Recipe(text="subspace=1,thr=-1", weights={"subspace": 1.0}, threshold=-1.0)
    with pytest.raises(LoraError, match="NaN") as info:
        reference_table(items, [recipe], StateDictBase(weights, fingerprint="same"), cache=cache)
    assert info.value.layer == POKED_NAME


# --- output dtype: overflow refused before any file is opened --------------------------------------------------

def test_alpha_3e38_at_fp16_is_refused_suggesting_bf16_or_fp32(tmp_path, capsys):
    lora = _big_alpha_lora(str(tmp_path))
    out = _out(tmp_path)
    code, stdout, err = _cli(["-", lora, "-o", out, "-r", "rank=4", "-t", "16"], capsys)
    assert code == 1
    assert "float16" in err and "-t bf16" in err and "-t 32" in err and POKED_NAME in err
    assert os.listdir(out) == [] and "nan" not in stdout.lower()


@pytest.mark.parametrize("dtype, rtol", [("32", 1e-5), ("bf16", 2e-2)])
def test_alpha_3e38_at_wider_precision_works_the_delta_and_the_reported_error_are_right(tmp_path, capsys, dtype,
                                                                                        rtol):
    lora = _big_alpha_lora(str(tmp_path))
    out = _out(tmp_path)
    code, stdout, err = _cli(["-", lora, "-o", out, "-r", "rank=4:rank=2", "-t", dtype], capsys)
    assert code == 0, err
    source = read_lora(lora)
    key = next(k for k in source.layers if source.layers[k].name == POKED_NAME)
    expected = delta_weight(source.layers[key]).double()
    written = read_lora(os.path.join(out, "big_rank4.safetensors"))  # rank=4 keeps every direction
    got = delta_weight(written.layers[key]).double()
    assert float(expected.abs().max()) > 1e30  # the huge layer really is in the output
    assert float((got - expected).norm() / expected.norm()) < rtol
    # rank=2: the huge layer outweighs all others, so the error is its own truncation error (today: "nan%")
    sigma = torch.linalg.svdvals(expected.flatten(1))
    truncation = 100 * float((sigma[2:].pow(2).sum() / sigma.pow(2).sum()).sqrt())
    line = next(line for line in stdout.splitlines() if "big_rank2.safetensors" in line)
    printed = line.rsplit("relative error ", 1)[1].rstrip("%")
    assert "nan" not in stdout.lower() and abs(float(printed) - truncation) < 0.01, line


def test_a_merge_weight_of_1e12_at_fp16_is_refused(tmp_path, capsys):
    out = _out(tmp_path)
    code, stdout, err = _cli(["-", f"{LORA}:1e12", "-o", out, "-r", "rank=2", "-t", "16"], capsys)
    assert code == 1 and "float16" in err and "bf16" in err
    assert os.listdir(out) == []


def test_rescale_1e30_past_the_parser_is_refused_by_the_engine_before_any_write(tmp_path):
    """The engine checks a recipe's numbers against the parser's own ranges (one table, core/recipe.py);
    overflows that stay within them (alpha 3e38, merge weights) are the fp16 checks above."""
    recipe = Recipe(text="rank=2,rescale=1e30", rank=2, rescale=1e30)  # past any parser
    with pytest.raises(LoraError, match="rescale=") as info:
        list(resize(read_lora(LORA), [recipe], dtype=torch.float16))
    assert "10⁴" in str(info.value) or "10000" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_rescale_1e30_on_the_command_line_writes_nothing(tmp_path, capsys):
    out = _out(tmp_path)
    code, _, err = _cli(["-", LORA, "-o", out, "-r", "rank=2,rescale=1e30"], capsys)
    assert code in (1, 2) and ("rescale" in err or "float16" in err)
    assert os.listdir(out) == []


def test_a_merge_with_weight_1e7_written_at_fp16_is_refused_and_works_at_fp32(tmp_path):
    merged = merge([(read_lora(LORA), 1e7)])  # a node's merge saved unresized: 1e7 · 0.09 · alpha/rank 0.5
    target = tmp_path / "merged.safetensors"
    with pytest.raises(LoraError, match="float16") as info:
        write_lora(merged, target, dtype=torch.float16)
    assert info.value.file == str(target) and info.value.layer
    assert os.listdir(tmp_path) == []
    write_lora(merged, target, dtype=torch.float32)
    back = read_lora(target)
    key = next(iter(merged.layers))
    assert torch.allclose(delta_weight(back.layers[key]), delta_weight(merged.layers[key]), rtol=1e-5)


def test_values_beyond_bf16_suggest_fp32_only(tmp_path):
    layer = lora_layer("diffusion_model.out.2", 8, 8, 2)
    layer.factors["up"][0, 0] = 3.4e38  # finite in fp32, Inf in bf16 (largest 3.39e38)
    with pytest.raises(LoraError, match="bfloat16") as info:
        write_lora(LoraFile({"x": layer}, "sdxl", "kohya"), tmp_path / "x.safetensors", dtype=torch.bfloat16)
    assert "-t 32" in info.value.fix and "-t bf16" not in info.value.fix
    assert os.listdir(tmp_path) == []


# --- recipe numbers: the engine's own check ---------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_RECIPES = [
    ("rescale", Recipe(text="rank=2,rescale=nan", rank=2, rescale=NAN)),
    ("rescale", Recipe(text="rank=2,rescale=inf", rank=2, rescale=INF)),
    ("rescale", Recipe(text="rank=2,rescale=0", rank=2, rescale=0.0)),
    ("sv_ratio", Recipe(text="sv_ratio=nan", sv_ratio=NAN)),
    ("sv_fro", Recipe(text="sv_fro=nan", sv_fro=NAN)),
    ("sv_cumulative", Recipe(text="sv_cumulative=nan", sv_cumulative=NAN)),
    ("thr", Recipe(text="spn_lora=1,thr=nan", weights={"spn_lora": 1.0}, threshold=NAN)),
    ("size", Recipe(text="spn_lora=1,size=nan", weights={"spn_lora": 1.0}, size_mib=NAN)),
    ("size", Recipe(text="spn_lora=1,size=inf", weights={"spn_lora": 1.0}, size_mib=INF)),
    ("spn_lora", Recipe(text="spn_lora=nan,thr=-1", weights={"spn_lora": NAN}, threshold=-1.0)),
    ("niter", Recipe(text="rank=2,method=rsvd,niter=1000000000", rank=2, method="rsvd", niter=10**9)),
    ("sparse", Recipe(text="rank=2,method=randproj,sparse=nan", rank=2, method="randproj", sparse=NAN)),
]


@pytest.mark.parametrize("key, recipe", BAD_RECIPES, ids=[r.text for _, r in BAD_RECIPES])
def test_the_engine_refuses_bad_recipe_numbers_before_any_work(monkeypatch, key, recipe):
    import core.resize as engine

    lora = read_lora(LORA)
    items = decompose(lora)
    monkeypatch.setattr(engine, "decompose", lambda *a, **k: pytest.fail("decomposed before checking the recipe"))
    with pytest.raises(LoraError, match=rf"{key}=") as info:
        list(resize(lora, [recipe]))
    assert recipe.text in str(info.value) and info.value.fix
    with pytest.raises(LoraError, match=rf"{key}="):  # the node's path: apply_recipe on a cached decomposition
        apply_recipe(items, recipe, {}, template=lora)


# --- LoRA values -------------------------------------------------------------------------------------------------

def test_a_nan_in_an_in_memory_factor_is_refused_by_name():
    layer = lora_layer("diffusion_model.input_blocks.1.1.proj_in", 32, 32, 4)
    layer.factors["down"][1, 7] = float("nan")
    with pytest.raises(LoraError, match="down factor holds NaN") as info:
        decompose(LoraFile({"a": layer}, "sdxl", "kohya"))
    assert info.value.layer == "diffusion_model.input_blocks.1.1.proj_in"


def test_singular_values_overflowing_fp32_are_refused_by_name():
    layer = lora_layer("diffusion_model.out.2", 32, 32, 1, alpha=3e38)
    layer.factors["up"].mul_(1e3)  # σ = 3e38 · ‖up‖·‖down‖ > fp32's 3.4e38, every factor finite
    with pytest.raises(LoraError, match="overflow fp32") as info:
        decompose(LoraFile({"a": layer}, "sdxl", "kohya"))
    assert info.value.layer == "diffusion_model.out.2"


@pytest.mark.parametrize("part", ["dora_scale", "bias_diff"])
def test_the_writer_refuses_non_finite_magnitudes_and_biases(tmp_path, part):
    layer = lora_layer("diffusion_model.out.2", 8, 8, 2)
    extra = torch.ones(8, 1) if part == "dora_scale" else torch.zeros(8)
    extra[4] = float("nan") if part == "dora_scale" else float("inf")
    setattr(layer, part, extra)
    with pytest.raises(LoraError, match="NaN or Inf") as info:
        write_lora(LoraFile({"x": layer}, "sdxl", "kohya"), tmp_path / "x.safetensors", dtype=torch.float32)
    assert info.value.layer == "diffusion_model.out.2"
    assert os.listdir(tmp_path) == []


def test_a_factor_that_underflows_to_zeros_at_fp16_is_written_with_a_warning(tmp_path, caplog):
    layer = lora_layer("diffusion_model.out.2", 8, 8, 2)
    layer.factors["up"].mul_(1e-12)  # below fp16's smallest subnormal (6e-8): all zeros once cast
    write_lora(LoraFile({"x": layer}, "sdxl", "kohya"), tmp_path / "x.safetensors", dtype=torch.float16)
    assert "all zeros at float16" in caplog.text and "diffusion_model.out.2" in caplog.text
    assert float(load_file(str(tmp_path / "x.safetensors"))["lora_unet_out_2.lora_up.weight"].abs().max()) == 0

"""The node pack inside a real ComfyUI process, with a small real SDXL MODEL and CLIP.

Base norms taken from the MODEL/CLIP equal those from the same weights saved as a checkpoint; a
MODEL already patched by a LoRA still gives the unpatched norms; the node chain writes a file the
host loads with zero unloaded keys and whose ΔW equals the CLI's output for the same recipe.

Issue 12 (no server needed): 20 bad save prefixes are refused naming the rule, at queue time
(VALIDATE_INPUTS) and at save time, writing nothing; good ones (and a symlinked subfolder the user
made) land inside the loras folder; a full or read-only folder (faults injected at the write) and a
file in the way are LoraErrors naming the folder; an fp8 LoRA goes through load, resize and save;
the recipe node's rsvd and niter reach the decomposition; NaN/Inf widgets and merge weights are
refused by name; saved UI workflows keep their widgets after the new niter widget.
"""
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from tests.host.comfy_models import checkpoint_from_host, random_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_base_norms_from_model_equal_the_checkpoint_file(comfy_hosts, pack, tmp_path):
    from core.base import open_base
    from core.norms import reference_norms

    host = comfy_hosts["sdxl"]()
    ckpt = tmp_path / "sdxl_tiny.safetensors"
    checkpoint_from_host(host, ckpt)
    from_file = open_base(str(ckpt))
    from_host = pack.nodes.host.base_from_host(host.model, host.clip)
    names = sorted(from_host.names() & from_file.names())
    assert len(names) > 700
    assert any(n.startswith("clip_g.") and n.endswith("q_proj") for n in names)
    targets = [(n, None) for n in names[::5]]
    a = reference_norms(from_file, targets)
    b = reference_norms(from_host, targets)
    for target in targets:
        for kind in ("spectral", "frobenius"):
            assert abs(a[target][kind] - b[target][kind]) <= 1e-5 * a[target][kind], target


def test_a_patched_model_still_gives_unpatched_weights(comfy_hosts, pack):
    import comfy.model_management
    import comfy.sd

    host = comfy_hosts["sdxl"]()
    clean = pack.nodes.host.base_from_host(host.model, host.clip)
    lora = random_lora(host, every=3)
    model, clip = comfy.sd.load_lora_for_models(host.model, host.clip, lora, 1.0, 1.0)
    comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
    try:
        patched_key = next(iter(model.backup))  # weights really are patched in place now
        live = model.model.state_dict()[patched_key]
        assert not torch.equal(live, model.backup[patched_key].weight)
        after = pack.nodes.host.base_from_host(model, clip)
        name = patched_key[: -len(".weight")]
        assert torch.equal(after.weights[name], clean.weights[name])
        assert after.fingerprint == clean.fingerprint
    finally:
        comfy.model_management.unload_all_models()


def test_node_chain_saves_a_file_the_host_loads_and_equals_the_cli(comfy_hosts, pack, folders, tmp_path):
    import comfy.lora
    import comfy.utils
    import folder_paths

    from core.cli import main
    from core.delta import delta_weight
    from core.formats import read_lora

    loras_dir, checkpoints_dir = folders
    host = comfy_hosts["sdxl"]()
    save_file(random_lora(host, rank=8, seed=3), str(loras_dir / "mine.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, summary = nodes["LoraResize_LoadLoRAForResize"]().load("mine.safetensors")
    assert "architecture sdxl" in summary
    recipe, text = nodes["LoraResize_ScoreRecipe"]().build(1.0, 0, 0, 0, 0, 0, "thr", -2.2, 1.0, "svd", 0)
    assert text == "fro_ckpt=1,thr=-2.2"
    output = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model, clip=host.clip)
    resized, report = output["result"]
    chart = output["ui"]["lora_resize_chart"][0]
    assert sum(b["kept"] for b in chart["blocks"]) < sum(b["original"] for b in chart["blocks"])
    assert "fro_ckpt=1,thr=-2.2" in report and os.path.exists(checkpoints_dir / ".lora_resize_norms.json")
    saved = nodes["LoraResize_SaveLoRA"]().save(resized, "resized/mine", "kohya", "fp32")["result"][0]
    assert saved == str(loras_dir / "resized" / "mine_00001_.safetensors")
    assert "resized/mine_00001_.safetensors" in folder_paths.get_filename_list("loras")
    again = nodes["LoraResize_SaveLoRA"]().save(resized, "resized/mine", "kohya", "fp32")["result"][0]
    assert again.endswith("mine_00002_.safetensors")  # never overwrites

    state = comfy.utils.load_torch_file(saved, safe_load=True)
    loaded = comfy.lora.load_lora(state, host.key_map, log_missing=False)
    assert len(loaded) * 3 == len(state)  # every up/down/alpha triple became a patch

    ckpt = tmp_path / "sdxl_tiny.safetensors"
    checkpoint_from_host(host, ckpt)
    assert main([str(ckpt), str(loras_dir / "mine.safetensors"), "-o", str(tmp_path / "cli"), "-t", "32",
                 "-r", "fro_ckpt=1,thr=-2.2", "-q"]) == 0
    (cli_file,) = os.listdir(tmp_path / "cli")
    ours, cli = read_lora(saved), read_lora(tmp_path / "cli" / cli_file)
    assert ours.layers.keys() == cli.layers.keys()
    for name, layer in ours.layers.items():
        assert layer.rank == cli.layers[name].rank
        assert torch.allclose(delta_weight(layer), delta_weight(cli.layers[name]), rtol=1e-4, atol=1e-6)


def test_node_errors_name_the_problem_and_write_nothing(comfy_hosts, pack, folders):
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    with pytest.raises(Exception, match="bad token 'thr=abc'"):
        nodes["LoraResize_ScoreRecipe"]().build(1.0, 0, 0, 0, 0, 0, "thr", 0, 1.0, "svd", 0,
                                                raw_recipe="fro_ckpt,thr=abc")
    flux_lora = os.path.join(ROOT, "tests", "fixtures", "lora", "flux_kohya_r4a1.safetensors")
    (loras_dir / "flux.safetensors").write_bytes(open(flux_lora, "rb").read())
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("flux.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(1.0, 0, 0, 0, 0, 0, "thr", -3.5, 1.0, "svd", 0)
    host = comfy_hosts["sdxl"]()
    with pytest.raises(Exception, match="flux.safetensors: this LoRA is for FLUX, but the base model .* "
                                        "is SDXL") as info:
        nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model, clip=host.clip)
    assert type(info.value).__name__ == "LoraError"  # the pack's own error type, shown by ComfyUI as is
    with pytest.raises(Exception, match="no MODEL/CLIP is connected"):
        nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe)
    with pytest.raises(Exception, match="leaves the loras folder"):
        nodes["LoraResize_SaveLoRA"]().save(lora, "../outside", "kohya", "fp16")
    assert sorted(os.listdir(loras_dir)) == ["flux.safetensors"]


def test_cancel_stops_a_resize_and_leaves_no_cache_or_file(comfy_hosts, pack, folders):
    """ComfyUI's Cancel (interrupt flag) ends ResizeLoRA at its next progress step, by the host's own
    InterruptProcessingException; nothing is cached or saved, and the next run works."""
    import comfy.model_management

    loras_dir, checkpoints_dir = folders
    host = comfy_hosts["sdxl"]()
    save_file(random_lora(host, rank=8, seed=4), str(loras_dir / "cancel.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("cancel.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 1.0, 0, 0, 0, 0, "thr", -2.0, 1.0, "svd", 0)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model, clip=host.clip)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not (checkpoints_dir / ".lora_resize_norms.json").exists()
    assert sorted(p.name for p in loras_dir.rglob("*.safetensors")) == ["cancel.safetensors"]
    output = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model, clip=host.clip)
    assert output["ui"]["lora_resize_chart"][0]["blocks"]


# --- issue 12: save prefixes, fp8 through the nodes, rsvd/niter, non-finite widgets, OS errors ---------------

def _tree(root) -> list[str]:
    """Every path below ``root`` (hidden ones included): what a refused save must leave unchanged."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


_BAD_PREFIXES = [
    ("", "is empty"),
    ("   ", "is empty"),
    (".", "names no file"),
    ("./", "names no file"),
    ("..", "leaves the loras folder"),
    ("../escape", "leaves the loras folder"),
    ("a/../../b", "leaves the loras folder"),
    ("a\\..\\..\\b", "leaves the loras folder"),
    ("/tmp/abs_lora", "is an absolute path"),
    ("//", "is an absolute path"),
    ("\\\\server\\share\\x", "is an absolute path"),
    ("C:\\loras\\x", "is an absolute path"),
    ("a\x00b", "control character '\\x00'"),
    ("a\tb", "control character '\\t'"),
    ("a\nb", "control character '\\n'"),
    ("a\x7fb", "control character '\\x7f'"),
    ("x" * 300, "has a name of 300 bytes; at most 200"),
    ("sub/" + "é" * 101, "has a name of 202 bytes"),
    ("a/ /b", "only of spaces"),
    ("/".join(["d" * 199] * 25), "the OS allows"),
]


@pytest.mark.parametrize("prefix,rule", _BAD_PREFIXES, ids=[f"bad{i}" for i in range(len(_BAD_PREFIXES))])
def test_a_bad_save_prefix_is_refused_naming_the_rule_and_nothing_is_written(comfy_hosts, pack, folders, prefix,
                                                                              rule, tmp_path):
    loras_dir, _ = folders
    save = pack.NODE_CLASS_MAPPINGS["LoraResize_SaveLoRA"]
    lora, _ = pack.NODE_CLASS_MAPPINGS["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    before = _tree(tmp_path)
    with pytest.raises(Exception, match="save prefix") as info:
        save().save(lora, prefix, "kohya", "fp16")
    assert type(info.value).__name__ == "LoraError" and rule in str(info.value), str(info.value)
    assert "Fix: " in str(info.value)
    # refused when the prompt is queued too, before any node runs (ComfyUI's custom validation)
    verdict = save.VALIDATE_INPUTS(filename_prefix=prefix)
    assert verdict is not True and rule in verdict
    assert _tree(tmp_path) == before


def _copy_fixture(loras_dir, name: str = "sd15_kohya_locon_r4a2_c2a1.safetensors") -> str:
    (loras_dir / name).write_bytes(open(os.path.join(ROOT, "tests", "fixtures", "lora", name), "rb").read())
    return name


def test_good_prefixes_land_inside_the_loras_folder_and_a_user_symlinked_subfolder_is_followed(
        comfy_hosts, pack, folders, tmp_path):
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    save = nodes["LoraResize_SaveLoRA"]()
    assert nodes["LoraResize_SaveLoRA"].VALIDATE_INPUTS(filename_prefix="resized/mine") is True
    assert save.save(lora, "./plain", "kohya", "fp16")["result"][0] == str(loras_dir / "plain_00001_.safetensors")
    assert save.save(lora, "a\\b", "kohya", "fp16")["result"][0] == str(loras_dir / "a" / "b_00001_.safetensors")
    assert save.save(lora, "deep//x/", "kohya", "fp16")["result"][0] == str(loras_dir / "deep" / "x_00001_.safetensors")
    # a subfolder the user linked to another disk is followed: the path stays under the loras folder
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    os.symlink(elsewhere, loras_dir / "linked")
    saved = save.save(lora, "linked/mine", "kohya", "fp16")["result"][0]
    assert saved == str(loras_dir / "linked" / "mine_00001_.safetensors")
    assert os.listdir(elsewhere) == ["mine_00001_.safetensors"]
    # a dangling symlink at the next free name is skipped, never written through
    target = tmp_path / "outside_target"
    os.symlink(target, loras_dir / "plain_00002_.safetensors")
    assert save.save(lora, "plain", "kohya", "fp16")["result"][0].endswith("plain_00003_.safetensors")
    assert not target.exists()
    assert not any(p.suffix == ".safetensors" for p in tmp_path.iterdir())  # nothing beside the loras folder


def test_a_full_or_read_only_loras_folder_or_a_file_in_the_way_is_a_lora_error_naming_the_folder(
        comfy_hosts, pack, folders, monkeypatch):
    import errno

    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    (loras_dir / "blocked").write_text("a file where the subfolder should be")
    with pytest.raises(Exception, match="a file is in the way") as info:
        nodes["LoraResize_SaveLoRA"]().save(lora, "blocked/mine", "kohya", "fp16")
    assert type(info.value).__name__ == "LoraError" and str(loras_dir / "blocked") in str(info.value)
    # faults injected where the write meets the disk: what a full disk or a read-only mount raise
    for code, words in ((errno.ENOSPC, "is full"), (errno.EROFS, "read-only"), (errno.EACCES, "read-only")):
        def failing_write(*args, _code=code, **kwargs):
            raise OSError(_code, os.strerror(_code))

        monkeypatch.setattr(pack.nodes.save, "write_lora", failing_write)
        with pytest.raises(Exception, match=words) as info:
            nodes["LoraResize_SaveLoRA"]().save(lora, "resized/mine", "kohya", "fp16")
        assert type(info.value).__name__ == "LoraError" and str(loras_dir / "resized") in str(info.value)
        assert "Fix: " in str(info.value)


def test_an_unreadable_lora_file_is_a_lora_error_naming_it(comfy_hosts, pack, folders, monkeypatch):
    import errno

    loras_dir, _ = folders
    name = _copy_fixture(loras_dir)

    def denied(path, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(pack.nodes.load, "read_lora", denied)
    with pytest.raises(Exception, match=f"{name}: cannot read the file: Permission denied") as info:
        pack.NODE_CLASS_MAPPINGS["LoraResize_LoadLoRAForResize"]().load(name)
    assert type(info.value).__name__ == "LoraError"


def test_an_fp8_lora_goes_through_load_resize_and_save(comfy_hosts, pack, folders):
    from core.formats import read_lora

    loras_dir, _ = folders
    host = comfy_hosts["sdxl"]()
    state = random_lora(host, rank=4, seed=5)
    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v for k, v in state.items()},
              str(loras_dir / "fp8.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("fp8.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 1.0, 0, 0, 0, "rank", 2, 1.0, "svd", 0)
    output = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe)
    chart = output["ui"]["lora_resize_chart"][0]
    # sized as fp16 (SaveLoRA writes no fp8): rank 4 -> 2 halves the factors' bytes, less the header's share
    assert 0.4 < chart["size_after"] / chart["size_before"] < 0.6, chart
    saved = nodes["LoraResize_SaveLoRA"]().save(output["result"][0], "fp8/out", "kohya", "fp16")["result"][0]
    written = read_lora(saved)
    assert {layer.rank for layer in written} == {2} and len(written.layers) == len(lora.lora.layers)


def test_the_recipe_node_passes_rsvd_and_niter_and_resize_uses_them(comfy_hosts, pack, folders, monkeypatch):
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    recipe, text = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "rank", 2, 1.0, "rsvd", 0, niter=7)
    assert recipe.method == "rsvd" and recipe.niter == 7 and text == "rank=2,method=rsvd,niter=7"
    assert "niter" in nodes["LoraResize_ScoreRecipe"].INPUT_TYPES()["optional"]  # old workflows keep loading
    calls = []
    real = torch.svd_lowrank

    def spy(matrix, q=6, niter=2, M=None):
        calls.append((q, niter))
        return real(matrix, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", spy)
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir,
                                                                         "sd15_lycoris_full_diff.safetensors"))
    output = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe)
    assert calls and {niter for _, niter in calls} == {7}  # the dense (full diff) layers: randomized SVD
    assert all(layer.rank <= 2 for layer in output["result"][0].lora)
    exact, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "rank", 2, 1.0, "svd", 0)
    calls.clear()
    nodes["LoraResize_ResizeLoRA"]().resize(lora, exact)
    assert calls == []  # svd: the exact decomposition, not the randomized one cached for rsvd


@pytest.mark.parametrize("widget,index", [("value", 7), ("rescale", 8), ("fro_ckpt", 0)])
def test_a_non_finite_recipe_widget_is_refused_by_name(comfy_hosts, pack, widget, index):
    values = [1.0, 0, 0, 0, 0, 0, "thr", -3.5, 1.0, "svd", 0]
    for bad in (float("nan"), float("inf")):
        values[index] = bad
        with pytest.raises(Exception, match=f"recipe widget {widget} is {bad!r}, not a finite number") as info:
            pack.NODE_CLASS_MAPPINGS["LoraResize_ScoreRecipe"]().build(*values)
        assert type(info.value).__name__ == "LoraError"


def test_a_non_finite_merge_weight_is_refused_naming_the_widget(comfy_hosts, pack, folders):
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(Exception, match=f"weight_2 is {bad!r}, not a finite number") as info:
            nodes["LoraResize_MergeLoRAs"]().merge(lora, 0.5, lora, bad, "concat")
        assert type(info.value).__name__ == "LoraError"


def test_a_non_finite_apply_strength_is_refused_naming_it(comfy_hosts, pack, folders):
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    host = comfy_hosts["sdxl"]()
    with pytest.raises(Exception, match="strength_clip is nan, not a finite number") as info:
        nodes["LoraResize_ApplyLoRA"]().apply(host.model, host.clip, lora, 1.0, float("nan"))
    assert type(info.value).__name__ == "LoraError"


def test_saved_ui_workflows_keep_their_recipe_widgets_and_get_the_niter_default(comfy_hosts, pack):
    """widgets_values are positional: the new niter widget is optional and last, so every saved ScoreRecipe
    maps onto the same widgets as before and equals its API twin (which lists niter at its default)."""
    import json

    node = pack.NODE_CLASS_MAPPINGS["LoraResize_ScoreRecipe"]
    spec = node.INPUT_TYPES()
    widgets = [*spec["required"], *spec["optional"]]
    assert widgets[-2:] == ["niter", "pad"] and spec["optional"]["niter"][1]["default"] == 2
    assert spec["optional"]["pad"][1]["default"] == 0  # off: an API twin without it means the same recipe
    folder = os.path.join(ROOT, "example_workflows")
    checked = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name.endswith("_api.json"):
            continue
        graph = json.load(open(os.path.join(folder, name)))
        twin = json.load(open(os.path.join(folder, name.replace(".json", "_api.json"))))
        for saved in (n for n in graph["nodes"] if n["type"] == "LoraResize_ScoreRecipe"):
            values = dict(zip(widgets, saved["widgets_values"]))
            assert "niter" not in values and "pad" not in values  # saved before the widgets existed
            values.update(niter=2, pad=0)  # what the frontend fills in: the widgets' defaults
            assert values == twin[str(saved["id"])]["inputs"], name
            assert node().build(**values)[0].text  # and it still builds its recipe
            checked += 1
    assert checked >= 5


def test_the_recipe_node_offers_error_budgets_knee_and_pad(comfy_hosts, pack, folders):
    """err= keeps the fewest values within the budget (the node's report says the error), pad= gives one rank."""
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    build = nodes["LoraResize_ScoreRecipe"]().build
    recipe, text = build(1.0, 0, 0, 0, 0, 0, "err", 5, 1.0, "svd", 0)
    assert text == "fro_ckpt=1,err=5" and recipe.budget == ("err", 5.0)
    assert build(0, 0, 0, 0, 0, 0, "sv_knee", 1, 1.0, "svd", 0)[1] == "sv_knee=1"
    padded, text = build(0, 0, 0, 0, 0, 0, "err", 20, 1.0, "svd", 0, pad=8)
    assert text == "err=20,pad=8"
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    output = nodes["LoraResize_ResizeLoRA"]().resize(lora, padded)
    result = output["result"][0]
    assert {layer.rank for layer in result.lora} == {8}
    plain = nodes["LoraResize_ResizeLoRA"]().resize(lora, build(0, 0, 0, 0, 0, 0, "err", 20, 1.0, "svd", 0)[0])
    kept = {layer.name: layer for layer in plain["result"][0].lora}
    assert len(kept) == len(result.lora.layers)
    assert sum(layer.rank for layer in kept.values()) < 8 * len(kept)
    from core.delta import delta_weight
    for layer in result.lora:
        reference = delta_weight(kept[layer.name]).double()
        assert float((delta_weight(layer).double() - reference).norm() / reference.norm()) <= 1e-6


def test_sweep_targets_parse_and_bad_ones_are_refused_by_name(comfy_hosts, pack):
    sweep = pack.nodes.sweep
    parsed = sweep.parse_targets("keep, 0.5MiB; 2%\nrank=4, err=7, sv_knee=1", "fro_ckpt=1")
    assert [(token, recipe.text) for token, recipe in parsed] == [
        ("keep", "err=0"), ("0.5MiB", "fro_ckpt=1,size=0.5"), ("2%", "fro_ckpt=1,err=2"), ("rank=4", "rank=4"),
        ("err=7", "fro_ckpt=1,err=7"), ("sv_knee=1", "sv_knee=1")]
    for bad, words in (("", "no targets"), ("5%, 5%", "repeat: 5%"), ("150%", "'150%'"), ("big", "'big'")):
        with pytest.raises(Exception, match=words) as info:
            sweep.parse_targets(bad, "fro_ckpt=1")
        assert type(info.value).__name__ == "LoraError"


def test_sweep_decomposes_once_and_gives_one_lora_per_target(comfy_hosts, pack, folders, monkeypatch):
    loras_dir, _ = folders
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load(_copy_fixture(loras_dir))
    calls = []
    real = pack.nodes.lora_type.decompose
    monkeypatch.setattr(pack.nodes.lora_type, "decompose", lambda *a, **k: calls.append(1) or real(*a, **k))
    output = nodes["LoraResize_ResizeLoRASweep"]().sweep(lora, "keep, 5%, 30%, rank=1", "spn_lora=1")
    loras, labels, report = output["result"]
    assert len(calls) == 1 and len(loras) == len(labels) == 4
    ranks = [sum(layer.rank for layer in resized.lora) for resized in loras]
    assert ranks[0] == sum(layer.rank for layer in lora.lora) and ranks[0] > ranks[1] > ranks[2] >= ranks[3]
    assert ranks[3] == len(loras[3].lora.layers)  # rank=1: one value per layer
    errors = [row["error"] for row in output["ui"]["lora_resize_sweep"]]
    assert errors[0] < 1e-6 and errors[1] <= 0.05 + 1e-9 and errors[2] <= 0.30 + 1e-9
    assert labels[1].startswith("5%: ") and "MiB" in labels[1] and report.count("recipe ") == 4


def test_compare_images_scores_and_draws_a_labelled_grid(comfy_hosts, pack):
    compare = pack.NODE_CLASS_MAPPINGS["LoraResize_CompareImages"]()
    g = torch.Generator().manual_seed(3)
    original = torch.rand(1, 48, 40, 3, generator=g)
    near = (original + 0.01 * torch.randn(original.shape, generator=g)).clamp(0, 1)
    far = torch.rand(1, 48, 40, 3, generator=g)
    out = compare.compare([original], [original, near, far], ["keep: 1 MiB", "a: 0.5 MiB", "b: 0.1 MiB"], [2])
    grid, report, ssim, psnr = out["result"]
    assert ssim[0] == pytest.approx(1.0, abs=1e-6) and psnr[0] == 100.0
    assert 0.9 < ssim[1] < 1.0 and ssim[2] < 0.2 and psnr[1] > 35 > psnr[2]
    mse = float((near - original).double().pow(2).mean())
    assert psnr[1] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[1] >= 2 * 48 and grid.shape[2] >= 2 * 40
    # the original is the first tile, unchanged but for 8-bit rounding (the grid is drawn as an 8-bit picture)
    assert float((grid[0, :48, :40] - original[0]).abs().max()) <= 0.5 / 255 + 1e-6
    assert "b: 0.1 MiB: SSIM" in report
    with pytest.raises(Exception, match="2 labels for 3 images"):
        compare.compare([original], [original, near, far], ["x", "y"])
    with pytest.raises(Exception, match=r"\(1, 8, 8, 3\)"):
        compare.compare([original], [torch.zeros(1, 8, 8, 3)])

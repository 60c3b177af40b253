"""The node pack inside a real ComfyUI process, with a small real SDXL MODEL and CLIP.

Base norms taken from the MODEL/CLIP equal those from the same weights saved as a checkpoint; a
MODEL already patched by a LoRA still gives the unpatched norms; the node chain writes a file the
host loads with zero unloaded keys and whose ΔW equals the CLI's output for the same recipe.
"""
import importlib.util
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.host.comfy_models import checkpoint_from_host, random_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pack(comfy_hosts):
    """The repo imported as ComfyUI imports a custom node folder (a package with relative imports)."""
    name = "comfyui_lora_resize_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture()
def folders(comfy_hosts, tmp_path, monkeypatch):
    import folder_paths

    loras, checkpoints = tmp_path / "loras", tmp_path / "checkpoints"
    loras.mkdir()
    checkpoints.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(checkpoints)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("loras", None)
    return loras, checkpoints


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

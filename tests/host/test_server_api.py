"""A real ComfyUI server with the pack in custom_nodes, driven through the API queue (/prompt).

Workflows are the API-format twins in example_workflows/. Checks: success in /history, the saved
file loads in the host with zero unloaded keys and equals the CLI's output; a bad recipe, a missing
file and a LoRA of another architecture than the MODEL end as errors naming the problem, write
nothing, and the next prompt runs. Workflows that load a checkpoint get the test-only tiny SDXL
(tests/host/test_nodes_pack) in place of CheckpointLoaderSimple.
"""
import os

from tests.host.comfy_models import checkpoint_from_host
from tests.host.server import FIXTURE, TINY_LORA, error_of, on_tiny_sdxl, run_prompt, workflow


def test_resize_workflow_saves_a_loadable_file_equal_to_the_cli(server, comfy_hosts, tmp_path):
    import comfy.lora
    import comfy.utils

    from core.cli import main
    from core.delta import delta_weight
    from core.formats import read_lora

    entry = run_prompt(server, workflow("resize_own_spectrum_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = server["loras"] / "resized" / "sdxl_peft_00001_.safetensors"
    assert saved.exists()
    host = comfy_hosts["sdxl"]()
    state = comfy.utils.load_torch_file(str(saved), safe_load=True)
    patches = comfy.lora.load_lora(state, host.key_map, log_missing=False)
    assert len(patches) * 3 == len(state)  # every up/down/alpha triple loaded
    assert main(["-", FIXTURE, "-o", str(tmp_path), "-r", "spn_lora=1,thr=-0.8", "-t", "32", "-q"]) == 0
    (cli_file,) = os.listdir(tmp_path)
    ours, cli = read_lora(saved), read_lora(tmp_path / cli_file)
    assert ours.layers.keys() == cli.layers.keys()
    for name, layer in ours.layers.items():
        assert layer.rank == cli.layers[name].rank
        expected = delta_weight(cli.layers[name])
        assert float((delta_weight(layer) - expected).norm() / expected.norm()) < 1e-5


def test_merge_and_random_projection_workflows(server):
    entry = run_prompt(server, workflow("merge_then_resize_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (server["loras"] / "merged" / "sdxl_peft_merged_00001_.safetensors").exists()
    entry = run_prompt(server, workflow("fixed_rank_randproj_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (server["loras"] / "rank4" / "sdxl_peft_rank4_00001_.safetensors").exists()


def test_errors_name_the_problem_write_nothing_and_the_next_prompt_runs(server):
    before = sorted(p.name for p in server["loras"].rglob("*.safetensors"))
    bad = workflow("resize_own_spectrum_api.json")
    recipe_node = next(k for k, v in bad.items() if v["class_type"] == "LoraResize_ScoreRecipe")
    bad[recipe_node]["inputs"]["raw_recipe"] = "spn_lora=1,thr=oops"
    entry = run_prompt(server, bad)
    assert entry["status"]["status_str"] == "error"
    assert "'thr=oops'" in error_of(entry)["exception_message"]
    missing = workflow("resize_own_spectrum_api.json")
    load_node = next(k for k, v in missing.items() if v["class_type"] == "LoraResize_LoadLoRAForResize")
    missing[load_node]["inputs"]["lora_name"] = "gone.safetensors"
    reply = server["requests"].post(f"{server['url']}/prompt", json={"prompt": missing}, timeout=10)
    assert reply.status_code == 400 and "gone.safetensors" in reply.text  # rejected by validation
    assert sorted(p.name for p in server["loras"].rglob("*.safetensors")) == before
    entry = run_prompt(server, workflow("resize_own_spectrum_api.json"))
    assert entry["status"]["status_str"] == "success"


def test_resize_with_base_uses_the_loaded_model_and_equals_the_cli_on_its_checkpoint(server, comfy_hosts,
                                                                                     tmp_path):
    import comfy.lora
    import comfy.utils

    from core.cli import main
    from core.delta import delta_weight
    from core.formats import read_lora

    entry = run_prompt(server, on_tiny_sdxl(workflow("resize_with_base_api.json")))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = server["loras"] / "resized" / "my_sdxl_lora_00001_.safetensors"
    host = comfy_hosts["sdxl"]()
    state = comfy.utils.load_torch_file(str(saved), safe_load=True)
    patches = comfy.lora.load_lora(state, host.key_map, log_missing=False)
    assert len(patches) * 3 == len(state) > 0
    # the CLI on the same weights saved as an SGM checkpoint: the same ranks and ΔW
    ckpt = tmp_path / "tiny_sdxl.safetensors"
    checkpoint_from_host(host, ckpt)
    out = tmp_path / "cli"
    assert main([str(ckpt), str(server["loras"] / TINY_LORA), "-o", str(out), "-r", "fro_ckpt=1,thr=-3.5",
                 "-q"]) == 0
    (cli_file,) = os.listdir(out)
    ours, cli = read_lora(saved), read_lora(out / cli_file)
    assert {k: l.rank for k, l in ours.layers.items()} == {k: l.rank for k, l in cli.layers.items()}
    assert sum(l.rank for l in ours) < sum(l.rank for l in read_lora(server["loras"] / TINY_LORA))
    for name, layer in ours.layers.items():
        expected = delta_weight(cli.layers[name])
        assert float((delta_weight(layer) - expected).norm() / expected.norm()) < 2e-3  # both stored fp16
    # the norms were cached beside the checkpoints folder, under the loaded model's fingerprint
    assert (server["base"] / "models" / "checkpoints" / ".lora_resize_norms.json").exists()


def test_ab_preview_samples_original_and_resized_side_by_side(server):
    """The A/B workflow on the tiny SDXL, decoding swapped for SaveLatent (the tiny model has no VAE),
    plus a third branch without the LoRA: the resized LoRA's sample stays nearer the original's than
    the LoRA-free one does."""
    from safetensors.torch import load_file

    prompt = on_tiny_sdxl(workflow("ab_preview_api.json"))
    for key, node in list(prompt.items()):
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if node["class_type"] == "PreviewImage":
            del prompt[key]
    for key, node in list(prompt.items()):
        if node["class_type"] == "VAEDecode":
            sampler = node["inputs"]["samples"][0]
            lora_node = prompt[prompt[sampler]["inputs"]["model"][0]]["inputs"]["lora"][0]
            tag = "A" if prompt[lora_node]["class_type"] == "LoraResize_LoadLoRAForResize" else "B"
            prompt[key] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                                 "filename_prefix": f"ab/{tag}"}}
    sampler_a = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    loader = next(k for k, v in prompt.items() if v["class_type"] == "LoraResizeTest_TinySDXL")
    prompt["100"] = dict(prompt[sampler_a], inputs={**prompt[sampler_a]["inputs"], "model": [loader, 0]})
    prompt["101"] = {"class_type": "SaveLatent", "inputs": {"samples": ["100", 0], "filename_prefix": "ab/C"}}
    entry = run_prompt(server, prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    latents = {}
    for tag in "ABC":
        (path,) = (server["base"] / "output" / "ab").glob(f"{tag}_*.latent")
        latents[tag] = load_file(str(path))["latent_tensor"].double()
    assert all(bool(t.isfinite().all()) and t.shape == (1, 4, 8, 8) for t in latents.values())
    lora_effect = float((latents["A"] - latents["C"]).norm())
    resize_effect = float((latents["B"] - latents["A"]).norm())
    print(f"A-B {resize_effect:.4g}  A-C {lora_effect:.4g}")
    assert lora_effect > 0 and resize_effect < 0.5 * lora_effect, (resize_effect, lora_effect)


def test_a_lora_of_another_architecture_than_the_model_is_an_executionerror_of(server):
    before = sorted(p.name for p in server["loras"].rglob("*.safetensors"))
    prompt = on_tiny_sdxl(workflow("resize_with_base_api.json"))
    next(v for v in prompt.values() if v["class_type"] == "LoraResize_LoadLoRAForResize")["inputs"]["lora_name"] = \
        "sd15_locon.safetensors"
    entry = run_prompt(server, prompt)
    assert entry["status"]["status_str"] == "error"
    message = error_of(entry)["exception_message"]
    assert "SD15" in message and "SDXL" in message and "sd15_locon.safetensors" in message, message
    assert sorted(p.name for p in server["loras"].rglob("*.safetensors")) == before
    entry = run_prompt(server, on_tiny_sdxl(workflow("resize_with_base_api.json")))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_sweep_samples_every_target_and_compare_measures_them(server):
    """"Find the smallest that looks the same" on the tiny SDXL (decoding by a test-only latent-to-RGB map: the
    tiny model has no VAE): one image per target reaches Compare Images; the keep-all target is the original's
    image (SSIM ≥ 0.999) and the smallest target's SSIM is below the largest's."""
    prompt = on_tiny_sdxl(workflow("find_smallest_same_api.json"))
    sweep = next(k for k, v in prompt.items() if v["class_type"] == "LoraResize_ResizeLoRASweep")
    compare = next(k for k, v in prompt.items() if v["class_type"] == "LoraResize_CompareImages")
    prompt[sweep]["inputs"]["targets"] = "keep, 10%, 60%, rank=1"
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if node["class_type"] == "VAEDecode":
            node["class_type"] = "LoraResizeTest_LatentToImage"
    entry = run_prompt(server, prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    targets = entry["outputs"][sweep]["lora_resize_sweep"]
    table = entry["outputs"][compare]["lora_resize_compare"]
    assert [t["target"] for t in targets] == ["keep", "10%", "60%", "rank=1"]
    assert len(table) == 4 and [row["label"].split(":")[0] for row in table] == ["keep", "10%", "60%", "rank=1"]
    keep, *_ = table
    assert targets[0]["error"] < 1e-6 and keep["ssim"] >= 0.999
    assert targets[1]["error"] <= 0.10 + 1e-9 and targets[2]["error"] <= 0.60 + 1e-9
    smallest = min(range(4), key=lambda i: targets[i]["mib"])
    largest = max(range(4), key=lambda i: targets[i]["mib"])
    assert targets[smallest]["mib"] < targets[largest]["mib"]
    print("sweep:", [(t["target"], round(t["mib"], 4), round(t["error"], 4)) for t in targets],
          "ssim:", [round(row["ssim"], 4) for row in table])
    assert table[smallest]["ssim"] < table[largest]["ssim"], table
    (grid,) = entry["outputs"][next(k for k, v in prompt.items() if v["class_type"] == "PreviewImage")]["images"]
    assert grid["filename"].endswith(".png")

"""Resize LoRA Folder inside a real ComfyUI process (tiny SDXL MODEL/CLIP), and through /prompt on a real
server with its example workflow's API twin.

A loras subfolder holds two LoRAs made for the model's real key names (one in a subfolder), a
truncated file and an SD1.5 LoRA: the two are written under the output subfolder with the CLI's names,
mirrored, and load in the host with zero unloaded keys; the broken and the foreign one are rows of the
report naming the problem (the node itself succeeds); the kept ranks equal `lora-resize batch` on the
same weights saved as a checkpoint; a second run writes nothing (both "done earlier", files untouched);
a Cancel after the first file ends the run with nothing partial, and the next run finishes the rest.
"""
import json
import os
import shutil

import pytest
from safetensors.torch import save_file

from tests.host.comfy_models import checkpoint_from_host, random_lora

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD15 = os.path.join(ROOT, "tests", "fixtures", "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
RECIPE = "fro_ckpt=1,thr=-3.5"


def _library(loras, host) -> dict[str, str]:
    """loras/library: two good LoRAs (one in sub/), a truncated one and one of another family."""
    library = loras / "library"
    (library / "sub").mkdir(parents=True)
    save_file(random_lora(host, rank=8, seed=3, up_scale=0.02, decay=0.3), str(library / "first.safetensors"))
    save_file(random_lora(host, rank=8, seed=5, every=5, up_scale=0.02, decay=0.3),
              str(library / "sub" / "second.safetensors"))
    data = (library / "first.safetensors").read_bytes()
    (library / "broken.safetensors").write_bytes(data[: len(data) // 3])
    shutil.copy(SD15, library / "sd15_other.safetensors")
    return {"first": "first", "sub/second": "second"}


def _zero_unloaded(host, path) -> int:
    import comfy.lora
    import comfy.utils

    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    patches = comfy.lora.load_lora(state, host.key_map, log_missing=False)
    assert len(patches) * 3 == len(state) > 0  # every up/down/alpha triple loaded: zero unloaded keys
    return len(patches)


def test_folder_node_writes_the_good_reports_the_bad_and_skips_what_is_done(comfy_hosts, pack, folders,  # noqa: F811
                                                                           tmp_path):
    from core.cli import main
    from core.formats import read_lora

    loras, _ = folders
    host = comfy_hosts["sdxl"]()
    _library(loras, host)
    node = pack.nodes.NODE_CLASS_MAPPINGS["LoraResize_ResizeLoRAFolder"]()
    out = node.run("library", "*.safetensors", RECIPE, "resized", "kohya", "fp16", host.model, host.clip)
    report = out["result"][0]
    rows = {row["file"]: row for row in out["ui"]["lora_resize_folder"][0]["rows"]}
    assert set(rows) == {"first.safetensors", os.path.join("sub", "second.safetensors"), "broken.safetensors",
                         "sd15_other.safetensors"}
    broken = rows["broken.safetensors"]
    assert broken["status"] == "failed" and "Fix:" in broken["error"] and not broken["error"].startswith("/")
    assert f"broken.safetensors [{RECIPE}]: failed: {broken['error']}" in report
    other = rows["sd15_other.safetensors"]
    assert other["status"] == "failed" and "SD15" in other["error"] and "SDXL" in other["error"]
    written = sorted((loras / "resized").rglob("*.safetensors"))
    assert [p.relative_to(loras / "resized").as_posix() for p in written] == \
        ["first_frockpt1_th-3.5.safetensors", "sub/second_frockpt1_th-3.5.safetensors"]
    for path in written:
        _zero_unloaded(host, path)
        row = rows[os.path.relpath(str(path).replace("_frockpt1_th-3.5", ""), loras / "resized")]
        assert row["status"] == "done" and row["mib_after"] == round(path.stat().st_size / 2**20, 3)
        assert row["output"] == path.relative_to(loras).as_posix()
        before, after = (int(n) for n in row["ranks"].split(" -> "))
        assert sum(layer.rank for layer in read_lora(path)) == after < before
    assert "2 done, 0 already done, 0 skipped, 2 failed" in report
    # the CLI's batch on the same weights saved as a checkpoint keeps the same ranks
    ckpt = tmp_path / "tiny_sdxl.safetensors"
    checkpoint_from_host(host, ckpt)
    cli = tmp_path / "cli"
    assert main(["batch", str(loras / "library" / "first.safetensors"), str(loras / "library" / "sub"), "-o", str(cli),
                 "--base", f"sdxl={ckpt}", "-r", RECIPE, "-q"]) == 0
    for path in written:
        ours, theirs = read_lora(path), read_lora(cli / path.name)
        assert {k: v.rank for k, v in ours.layers.items()} == {k: v.rank for k, v in theirs.layers.items()}
    # a second run: nothing rewritten, both reported as done earlier
    stamps = [p.stat().st_mtime_ns for p in written]
    again = node.run("library", "*.safetensors", RECIPE, "resized", "kohya", "fp16", host.model, host.clip)
    assert "0 done, 2 already done, 0 skipped, 2 failed" in again["result"][0]
    assert [p.stat().st_mtime_ns for p in written] == stamps
    statuses = sorted(row["status"] for row in again["ui"]["lora_resize_folder"][0]["rows"])
    assert statuses == ["done earlier", "done earlier", "failed", "failed"]


def test_cancel_between_files_leaves_nothing_partial_and_the_next_run_finishes(comfy_hosts, pack,  # noqa: F811
                                                                               folders):  # noqa: F811
    import comfy.model_management
    import comfy.utils

    loras, _ = folders
    host = comfy_hosts["sdxl"]()
    _library(loras, host)
    node = pack.nodes.NODE_CLASS_MAPPINGS["LoraResize_ResizeLoRAFolder"]()
    calls = []

    def hook(value, total, preview=None, node_id=None):  # ComfyUI's ProgressBar hook: Cancel after file 1
        calls.append((value, total))
        if value >= 1:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            node.run("library", "*.safetensors", RECIPE, "resized", "kohya", "fp16", host.model, host.clip)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert calls and calls[0][1] == 4  # files to resize (each read once, there: the truncated one fails then)
    written = sorted((loras / "resized").rglob("*.safetensors"))
    assert len(written) <= 1  # the first file at most: the run stopped there
    assert [p for p in (loras / "resized").rglob(".*") if p.is_file()] == []  # no temp, nothing partial
    records = [json.loads(line) for line in (loras / "resized" / "lora-resize-batch.jsonl").read_text().splitlines()]
    assert len(records) < 4
    out = node.run("library", "*.safetensors", RECIPE, "resized", "kohya", "fp16", host.model, host.clip)
    assert len(sorted((loras / "resized").rglob("*.safetensors"))) == 2
    done_now = sum(row["status"] == "done" for row in out["ui"]["lora_resize_folder"][0]["rows"])
    assert done_now == 2 - len([p for p in written if p.name.endswith(".safetensors")])


def test_folder_node_through_prompt_on_a_real_server(server, comfy_hosts):
    from tests.host.server import on_tiny_sdxl, run_prompt, workflow

    host = comfy_hosts["sdxl"]()
    _library(server["loras"], host)
    prompt = on_tiny_sdxl(workflow("resize_folder_api.json"))
    entry = run_prompt(server, prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    written = sorted((server["loras"] / "resized_library").rglob("*.safetensors"))
    assert [p.relative_to(server["loras"] / "resized_library").as_posix() for p in written] == \
        ["first_frockpt1_th-3.5.safetensors", "sub/second_frockpt1_th-3.5.safetensors"]
    for path in written:
        _zero_unloaded(host, path)
    outputs = next(iter(entry["outputs"].values()))
    rows = {row["file"]: row for row in outputs["lora_resize_folder"][0]["rows"]}
    assert rows["broken.safetensors"]["status"] == "failed" and "Fix:" in rows["broken.safetensors"]["error"]
    assert rows["sd15_other.safetensors"]["status"] == "failed"
    # LoraLoader lists the new files at once (the list was refreshed)
    info = server["requests"].get(f"{server['url']}/object_info/LoraLoader", timeout=10).json()
    names = info["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "resized_library/first_frockpt1_th-3.5.safetensors" in [n.replace("\\", "/") for n in names]


def test_without_a_model_base_recipes_are_skipped_with_the_reason_and_others_run(comfy_hosts, pack,  # noqa: F811
                                                                                 folders):  # noqa: F811
    loras, _ = folders
    host = comfy_hosts["sdxl"]()
    _library(loras, host)
    node = pack.nodes.NODE_CLASS_MAPPINGS["LoraResize_ResizeLoRAFolder"]()
    out = node.run("library", "*.safetensors", f"{RECIPE}:rank=2", "resized", "kohya", "fp16")
    rows = out["ui"]["lora_resize_folder"][0]["rows"]
    skipped = [row for row in rows if row["status"] == "skipped"]
    every = ["broken.safetensors", "first.safetensors", "sd15_other.safetensors",
             os.path.join("sub", "second.safetensors")]
    assert sorted(row["file"] for row in skipped) == every  # decided before any file is read
    assert all(row["recipe"] == RECIPE and "connect the MODEL" in row["error"] for row in skipped)
    done = sorted(row["file"] for row in rows if row["status"] == "done")
    assert done == ["first.safetensors", "sd15_other.safetensors", os.path.join("sub", "second.safetensors")]
    assert len(list((loras / "resized").rglob("*_rank2.safetensors"))) == 3
    assert [row["file"] for row in rows if row["status"] == "failed"] == ["broken.safetensors"]  # read: rank=2

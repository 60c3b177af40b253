"""A real ComfyUI server with the pack in custom_nodes, driven through the API queue (/prompt).

Workflows are the API-format twins in example_workflows/. Checks: success in /history, the saved
file loads in the host with zero unloaded keys and equals the CLI's output; a bad recipe and a
missing file end as execution_error naming the problem, write nothing, and the next prompt runs.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests.host.comfy_models import comfyui_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "example_workflows")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "lora", "sdxl_peft_r8a4.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(comfy_hosts, tmp_path_factory):
    requests = pytest.importorskip("requests")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "comfyui-lora-resize")
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    shutil.copy(FIXTURE, loras / "sdxl_peft.safetensors")
    port = _free_port()
    log = open(base / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-api-nodes", "--dont-print-server"],
        cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/object_info/LoraResize_ResizeLoRA", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
        if process.poll() is not None:
            break
    else:
        process.kill()
        pytest.fail("ComfyUI did not start: " + (base / "server.log").read_text()[-3000:])
    if process.poll() is not None:
        pytest.fail("ComfyUI exited: " + (base / "server.log").read_text()[-3000:])
    yield {"url": url, "base": base, "loras": loras, "requests": requests}
    process.terminate()
    process.wait(30)
    log.close()


def _workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name)) as fh:
        return json.load(fh)


def _run(server, prompt: dict, timeout: float = 120) -> dict:
    requests = server["requests"]
    reply = requests.post(f"{server['url']}/prompt", json={"prompt": prompt, "client_id": str(uuid.uuid4())},
                          timeout=10)
    assert reply.ok, reply.text
    prompt_id = reply.json()["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = requests.get(f"{server['url']}/history/{prompt_id}", timeout=10).json()
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.3)
    raise AssertionError("prompt did not finish")


def _error(entry) -> dict:
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    return errors[0]


def test_resize_workflow_saves_a_loadable_file_equal_to_the_cli(server, comfy_hosts, tmp_path):
    import comfy.lora
    import comfy.utils

    from core.cli import main
    from core.delta import delta_weight
    from core.formats import read_lora

    entry = _run(server, _workflow("resize_own_spectrum_api.json"))
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
    entry = _run(server, _workflow("merge_then_resize_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (server["loras"] / "merged" / "sdxl_peft_merged_00001_.safetensors").exists()
    entry = _run(server, _workflow("fixed_rank_randproj_api.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (server["loras"] / "rank4" / "sdxl_peft_rank4_00001_.safetensors").exists()


def test_errors_name_the_problem_write_nothing_and_the_next_prompt_runs(server):
    before = sorted(p.name for p in server["loras"].rglob("*.safetensors"))
    bad = _workflow("resize_own_spectrum_api.json")
    recipe_node = next(k for k, v in bad.items() if v["class_type"] == "LoraResize_ScoreRecipe")
    bad[recipe_node]["inputs"]["raw_recipe"] = "spn_lora=1,thr=oops"
    entry = _run(server, bad)
    assert entry["status"]["status_str"] == "error"
    assert "'thr=oops'" in _error(entry)["exception_message"]
    missing = _workflow("resize_own_spectrum_api.json")
    load_node = next(k for k, v in missing.items() if v["class_type"] == "LoraResize_LoadLoRAForResize")
    missing[load_node]["inputs"]["lora_name"] = "gone.safetensors"
    reply = server["requests"].post(f"{server['url']}/prompt", json={"prompt": missing}, timeout=10)
    assert reply.status_code == 400 and "gone.safetensors" in reply.text  # rejected by validation
    assert sorted(p.name for p in server["loras"].rglob("*.safetensors")) == before
    entry = _run(server, _workflow("resize_own_spectrum_api.json"))
    assert entry["status"]["status_str"] == "success"

"""A real ComfyUI server for the host tests: the pack and the test-only nodes in custom_nodes, fixture
LoRAs in models/loras, and helpers to queue API prompts and read /history."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

from safetensors.torch import save_file

from tests.host.comfy_models import comfyui_path, random_lora, tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "example_workflows")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "lora", "sdxl_peft_r8a4.safetensors")
TINY_LORA = "tiny_sdxl_lora.safetensors"  # made for the tiny SDXL's real key names and widths
# The example workflows' checkpoint-bound nodes -> the test-only stand-ins of the same inputs
TINY_STAND_INS = {"CheckpointLoaderSimple": "LoraResizeTest_TinySDXL",
                  "CLIPTextEncode": "LoraResizeTest_TinyConditioning"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    pass


@contextmanager
def running_server(base, other_packs: dict[str, str] | None = None):
    """ComfyUI on a free port with ``base`` (a pathlib.Path) as its base directory; yields the
    dict the tests use. The frontend's first-run template dialog is switched off. ``other_packs``:
    folder name -> path of more node packs to install beside this one (ComfyUI-GGUF)."""
    import requests

    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "comfyui-lora-resize")
    for name, path in (other_packs or {}).items():
        os.symlink(path, base / "custom_nodes" / name)
    os.symlink(os.path.join(ROOT, "tests", "host", "test_nodes_pack"), base / "custom_nodes" / "lora_resize_test_nodes")
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    shutil.copy(FIXTURE, loras / "sdxl_peft.safetensors")
    save_file(random_lora(tiny_sdxl(), rank=8, seed=3, up_scale=0.02, decay=0.3), str(loras / TINY_LORA))
    shutil.copy(os.path.join(ROOT, "tests", "fixtures", "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors"),
                loras / "sd15_locon.safetensors")
    settings = base / "user" / "default"
    settings.mkdir(parents=True)
    (settings / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = free_port()
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
        raise ServerFailed("ComfyUI did not start: " + (base / "server.log").read_text()[-3000:])
    if process.poll() is not None:
        raise ServerFailed("ComfyUI exited: " + (base / "server.log").read_text()[-3000:])
    try:
        yield {"url": url, "base": base, "loras": loras, "requests": requests, "pid": process.pid}
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name)) as fh:
        return json.load(fh)


def run_prompt(server, prompt: dict, timeout: float = 120) -> dict:
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


def error_of(entry) -> dict:
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    return errors[0]


def on_tiny_sdxl(prompt: dict) -> dict:
    """The workflow with the tiny SDXL and its conditioning in place of the checkpoint's nodes."""
    for node in prompt.values():
        node["class_type"] = TINY_STAND_INS.get(node["class_type"], node["class_type"])
        if node["class_type"] == "LoraResize_LoadLoRAForResize":
            node["inputs"]["lora_name"] = TINY_LORA
    return prompt


def post_prompt(server, prompt: dict, client_id: str | None = None):
    """POST /prompt as raw JSON, so NaN and Infinity reach the server as an API client can send them
    (requests' ``json=`` refuses them). Returns the reply."""
    body = json.dumps({"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})
    return server["requests"].post(f"{server['url']}/prompt", data=body, timeout=10,
                                   headers={"Content-Type": "application/json"})


def wait_for(server, prompt_id: str, timeout: float = 120) -> dict:
    """The /history entry of a queued prompt once it finished (success, error or interrupted)."""
    requests = server["requests"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = requests.get(f"{server['url']}/history/{prompt_id}", timeout=10).json()
        entry = history.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            if entry["status"].get("status_str") in ("success", "error"):
                return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status), in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")

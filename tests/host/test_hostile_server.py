"""Hostile input and faults through the nodes on a real ComfyUI server (POST /prompt, /history, /interrupt, /ws).

37 bad inputs (table ``BAD``): raw recipes (10: thr=nan, thr=inf, rescale=nan, rescale=1e30,
size=1e300, size=nan, niter=10**9, an unknown token, two selections, a NaN weight); recipe widgets
(3: value NaN, rescale Infinity, value over its maximum; JSON carries NaN/Infinity past ComfyUI's
min/max checks, which NaN passes); a missing LoRA name (1); files in models/loras (10: truncated,
a pickle renamed .safetensors, no tensors, a header nested 100,000 deep, a negative shape, string
shapes, float offsets, a 0×2^70 shape, ``__metadata__`` that is a list, overlapping offsets); Save
prefixes (10: "", "  ", ".", "..", "../escape", "a\0b", "a\tb", 300 characters, an absolute
path, a Windows drive path); merge weights (3: 1e30, NaN, -Infinity). Each one ends as a
validation error (HTTP 400) or an execution_error of the pack's own LoraError (or a subclass)
from one of its nodes, whose message names the problem and the fix; nothing under models/
changes (the whole tree, hidden files included, is compared before and after); and the next
good prompt runs. An fp8 LoRA, the positive case, resizes and saves.

Faults: a save into a full file system (a 64 KiB tmpfs) and into a read-only one (a read-only
tmpfs, or chmod where mounting is not allowed) is a LoraError naming the folder, with no file or
temp file left (the full-disk case skips, saying why, where no tmpfs can be mounted; the
in-process tests inject ENOSPC everywhere); Cancel (POST /interrupt) while ResizeLoRA decomposes
a 72-layer LoHa stops that node at its next progress step (no progress event after the one under
way), writes and caches nothing, and the next prompt runs; 20 prompts queued at once all complete
and the server's resident memory returns to its baseline ±10%.

RSS: the server child's VmRSS from /proc/<pid>/status. The baseline is taken after three warm-up
prompts of the same kind (imports, allocator pools, the loaded file in ComfyUI's cache); after the
20 finish, ComfyUI's own garbage collection runs when its queue is idle (every 10 s at most), so
the test polls VmRSS for up to 30 s until it is back within ±10% (the lowest reading counts).
"""
import json
import os
import shutil
import subprocess
import time
import uuid

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import skip_or_fail
from tests.host.server import FIXTURE, post_prompt, rss_kib, wait_for

GOOD_LORA = "sdxl_peft.safetensors"  # copied into models/loras by the server fixture
_RUNS = iter(range(10_000))


# --- prompts -------------------------------------------------------------------------------------------------

def _recipe(raw: str = "", **widgets) -> dict:
    inputs = {"fro_ckpt": 0.0, "spn_ckpt": 0.0, "spn_lora": 1.0, "fro_lora": 0.0, "subspace": 0.0, "params": 0.0,
              "selection": "thr", "value": -0.8, "rescale": 1.0, "reducer": "svd", "seed": 0, "raw_recipe": raw,
              "niter": 2}
    inputs.update(widgets)
    return {"class_type": "LoraResize_ScoreRecipe", "inputs": inputs}


def resize_prompt(lora_name: str = GOOD_LORA, recipe: dict | None = None, prefix: str | None = None,
                  merge_weights: tuple | None = None) -> dict:
    """Load -> (Merge) -> Recipe -> Resize -> Save (with ``prefix``) or PreviewAny of the report (writes nothing)."""
    prompt = {"1": {"class_type": "LoraResize_LoadLoRAForResize", "inputs": {"lora_name": lora_name}},
              "2": recipe or _recipe("spn_lora=1,thr=-0.8")}
    source = ["1", 0]
    if merge_weights is not None:
        prompt["5"] = {"class_type": "LoraResize_MergeLoRAs",
                       "inputs": {"lora_1": ["1", 0], "weight_1": merge_weights[0], "lora_2": ["1", 0],
                                  "weight_2": merge_weights[1], "mode": "concat"}}
        source = ["5", 0]
    prompt["3"] = {"class_type": "LoraResize_ResizeLoRA", "inputs": {"lora": source, "recipe": ["2", 0]}}
    if prefix is None:
        prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    else:
        prompt["4"] = {"class_type": "LoraResize_SaveLoRA", "inputs": {"lora": ["3", 0], "filename_prefix": prefix,
                                                                       "format": "kohya", "dtype": "fp16"}}
    return prompt


def good_prompt() -> dict:
    """A resize that must run (a fresh threshold each time, so ComfyUI's cache cannot answer it)."""
    return resize_prompt(recipe=_recipe(f"spn_lora=1,thr=-{0.5 + next(_RUNS) * 1e-4:.4f}"))


def outcome(server, prompt: dict) -> tuple[str, str, dict]:
    """('rejected', text) for a validation error, else ('success'|'error', message, history entry)."""
    reply = post_prompt(server, prompt)
    if reply.status_code == 400:
        return "rejected", reply.text, {}
    assert reply.ok, reply.text
    entry = wait_for(server, reply.json()["prompt_id"])
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    if errors:
        return "error", errors[0]["exception_message"], errors[0]
    return entry["status"]["status_str"], "", entry


def models_tree(server) -> dict[str, int]:
    """Every file under models/ (hidden ones too: temp files, caches) with its size."""
    root = server["base"] / "models"
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def assert_good_prompt_runs(server) -> None:
    state, message, _ = outcome(server, good_prompt())
    assert state == "success", message


# --- bad files -----------------------------------------------------------------------------------------------

def _truncated(path):
    data = open(FIXTURE, "rb").read()
    path.write_bytes(data[: len(data) // 2])


def _pickle(path):
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path))  # a zip of pickles, never loaded


def _no_tensors(path):
    save_file({}, str(path), metadata={"ss_network_module": "networks.lora"})


def _header(path, header: object, data: bytes = b"") -> None:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


_KEY, _DOWN = "lora_unet_x.lora_up.weight", "lora_unet_x.lora_down.weight"
_HEADERS = {  # kind: (header, data, a word the error must hold) of hand-made files that lie in one way each
    "deep_json": ("[" * 100_000 + "]" * 100_000, b"", "nested"),
    "negative_shape": ({_KEY: {"dtype": "F16", "shape": [-2, -2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    "string_shape": ({_KEY: {"dtype": "F16", "shape": ["2", "2"], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    "float_offsets": ({_KEY: {"dtype": "F16", "shape": [2, 2], "data_offsets": [0.0, 8.0]}}, bytes(8), "offsets"),
    "huge_shape": ({_KEY: {"dtype": "F16", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"", "large"),
    "metadata_list": ({"__metadata__": ["a"], _KEY: {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}},
                      bytes(8), "__metadata__"),
    "overlapping": ({_KEY: {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
                     _DOWN: {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}, bytes(8), "overlap"),
}
_FILES = {"truncated": (_truncated, "truncated"), "pickle": (_pickle, "pickle"),
          "no_tensors": (_no_tensors, "no tensors"),
          **{kind: (lambda path, _h=h, _d=d: _header(path, _h, _d), word) for kind, (h, d, word) in _HEADERS.items()}}
NAN, INF = float("nan"), float("inf")

# (id, how to build the prompt, what the error must say); "file:<kind>" puts a bad file in models/loras first
BAD = [
    ("thr_nan", lambda: resize_prompt(recipe=_recipe("spn_lora=1,thr=nan")), "'thr=nan'"),
    ("thr_inf", lambda: resize_prompt(recipe=_recipe("spn_lora=1,thr=inf")), "'thr=inf'"),
    ("rescale_nan", lambda: resize_prompt(recipe=_recipe("spn_lora=1,thr=-1,rescale=nan")), "'rescale=nan'"),
    ("rescale_1e30", lambda: resize_prompt(recipe=_recipe("spn_lora=1,thr=-1,rescale=1e30")), "rescale"),
    ("size_1e300", lambda: resize_prompt(recipe=_recipe("spn_lora=1,size=1e300")), "size"),
    ("size_nan", lambda: resize_prompt(recipe=_recipe("spn_lora=1,size=nan")), "'size=nan'"),
    ("niter_1e9", lambda: resize_prompt(recipe=_recipe("rank=4,method=rsvd,niter=1000000000")), "niter"),
    ("unknown_token", lambda: resize_prompt(recipe=_recipe("spn_lora=1,thr=-1,bogus=3")), "'bogus=3'"),
    ("two_selections", lambda: resize_prompt(recipe=_recipe("spn_lora=1,thr=-1,size=2")), "choose one selection"),
    ("weight_nan", lambda: resize_prompt(recipe=_recipe("spn_lora=nan,thr=-1")), "'spn_lora=nan'"),
    ("widget_value_nan", lambda: resize_prompt(recipe=_recipe(value=NAN)), "recipe widget value is nan"),
    ("widget_rescale_inf", lambda: resize_prompt(recipe=_recipe(rescale=INF)), "rescale"),
    ("widget_value_over_max", lambda: resize_prompt(recipe=_recipe(selection="size", value=1e300)), "value"),
    ("missing_lora", lambda: resize_prompt("gone.safetensors"), "gone.safetensors"),
    *[(f"file:{kind}", lambda _k=kind: resize_prompt(f"bad_{_k}.safetensors"), (f"bad_{kind}.safetensors", word))
      for kind, (_, word) in _FILES.items()],
    ("prefix_empty", lambda: resize_prompt(prefix=""), "is empty"),
    ("prefix_spaces", lambda: resize_prompt(prefix="  "), "is empty"),
    ("prefix_dot", lambda: resize_prompt(prefix="."), "names no file"),
    ("prefix_dotdot", lambda: resize_prompt(prefix=".."), "leaves the loras folder"),
    ("prefix_escape", lambda: resize_prompt(prefix="../escape"), "leaves the loras folder"),
    ("prefix_nul", lambda: resize_prompt(prefix="a\u0000b"), "control character"),
    ("prefix_tab", lambda: resize_prompt(prefix="a\tb"), "control character"),
    ("prefix_300", lambda: resize_prompt(prefix="p" * 300), "300 bytes"),
    ("prefix_absolute", lambda: resize_prompt(prefix="/tmp/hostile_abs"), "absolute path"),
    ("prefix_drive", lambda: resize_prompt(prefix="C:\\loras\\x"), "absolute path"),
    ("merge_1e30", lambda: resize_prompt(merge_weights=(1.0, 1e30)), "weight_2"),
    ("merge_nan", lambda: resize_prompt(merge_weights=(1.0, NAN)), "weight_2 is nan"),
    ("merge_minus_inf", lambda: resize_prompt(merge_weights=(-INF, 1.0)), "weight_1"),
]


@pytest.mark.parametrize("case,build,expected", BAD, ids=[row[0] for row in BAD])
def test_bad_input_is_refused_naming_it_writes_nothing_and_the_next_prompt_runs(server, case, build, expected):
    placed = None
    if case.startswith("file:"):
        kind = case.split(":", 1)[1]
        placed = server["loras"] / f"bad_{kind}.safetensors"
        _FILES[kind][0](placed)
    try:
        before = models_tree(server)
        state, message, error = outcome(server, build())
        print(f"{case}: {state}: {message[:300]}")
        assert state in ("rejected", "error"), (case, state)
        assert all(word in message for word in ((expected,) if isinstance(expected, str) else expected)), message
        if state == "error":  # the pack's own error, not a Python exception escaping a node
            assert ".core.errors." in error["exception_type"], error["exception_type"]  # LoraError or a subclass
            assert "Fix: " in message, message
            assert error["node_type"].startswith("LoraResize_"), error
        assert models_tree(server) == before
    finally:
        if placed is not None:
            placed.unlink()
    assert_good_prompt_runs(server)


def test_an_fp8_lora_resizes_and_saves(server):
    from core.formats import read_lora
    from tests.host.comfy_models import random_lora, tiny_sdxl

    state = random_lora(tiny_sdxl(), rank=4, seed=9)
    path = server["loras"] / "hostile_fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 else v for k, v in state.items()}, str(path))
    try:
        status, message, entry = outcome(server, resize_prompt("hostile_fp8.safetensors",
                                                               recipe=_recipe(selection="rank", value=2, spn_lora=0.0),
                                                               prefix="hostile/fp8"))
        assert status == "success", message
        (saved,) = (server["loras"] / "hostile").glob("fp8_*.safetensors")
        assert {layer.rank for layer in read_lora(saved)} == {2}
        saved.unlink()
    finally:
        path.unlink()


# --- faults --------------------------------------------------------------------------------------------------

def _mount_tmpfs(folder, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _unmount(folder) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, check=False)


def test_a_full_or_read_only_loras_folder_is_an_error_naming_the_folder_with_nothing_left(server):
    full, read_only = server["loras"] / "hostile_full", server["loras"] / "hostile_ro"
    mounted_full = _mount_tmpfs(full, "size=64k")
    mounted_ro = _mount_tmpfs(read_only, "ro,size=64k")
    if not mounted_ro:
        read_only.chmod(0o555)  # where mounting is not allowed: a read-only folder, effective unless root
    try:
        cases = [(read_only, ("read-only", "not writable"))]
        if mounted_full:
            cases.append((full, ("full", "No space left")))
        if not mounted_ro and os.geteuid() == 0:
            cases = [c for c in cases if c[0] != read_only]  # root ignores mode bits: no read-only folder here
        for folder, words in cases:
            before = models_tree(server)
            state, message, error = outcome(server, resize_prompt(prefix=f"{folder.name}/x"))
            assert state == "error" and any(w in message for w in words) and str(folder) in message, message
            assert ".core.errors." in error["exception_type"], error["exception_type"]  # LoraError or a subclass
            assert models_tree(server) == before and os.listdir(folder) == []  # no partial file, no temp file
        assert_good_prompt_runs(server)
        if not mounted_full:
            pytest.skip("full disk on the server: mounting a small tmpfs is not allowed here (not root or no "
                        "mount); the in-process test injects ENOSPC instead")
    finally:
        for folder, mounted in ((full, mounted_full), (read_only, mounted_ro)):
            if mounted:
                _unmount(folder)
            folder.chmod(0o755)
            shutil.rmtree(folder, ignore_errors=True)


def _big_loha(path) -> int:
    """A LoHa on SD1.5's 12 CLIP layers (widths 512/2048): every layer dense, a full SVD each, 72 progress steps."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    shapes = {"self_attn_q_proj": (512, 512), "self_attn_k_proj": (512, 512), "self_attn_v_proj": (512, 512),
              "self_attn_out_proj": (512, 512), "mlp_fc1": (2048, 512), "mlp_fc2": (512, 2048)}
    for block in range(12):
        for module, (out, inp) in shapes.items():
            key = f"lora_te_text_model_encoder_layers_{block}_{module}"
            for half in ("1", "2"):
                tensors[f"{key}.hada_w{half}_a"] = (torch.randn(out, 8, generator=g) * 0.05).half()
                tensors[f"{key}.hada_w{half}_b"] = (torch.randn(8, inp, generator=g) * 0.05).half()
            tensors[f"{key}.alpha"] = torch.tensor(4.0).half()
    save_file(tensors, str(path))
    return len(shapes) * 12


def test_cancel_mid_resize_stops_it_writes_and_caches_nothing_and_the_next_prompt_runs(server):
    try:
        import websocket  # websocket-client, installed with selenium: it tells which node runs
    except ImportError:
        skip_or_fail("websocket-client is not installed (it comes with selenium)")
    path = server["loras"] / "hostile_big_loha.safetensors"
    layers = _big_loha(path)
    client = str(uuid.uuid4())
    ws = websocket.create_connection(f"{server['url'].replace('http', 'ws')}/ws?clientId={client}", timeout=120)
    try:
        before = models_tree(server)
        prompt = resize_prompt("hostile_big_loha.safetensors", recipe=_recipe(selection="rank", value=4,
                                                                              spn_lora=0.0), prefix="hostile/big")
        reply = post_prompt(server, prompt, client_id=client)
        assert reply.ok, reply.text
        prompt_id = reply.json()["prompt_id"]
        progress_seen = 0
        while True:  # wait until ResizeLoRA reports progress: it is inside the decomposition
            message = ws.recv()
            if not isinstance(message, str):
                continue
            event = json.loads(message)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if event["type"] == "progress" and data.get("node") == "3":
                progress_seen = data["value"]
                break
            assert event["type"] not in ("execution_error", "execution_success"), event
        assert server["requests"].post(f"{server['url']}/interrupt", timeout=10).ok
        after, kinds = [], {}
        while True:  # every event until the prompt ends: no more than the layer already under way
            message = ws.recv()
            event = json.loads(message) if isinstance(message, str) else {"type": "binary", "data": {}}
            if event["type"] == "progress" and event["data"].get("node") == "3":
                after.append(event["data"]["value"])
            if event["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                kinds[event["type"]] = event["data"]
                break
        assert "execution_interrupted" in kinds, kinds
        assert kinds["execution_interrupted"]["node_type"] == "LoraResize_ResizeLoRA"
        print(f"Cancel after {progress_seen}/{layers} layers; progress steps after it: {after}")
        assert progress_seen < layers and len(after) <= 1, after  # it stops at its next progress step
        entry = wait_for(server, prompt_id)
        assert entry["status"]["status_str"] == "error" and "execution_interrupted" in dict(entry["status"]["messages"])
        assert models_tree(server) == before  # nothing saved, no norms cache, no temp file
    finally:
        ws.close()
        path.unlink()
    assert_good_prompt_runs(server)


def _rank64_lora(path) -> None:
    """A 10 MB kohya LoRA (6 SD1.5 CLIP layers, rank 64): 20 of its resizes (fp32) left in memory would be
    about 400 MB, several times the ±10% allowed."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    shapes = {"self_attn_q_proj": (768, 768), "self_attn_k_proj": (768, 768), "self_attn_v_proj": (768, 768),
              "self_attn_out_proj": (768, 768), "mlp_fc1": (3072, 768), "mlp_fc2": (768, 3072)}
    for block in range(6):
        for module, (out, inp) in shapes.items():
            key = f"lora_te_text_model_encoder_layers_{block}_{module}"
            decay = 0.9 ** torch.arange(64)
            tensors[f"{key}.lora_up.weight"] = (torch.randn(out, 64, generator=g) * 0.01 * decay).half()
            tensors[f"{key}.lora_down.weight"] = (torch.randn(64, inp, generator=g) * 0.05).half()
            tensors[f"{key}.alpha"] = torch.tensor(32.0).half()
    save_file(tensors, str(path))


def test_twenty_prompts_queued_at_once_all_complete_and_memory_returns_to_its_baseline(server):
    path = server["loras"] / "hostile_rank64.safetensors"
    _rank64_lora(path)

    def prompt(i: int) -> dict:
        return resize_prompt("hostile_rank64.safetensors", recipe=_recipe(f"spn_lora=1,thr=-{0.3 + i * 0.01:.2f}"))

    try:
        for i in range(3):  # warm-up: imports, allocator pools, the loaded file in ComfyUI's cache
            state, message, _ = outcome(server, prompt(100 + i))
            assert state == "success", message
        baseline = rss_kib(server["pid"])
        ids = []
        for i in range(20):
            reply = post_prompt(server, prompt(i))
            assert reply.ok, reply.text
            ids.append(reply.json()["prompt_id"])
        entries = [wait_for(server, prompt_id, timeout=300) for prompt_id in ids]
        assert [e["status"]["status_str"] for e in entries] == ["success"] * 20
        reports = {e["outputs"]["4"]["text"][0].split(":")[0] for e in entries}
        assert len(reports) == 20  # twenty different recipes really ran
        lowest, deadline = rss_kib(server["pid"]), time.time() + 30
        while time.time() < deadline and abs(lowest - baseline) > 0.1 * baseline:
            time.sleep(1)
            lowest = min(lowest, rss_kib(server["pid"]))
        print(f"RSS baseline {baseline / 1024:.0f} MiB, after 20 prompts {lowest / 1024:.0f} MiB")
        assert abs(lowest - baseline) <= 0.1 * baseline, (baseline, lowest)
    finally:
        path.unlink()

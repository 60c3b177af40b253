"""Issue 9: a model loaded through ComfyUI-GGUF (city96) gives the base norms of the weights it holds.

The pack is not on PyPI and its code may not be committed here, so this runs only where it is installed:
``COMFYUI_GGUF_PATH`` names its folder (a clone of github.com/city96/ComfyUI-GGUF), or it sits in the host's
``custom_nodes/ComfyUI-GGUF``, and the ``gguf`` library (PyPI) is importable. CI has neither, so there it
skips, saying why (the only host test that does). To run it::

    git clone https://github.com/city96/ComfyUI-GGUF /tmp/ComfyUI-GGUF && pip install --target /tmp/gguf-site gguf
    COMFYUI_GGUF_PATH=/tmp/ComfyUI-GGUF PYTHONPATH=/tmp/gguf-site python -m pytest tests/host/test_gguf_host.py

A tiny Wan 2.1 model (widths 256, so K-quant blocks fit) is written as a real ``.gguf`` file with the ``gguf``
library's writer, every weight matrix in one of Q8_0, Q5_1, Q4_0, BF16, Q4_K, Q6_K (K-quants as random but valid
blocks: the library cannot quantize to them), then loaded exactly as the pack's UnetLoaderGGUF loads it
(``gguf_sd_loader``, its ``GGMLOps``, its ``GGUFModelPatcher``). The node's base norms must equal the norms of
the ``gguf`` library's own (NumPy) dequantization of the bytes in the file, and, for the quantized-from-fp32
types, lie within the quantization error of the fp32 originals. The pack's ``state_dict()`` gives meta tensors
for quantized weights, so this also checks that the weights are read from the modules themselves. Then the
same through Resize LoRA in process, and in a real server with both packs in custom_nodes (Unet Loader (GGUF)
-> Resize LoRA -> Save LoRA through /prompt, the model detected by ComfyUI itself).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest
import torch

from tests.host.comfy_models import HostModel, _patcher, comfyui_path, import_custom_node
from tests.host.family_loras import convention
from tests.host.family_models import UNET_CONFIGS

_PACK_NAME = "ComfyUI-GGUF"  # the folder name ComfyUI imports it under: its modules are "ComfyUI-GGUF.<name>"


def _pack_path():
    path = os.environ.get("COMFYUI_GGUF_PATH")
    if not path and comfyui_path():
        candidate = os.path.join(comfyui_path(), "custom_nodes", _PACK_NAME)
        path = candidate if os.path.isdir(candidate) else None
    return path if path and os.path.isfile(os.path.join(path, "__init__.py")) else None


@pytest.fixture(scope="module")
def gguf_pack(comfy_hosts):
    """ComfyUI-GGUF imported as ComfyUI imports a custom node folder; skips when it or ``gguf`` is absent."""
    path = _pack_path()
    if path is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("ComfyUI-GGUF is not installed (not on PyPI, so not in CI): set COMFYUI_GGUF_PATH to a clone "
                    "of github.com/city96/ComfyUI-GGUF and put the gguf library on the path to run this")
    return import_custom_node(_PACK_NAME, path)


def _wide_wan() -> tuple[str, dict, dict, object]:
    """(config class, unet config, fp32 diffusion-model state, its ModelPatcher) of a Wan 2.1 T2V at width 256."""
    import comfy.supported_models

    class_name, unet = UNET_CONFIGS["wan21_t2v"]
    unet = dict(unet, dim=256, ffn_dim=512, text_dim=256, freq_dim=256)
    config = getattr(comfy.supported_models, class_name)(dict(unet))
    with torch.device("cpu"):
        patcher = _patcher(config.get_model({}).to(torch.float32))  # seeded values
    state = {k[len("diffusion_model."):]: v.clone() for k, v in patcher.model.state_dict().items()
             if k.startswith("diffusion_model.")}
    return class_name, unet, state, patcher


_QUANTIZED = ("Q8_0", "Q5_1", "Q4_0")  # quantized from the weights by the gguf library
_RANDOM_BLOCKS = {"Q4_K": (0, 4), "Q6_K": (208, 210)}  # byte ranges of each block's fp16 scale(s)


def _encode(gguf, name: str, weight: np.ndarray, kind: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in _RANDOM_BLOCKS:  # random quants, fp16 scales set to small finite values
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        blocks = rng.integers(0, 256, size=(weight.size // block, size), dtype=np.uint8)
        low, high = _RANDOM_BLOCKS[kind]
        scales = rng.uniform(1e-4, 1e-3, size=(blocks.shape[0], (high - low) // 2)).astype(np.float16)
        blocks[:, low:high] = scales.view(np.uint8)
        return blocks.reshape(weight.shape[0], -1)
    return gguf.quants.quantize(weight, qtype)


def _write_gguf(path: str, state: dict) -> dict:
    """The state as a .gguf file; returns model key -> (qtype name, the gguf library's dequantized fp64)."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="wan")
    kinds = list(_QUANTIZED) + ["BF16", "F32"] + list(_RANDOM_BLOCKS)  # F32: what "dequantizes" to itself
    written, turn = {}, 0
    for key, tensor in sorted(state.items()):
        array = tensor.numpy()
        kind = "F32"
        if tensor.dim() == 2 and tensor.shape[1] % 256 == 0 and tensor.shape[0] > 1:
            kind = kinds[turn % len(kinds)]
            turn += 1
        elif tensor.dim() == 2 and tensor.shape[1] % 32 == 0 and tensor.shape[0] > 1:
            kind = _QUANTIZED[turn % len(_QUANTIZED)]
            turn += 1
        data = _encode(gguf, key, array, kind) if kind != "F32" else array
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(key, data, raw_dtype=qtype)
        if tensor.dim() == 2:
            written[key] = (kind, gguf.quants.dequantize(data, qtype).reshape(array.shape).astype(np.float64))
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _load_like_unet_loader_gguf(gguf_pack, path: str, class_name: str, unet: dict):
    """As the pack's UnetLoaderGGUF: its loader, its ops, its patcher (detection does not know tiny widths)."""
    import comfy.model_patcher
    import comfy.supported_models

    loader = importlib.import_module(f"{_PACK_NAME}.loader")
    ops = importlib.import_module(f"{_PACK_NAME}.ops")
    nodes = importlib.import_module(f"{_PACK_NAME}.nodes")
    sd = loader.gguf_sd_loader(path)
    config = getattr(comfy.supported_models, class_name)(dict(unet))
    config.custom_operations = ops.GGMLOps()
    with torch.device("cpu"):
        model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return nodes.GGUFModelPatcher.clone(patcher)


@pytest.fixture(scope="module")
def wan_gguf(gguf_pack, tmp_path_factory):
    """(fp32 state, the fp32 model's patcher, the GGUF model's patcher, model key -> (qtype, dequantized))."""
    class_name, unet, state, fp32 = _wide_wan()
    path = str(tmp_path_factory.mktemp("gguf") / "wan_tiny.gguf")
    written = _write_gguf(path, state)
    assert {kind for kind, _ in written.values()} == set(_QUANTIZED) | {"BF16", "F32"} | set(_RANDOM_BLOCKS)
    return state, fp32, _load_like_unet_loader_gguf(gguf_pack, path, class_name, unet), written


def _host(patcher) -> HostModel:
    import comfy.lora

    return HostModel("wan21_t2v", patcher, None, comfy.lora.model_lora_keys_unet(patcher.model, {}))


def test_a_gguf_model_gives_the_norms_of_its_dequantized_weights(comfy_hosts, pack, wan_gguf):
    host_base = importlib.import_module(f"{pack.__name__}.nodes.host").host_base
    reference_norms = importlib.import_module(f"{pack.__name__}.core.norms").reference_norms
    lora_from_state_dict = importlib.import_module(f"{pack.__name__}.core.formats").lora_from_state_dict
    state, fp32, patcher, written = wan_gguf
    stored = patcher.model.state_dict()
    dequant = importlib.import_module(f"{_PACK_NAME}.dequant")
    quantized = [k for k, v in dict(patcher.model.named_parameters()).items() if dequant.is_quantized(v)]
    assert len(quantized) >= 20  # the model really holds GGML tensors
    assert all(stored[k].device.type == "meta" for k in quantized)  # what the pack's state_dict gives for them

    # written for the fp32 twin: the GGUF model's state_dict (so its key map) also names the pack's fake
    # "<largest layer>.temp.weight", which no trainer targets
    lora = convention("wan21_t2v", "musubi").write(_host(fp32), 0)
    layers = list(lora_from_state_dict(lora, {}).layers.values())
    base, placed, missing = host_base(patcher, None, layers)
    assert not missing and len(placed) == len(layers)
    norms = reference_norms(base, [(layer.name, layer.offset) for layer in placed.values()])
    checked = {}
    for (name, offset), got in norms.items():
        key = name[len("diffusion_model."):] + ".weight"
        assert offset is None
        kind, reference = written[key]
        want = torch.from_numpy(reference)
        assert got["frobenius"] == pytest.approx(float(want.norm()), rel=1e-5), (key, kind)
        assert got["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(want, 2)), rel=1e-3), (key, kind)
        if kind in _QUANTIZED or kind in ("BF16", "F32"):  # within the quantization error of the fp32 original
            original = state[key].to(torch.float64)
            error = float((want - original).norm())
            assert abs(got["frobenius"] - float(original.norm())) <= error + 1e-5 * float(original.norm())
            assert error <= {"Q8_0": 0.01, "Q5_1": 0.05, "Q4_0": 0.12, "BF16": 0.005, "F32": 0.0}[kind] * float(original.norm())
        checked[kind] = checked.get(kind, 0) + 1
    assert set(checked) == set(_QUANTIZED) | {"BF16", "F32"} | set(_RANDOM_BLOCKS), checked
    for name, offset in norms:  # each weight read is a private copy: never the pack's tensor or its file mapping
        weight = base.weight(name, offset)
        weight.zero_()
        assert float(base.weight(name, offset).norm()) == pytest.approx(norms[(name, offset)]["frobenius"], rel=1e-5)
    fp32_base, _, _ = host_base(fp32, None, layers)
    assert fp32_base.fingerprint != base.fingerprint  # its own norms cache: never the fp32 model's norms

    # The LoRA applied as LoraLoader applies it, the model loaded (the pack hangs the patches on its tensors):
    # the norms are still the unpatched weights', from the same cache entry.
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    patched.patch_model()
    try:
        params = dict(patched.model.named_parameters())
        targets = {layer.name + ".weight" for layer in placed.values()}
        hung = {k for k, v in params.items() if getattr(v, "patches", None)}
        assert hung == {k for k in targets if dequant.is_quantized(params[k])}  # quantized: patches hung on them
        assert targets - hung == set(patched.backup) and targets - hung  # F32: patched in place, backed up
        again, _, _ = host_base(patched, None, layers)
        assert again.fingerprint == base.fingerprint
        assert reference_norms(again, list(norms)) == norms
    finally:
        patched.unpatch_model()


def _expected_ranks(wan_gguf, seed: int):
    """(the fp32 twin's host, a musubi LoRA for it, a fro_ckpt threshold, model key -> rank to keep): the ranks
    computed here from the host's own ΔW and the GGUF file's dequantized weights (not the fp32 originals)."""
    from tests.host.family_loras import host_delta, host_load
    from tests.host.test_host_base import _threshold_below

    _, fp32, _, written = wan_gguf
    fp32_host = _host(fp32)  # the same map and shapes: the host's ΔW computed on plain tensors
    lora = convention("wan21_t2v", "musubi").write(fp32_host, seed)
    deltas = host_delta(fp32_host, host_load(fp32_host, lora))
    weights = {"diffusion_model." + key: torch.from_numpy(w) for key, (_, w) in written.items()}
    scores = {key: torch.log10(torch.linalg.svdvals(delta.double().flatten(1)) / weights[key].norm())
              for key, delta in deltas.items()}
    threshold = _threshold_below(scores)
    kept = {key: int((s > threshold).sum()) for key, s in scores.items()}
    assert sum(kept.values()) < sum(int(s.isfinite().sum()) for s in scores.values())  # the threshold cuts
    return fp32_host, lora, threshold, kept


def _assert_ranks(fp32_host, load, kept: dict) -> None:
    from tests.host.family_loras import host_delta

    got = host_delta(fp32_host, load)
    for key, rank in kept.items():
        found = int(torch.linalg.matrix_rank(got[key].flatten(1).double(), rtol=1e-6)) if key in got else 0
        assert found == rank, key


def test_resize_lora_on_a_gguf_model_keeps_the_ranks_its_weights_decide(comfy_hosts, pack, folders, wan_gguf):
    """Resize LoRA (fro_ckpt=1, thr) with the GGUF MODEL connected: per layer, the ranks computed here from the
    host's ΔW and the file's dequantized weights; the saved file loads with zero unloaded keys."""
    from safetensors.torch import save_file

    from tests.host.family_loras import host_load

    loras_dir, _ = folders
    _, _, patcher, _ = wan_gguf
    fp32_host, state, threshold, kept = _expected_ranks(wan_gguf, 1)

    save_file(state, str(loras_dir / "wan.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("wan.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "thr", 0, 1.0, "svd", 0,
                                                        raw_recipe=f"fro_ckpt=1,thr={threshold}")
    resized, _ = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=patcher)["result"]
    saved = nodes["LoraResize_SaveLoRA"]().save(resized, "resized/wan", "kohya", "fp32")["result"][0]
    load = host_load(_host(patcher), saved)
    assert load.unloaded == []
    _assert_ranks(fp32_host, load, kept)


def test_a_server_with_comfyui_gguf_resizes_against_its_unet_loader_gguf_model(comfy_hosts, gguf_pack, wan_gguf,
                                                                               tmp_path):
    """Both packs in a real server's custom_nodes: Unet Loader (GGUF) -> Resize LoRA (its MODEL connected,
    fro_ckpt) -> Save LoRA through /prompt; the saved file keeps the ranks the GGUF weights decide and loads
    with zero unloaded keys."""
    pytest.importorskip("requests")
    from safetensors.torch import save_file

    from tests.host.family_loras import host_load
    from tests.host.server import run_prompt, running_server

    state = wan_gguf[0]
    fp32_host, lora, threshold, kept = _expected_ranks(wan_gguf, 2)
    base = tmp_path / "base"
    base.mkdir()
    with running_server(base, {_PACK_NAME: _pack_path()}) as server:
        (base / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
        _write_gguf(str(base / "models" / "diffusion_models" / "wan_tiny.gguf"), state)
        save_file(lora, str(server["loras"] / "wan.safetensors"))
        recipe = {"fro_ckpt": 0.0, "spn_ckpt": 0.0, "spn_lora": 0.0, "fro_lora": 0.0, "subspace": 0.0,
                  "params": 0.0, "selection": "thr", "value": -3.5, "rescale": 1.0, "reducer": "svd", "seed": 0,
                  "raw_recipe": f"fro_ckpt=1,thr={threshold}", "niter": 2, "pad": 0}
        prompt = {"1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "wan_tiny.gguf"}},
                  "2": {"class_type": "LoraResize_LoadLoRAForResize", "inputs": {"lora_name": "wan.safetensors"}},
                  "3": {"class_type": "LoraResize_ScoreRecipe", "inputs": recipe},
                  "4": {"class_type": "LoraResize_ResizeLoRA",
                        "inputs": {"lora": ["2", 0], "recipe": ["3", 0], "model": ["1", 0]}},
                  "5": {"class_type": "LoraResize_SaveLoRA",
                        "inputs": {"lora": ["4", 0], "filename_prefix": "resized/wan", "format": "kohya",
                                   "dtype": "fp32"}}}
        entry = run_prompt(server, prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (saved,) = (server["loras"] / "resized").glob("wan*.safetensors")
        load = host_load(fp32_host, saved)
        assert load.unloaded == []
        _assert_ranks(fp32_host, load, kept)

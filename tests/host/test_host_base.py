"""Issue 9 deliverable 3: inside ComfyUI the host decides which model weight each LoRA layer is scored against.

On the tiny real models of every family (tests/host/family_models.py) and LoRAs in each trainer's key names
(tests/host/family_loras.py), with ComfyUI 0.3.64 in process:
- every layer the host patches is placed by the node's base (nodes/host_base.py) on exactly the host's target,
  (key, (dim, start, length)) slices included: the host's adapter for that target computes the same ΔW as the
  layer; and the base norms the node uses equal spectral and Frobenius norms computed here straight from the
  model weight, sliced as ``comfy.lora.load_lora`` slices it (fp64 reference, relative 1e-5);
- a model loaded as ComfyUI loads it with ``weight_dtype`` fp8 (e4m3fn, e5m2) or as scaled fp8 (``scale_weight``
  beside each Linear weight, ComfyUI's own scaled_fp8 ops) gives the norms of its dequantized weights exactly, and
  the fp32 and bf16 originals' norms within fp8 rounding;
- the rank chart groups the blocks of every family by the host's model keys (and by file keys without a model);
- a base-aware Resize LoRA (fro_ckpt=1, thr=...) of families no CLI table knows keeps, per layer, exactly the
  ranks computed here from the host's own ΔW and weights, and the saved file loads in the host with zero unloaded
  keys, patching the same weights with the truncated ΔW;
- layers the host places nowhere are an error naming how many and which, before any work.
GGUF weights: tests/host/test_gguf_host.py (runs only where ComfyUI-GGUF is installed). Not covered here: VRAM
placement (the tests run ComfyUI with --cpu).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from tests.host.comfy_models import HostModel, random_lora
from tests.host.family_loras import CONVENTIONS, convention, host_delta, host_load, patched_weights
from tests.host.family_models import FAMILY_BUILDERS, UNET_CONFIGS, host_state

_LOADED = [c for c in CONVENTIONS if c.host_loads]
_CASES = [(c.family, c.name) for c in _LOADED] + [("sdxl", "kohya"), ("flux", "kohya")]


def _host(comfy_hosts, family: str) -> HostModel:
    return comfy_hosts[family]() if family in ("sdxl", "flux") else FAMILY_BUILDERS[family]()


def _state(host: HostModel, family: str, name: str) -> dict:
    return random_lora(host, every=5) if family in ("sdxl", "flux") else convention(family, name).write(host, 0)


def _module(pack, name: str):
    return importlib.import_module(f"{pack.__name__}.{name}")


def _layers(pack, state: dict) -> list:
    return list(_module(pack, "core.formats").lora_from_state_dict(state, {}).layers.values())


def _targets(load) -> dict:
    """Host patch target -> (adapter, function) for the low-rank patches: (model key, offset or None)."""
    out = {}
    for key, adapter in load.patches.items():
        if isinstance(adapter, tuple):
            continue
        if isinstance(key, str):
            out[(key, None)] = (adapter, None)
        else:
            out[(key[0], tuple(key[1]) if key[1] is not None else None)] = (adapter, key[2] if len(key) > 2 else None)
    return out


def _host_slice(state: dict, key: str, offset) -> torch.Tensor:
    """The part of a stored weight a host patch target changes, in fp64: ``narrow(dim, start, length)``."""
    weight = state[key].to(torch.float64)
    return weight if offset is None else weight.narrow(offset[0], offset[1], offset[2])


def _model_key(layer) -> str:
    assert "#dim" not in layer.name  # the host slices rows in every 0.3.64 map
    return layer.name + ".weight"


@pytest.mark.parametrize("family,name", _CASES, ids=[f"{f}-{n}" for f, n in _CASES])
def test_node_base_places_every_layer_the_host_patches_and_its_norms_are_the_weights(comfy_hosts, pack, family,
                                                                                      name):
    host = _host(comfy_hosts, family)
    state = _state(host, family, name)
    load = host_load(host, state)
    assert not load.unloaded
    layers = _layers(pack, state)
    base, placed, missing = _module(pack, "nodes.host").host_base(host.model, host.clip, layers)
    assert [layer.source_key for layer in missing] == []
    assert len(placed) == load.lowrank == len(layers)
    targets = _targets(load)
    scored = {(_model_key(layer), layer.offset) for layer in placed.values()}
    assert scored == set(targets)  # the host's own slices, every one of them
    delta_weight = _module(pack, "core.delta").delta_weight
    by_key = {_module(pack, "core.formats.reader").layer_key(layer): layer for layer in layers}
    for key, layer in placed.items():  # paired as the host pairs them: its adapter gives this layer's ΔW
        adapter, function = targets[(_model_key(layer), layer.offset)]
        shape = base.shape(layer.name, layer.offset)
        theirs = adapter.calculate_weight(torch.zeros(shape), _model_key(layer), 1.0, 1.0, None,
                                          function or (lambda a: a), torch.float32)
        ours = delta_weight(by_key[key]).to(torch.float32).reshape(shape)
        where = base.placement(layer.name, layer.offset)
        ours = where.function(ours) if where.function is not None else ours
        assert float((theirs - ours).norm()) <= 1e-4 * float(theirs.norm()), key
    norms = _module(pack, "core.norms").reference_norms(base, [(lay.name, lay.offset) for lay in placed.values()])
    spectral_norm = _module(pack, "core.norms").spectral_norm
    weights = host_state(host)
    for layer in placed.values():
        weight = _host_slice(weights, _model_key(layer), layer.offset)
        got = norms[(layer.name, layer.offset)]
        assert got["frobenius"] == pytest.approx(float(weight.flatten(1).norm()), rel=1e-5), layer.name
        # the engine's own estimator on the slice taken here: the same matrix, so the same number
        assert got["spectral"] == pytest.approx(spectral_norm(weight.to(torch.float32)), rel=1e-5), layer.name


# core.norms.spectral_norm's Lanczos stops when its residual proves a singular value within 1e-3 of its Ritz value;
# on these tiny random Qwen-Image weights that value is σ₂, not σ₁ (32×32 add_q_proj of block 1: 1.7520 for
# σ₁ = 1.8085, σ₂ = 1.7520). A core bug, pinned here until core/norms.py guards against it.
@pytest.mark.parametrize("family,name", _CASES, ids=[f"{f}-{n}" for f, n in _CASES])
def test_node_base_spectral_norms_are_the_largest_singular_values(comfy_hosts, pack, family, name):
    host = _host(comfy_hosts, family)
    base, placed, _ = _module(pack, "nodes.host").host_base(host.model, host.clip,
                                                            _layers(pack, _state(host, family, name)))
    norms = _module(pack, "core.norms").reference_norms(base, [(lay.name, lay.offset) for lay in placed.values()])
    weights = host_state(host)
    for layer in placed.values():
        exact = float(torch.linalg.matrix_norm(_host_slice(weights, _model_key(layer), layer.offset).flatten(1), 2))
        assert norms[(layer.name, layer.offset)]["spectral"] == pytest.approx(exact, rel=1e-3), layer.name  # its bound


# --- fp8 and scaled fp8, loaded as ComfyUI loads them -----------------------------------------------------------

_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_FP8_ROUNDING = {torch.float8_e4m3fn: 2.0 ** -4, torch.float8_e5m2: 2.0 ** -3}  # half an ulp, relative


def _loaded_as(host: HostModel, family: str, weight_dtype: torch.dtype, scaled: bool = False) -> HostModel:
    """The family's model as ``comfy.sd.load_diffusion_model_state_dict`` builds it after detection, for a
    diffusion-model file of the host's weights: ``weight_dtype`` (UNETLoader's fp8_e4m3fn / fp8_e5m2, or bf16)
    with fp32 compute, or a scaled-fp8 file (``scaled_fp8`` marker, ``scale_weight`` per Linear, weights divided
    by it). Model detection itself does not know these tiny widths, so the config is the family's own."""
    import comfy.model_patcher
    import comfy.supported_models

    class_name, unet = UNET_CONFIGS[family]
    config = getattr(comfy.supported_models, class_name)(dict(unet))
    file = {k[len("diffusion_model."):]: v.clone() for k, v in host.model.model.state_dict().items()
            if k.startswith("diffusion_model.")}
    if scaled:
        config.scaled_fp8 = weight_dtype  # what model detection sets when the file has the "scaled_fp8" key
        for path, module in host.model.model.diffusion_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = file[f"{path}.weight"]
                scale = weight.abs().max().to(torch.float32) / _FP8_MAX[weight_dtype]
                file[f"{path}.weight"] = (weight / scale).to(weight_dtype)
                file[f"{path}.scale_weight"] = scale
    config.set_inference_dtype(weight_dtype, torch.float32)
    with torch.device("cpu"):
        model = config.get_model(file, "")
    model.load_model_weights(file, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    return HostModel(host.arch, patcher, None, host.key_map)


def _dequantized(patcher, key: str) -> torch.Tensor:
    """A stored weight times its op's ``scale_weight`` when it has one, in fp64: what the host patches."""
    stored = patcher.model.state_dict()
    scale = stored.get(key[: -len("weight")] + "scale_weight")
    weight = stored[key].to(torch.float64)
    return weight * scale.to(torch.float64) if scale is not None else weight


_FP8_CASES = [("wan21_t2v", "musubi"), ("qwen_image", "diffusers"), ("hidream", "comfy")]
_FP8_KINDS = [(torch.float8_e4m3fn, False), (torch.float8_e5m2, False), (torch.float8_e4m3fn, True)]


@pytest.mark.parametrize("weight_dtype,scaled", _FP8_KINDS, ids=["fp8_e4m3fn", "fp8_e5m2", "scaled_fp8_e4m3fn"])
@pytest.mark.parametrize("family,name", _FP8_CASES, ids=[f"{f}-{n}" for f, n in _FP8_CASES])
def test_an_fp8_model_gives_the_norms_of_its_originals_within_fp8_rounding(comfy_hosts, pack, family, name,
                                                                           weight_dtype, scaled):
    host = FAMILY_BUILDERS[family]()
    layers = _layers(pack, convention(family, name).write(host, 0))
    host_base = _module(pack, "nodes.host").host_base
    reference_norms = _module(pack, "core.norms").reference_norms
    fp8 = _loaded_as(host, family, weight_dtype, scaled)
    bf16 = _loaded_as(host, family, torch.bfloat16)
    norms, fingerprints = {}, {}
    for label, model in (("fp32", host.model), ("bf16", bf16.model), ("fp8", fp8.model)):
        base, placed, missing = host_base(model, None, layers)
        assert not missing and len(placed) == len(layers)
        targets = [(layer.name, layer.offset) for layer in placed.values()]
        norms[label], fingerprints[label] = reference_norms(base, targets), base.fingerprint
    assert len(set(fingerprints.values())) == 3  # three caches: never the fp32 norms for the fp8 model
    stored = fp8.model.model.state_dict()
    placed_keys = {(name + ".weight") for name, _ in norms["fp8"]}
    assert {str(stored[k].dtype) for k in placed_keys} == {str(weight_dtype)}  # really stored as fp8
    tolerance = _FP8_ROUNDING[weight_dtype]
    for (layer, offset), got in norms["fp8"].items():
        weight = _dequantized(fp8.model, layer + ".weight")
        weight = weight if offset is None else weight.narrow(offset[0], offset[1], offset[2])
        assert got["frobenius"] == pytest.approx(float(weight.flatten(1).norm()), rel=1e-5)
        assert got["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(weight.flatten(1), 2)), rel=1e-5)
        for original in ("fp32", "bf16"):
            for kind in ("spectral", "frobenius"):
                want = norms[original][(layer, offset)][kind]
                assert abs(got[kind] - want) <= (tolerance + 2.0 ** -8) * want, (original, layer, kind)
        if scaled:  # the op's scale is applied: the raw fp8 values are a different matrix altogether
            raw = stored[layer + ".weight"].to(torch.float64)
            raw = raw if offset is None else raw.narrow(offset[0], offset[1], offset[2])
            assert float(raw.flatten(1).norm()) > 10 * got["frobenius"]


# --- the rank chart --------------------------------------------------------------------------------------------

# family -> the numbered block families of its diffusion model (ComfyUI's module names)
_BLOCKS = {"wan21_t2v": "blocks", "wan21_i2v": "blocks", "wan22_ti2v_5b": "blocks", "qwen_image": "transformer_blocks",
           "ltxv": "transformer_blocks", "sd3": "joint_blocks", "hunyuan_video": "double_blocks|single_blocks",
           "chroma": "double_blocks|single_blocks", "flux": "double_blocks|single_blocks",
           "hidream": "double_stream_blocks|single_stream_blocks", "lumina2": "layers|noise_refiner|context_refiner",
           "sdxl_refiner": "input_blocks|output_blocks", "sdxl": "input_blocks|output_blocks"}


def _expected_group(family: str, model_key: str) -> str:
    """The chart group of a model key, by the family's block names: 'blocks.1', 'middle_block', 'clip_g' ..."""
    if not model_key.startswith("diffusion_model."):
        return model_key.split(".")[0]  # a text encoder: one group
    match = re.match(rf"diffusion_model\.(?:({_BLOCKS[family]})\.(\d+)\.|(middle_block)\.|([a-z_]+))", model_key)
    return f"{match.group(1)}.{match.group(2)}" if match.group(1) else match.group(3) or match.group(4)


@pytest.mark.parametrize("family,name", _CASES, ids=[f"{f}-{n}" for f, n in _CASES])
def test_the_chart_groups_every_familys_blocks(comfy_hosts, pack, folders, family, name):
    loras_dir, _ = folders
    host = _host(comfy_hosts, family)
    save_file(_state(host, family, name), str(loras_dir / "family.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("family.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "rank", 2, 1.0, "svd", 0)
    output = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model, clip=host.clip)
    chart = output["ui"]["lora_resize_chart"][0]
    _, placed, _ = _module(pack, "nodes.host").host_base(host.model, host.clip, list(lora.lora.layers.values()))
    expected: dict[str, list[int]] = {}
    for layer in lora.lora.layers.values():
        key = _module(pack, "core.formats.reader").layer_key(layer)
        ranks = expected.setdefault(_expected_group(family, placed[key].name), [0, 0])
        ranks[0] += layer.rank
        ranks[1] += min(2, layer.rank)
    assert {b["block"]: [b["original"], b["kept"]] for b in chart["blocks"]} == expected
    numbered = [b["block"] for b in chart["blocks"] if b["block"].split(".")[-1].isdigit()]
    assert len(numbered) >= 2
    for first, second in zip(numbered, numbered[1:]):  # numbers in numeric order inside each block family
        if first.split(".")[0] == second.split(".")[0]:
            assert int(first.split(".")[1]) < int(second.split(".")[1])


_VERBATIM = [("wan21_i2v", "musubi"), ("wan21_t2v", "comfy"), ("hidream", "lycoris"), ("hidream", "simpletuner"),
             ("lumina2", "kohya"), ("sd3", "kohya_unet"), ("qwen_image", "lightning")]


@pytest.mark.parametrize("family,name", _VERBATIM, ids=[f"{f}-{n}" for f, n in _VERBATIM])
def test_without_a_model_the_chart_groups_the_files_own_names_the_same_way(comfy_hosts, pack, folders, family,
                                                                           name):
    loras_dir, _ = folders
    host = FAMILY_BUILDERS[family]()
    save_file(convention(family, name).write(host, 0), str(loras_dir / "family.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("family.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "rank", 2, 1.0, "svd", 0)
    alone = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe)["ui"]["lora_resize_chart"][0]["blocks"]
    hosted = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model)["ui"]["lora_resize_chart"][0]
    assert alone == hosted["blocks"]


# --- a base-aware resize of families no CLI table knows ---------------------------------------------------------

_BASE_AWARE = [("wan21_i2v", "musubi"), ("wan21_t2v", "lightx2v"), ("wan22_ti2v_5b", "comfy"), ("hidream", "comfy"),
               ("lumina2", "kohya"), ("sd3", "kohya_unet")]


def _threshold_below(scores: dict[str, torch.Tensor]) -> float:
    """A threshold under every layer's top score (no layer drops out) in the widest gap between scores there:
    no σ sits within rounding of it."""
    lowest_top = min(float(s[0]) for s in scores.values())
    window = sorted({float(v) for s in scores.values() for v in s if lowest_top - 0.5 < float(v) < lowest_top})
    edges = [lowest_top - 0.5, *window, lowest_top]
    gap, low = max((b - a, a) for a, b in zip(edges, edges[1:]))
    assert gap > 1e-3
    return round(low + gap / 2, 6)


def _truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.to(torch.float64).flatten(1), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).reshape(delta.shape)


@pytest.mark.parametrize("family,name", _BASE_AWARE, ids=[f"{f}-{n}" for f, n in _BASE_AWARE])
def test_a_base_aware_resize_keeps_the_ranks_the_hosts_weights_decide(comfy_hosts, pack, folders, family,
                                                                      name):
    loras_dir, checkpoints_dir = folders
    host = FAMILY_BUILDERS[family]()
    state = convention(family, name).write(host, 0)
    original = host_load(host, state)
    deltas = {key: delta for key, delta in host_delta(host, original).items()
              if (key, None) in _targets(original)}
    weights = host_state(host)
    # score of σ against the base (fro_ckpt=1): log10(σ / ‖W‖_F), from the host's own ΔW and weight
    scores = {key: torch.log10(torch.linalg.svdvals(delta.to(torch.float64).flatten(1))
                               / weights[key].to(torch.float64).norm()) for key, delta in deltas.items()}
    threshold = _threshold_below(scores)
    kept = {key: int((s > threshold).sum()) for key, s in scores.items()}
    assert min(kept.values()) >= 1 and sum(kept.values()) < sum(int(s.isfinite().sum()) for s in scores.values())

    save_file(state, str(loras_dir / "family.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("family.safetensors")
    recipe, text = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "thr", 0, 1.0, "svd", 0,
                                                           raw_recipe=f"fro_ckpt=1,thr={threshold}")
    import comfy.model_management

    loaded = list(comfy.model_management.current_loaded_models)
    resized, report = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model)["result"]
    assert comfy.model_management.current_loaded_models == loaded  # read where it lies: never loaded for this
    saved = nodes["LoraResize_SaveLoRA"]().save(resized, "resized/family", "kohya", "fp32")["result"][0]

    load = host_load(host, saved)
    assert load.unloaded == []
    assert patched_weights(load) == patched_weights(original)
    got = host_delta(host, load)
    for key, delta in deltas.items():
        if kept[key]:
            assert int(torch.linalg.matrix_rank(got[key].flatten(1).double(), rtol=1e-6)) == kept[key], key
            want = _truncated(delta, kept[key])
            assert float((got[key].double() - want).norm()) <= 1e-5 * float(delta.norm()), key
    for key, delta in host_delta(host, original).items():  # lightx2v's full diffs ride along unchanged
        if key not in deltas:
            assert torch.equal(got[key], delta), key

    (entries,) = json.loads((checkpoints_dir / ".lora_resize_norms.json").read_text()).values()  # one model
    assert len(entries) == len(deltas)
    for key in deltas:  # cached under the host's model key, with that weight's own norm
        frobenius = float(weights[key].to(torch.float64).norm())
        assert entries[key[: -len(".weight")]]["frobenius"] == pytest.approx(frobenius, rel=1e-5), key


# --- what the host does not place -------------------------------------------------------------------------------


def test_layers_the_host_places_nowhere_are_named_before_any_work(comfy_hosts, pack, folders):
    """An I2V LoRA on a T2V model: its 4 image cross-attention layers (k_img, v_img per block) have no weight."""
    loras_dir, checkpoints_dir = folders
    i2v = FAMILY_BUILDERS["wan21_i2v"]()
    t2v = FAMILY_BUILDERS["wan21_t2v"]()
    save_file(convention("wan21_i2v", "musubi").write(i2v, 0), str(loras_dir / "i2v.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("i2v.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(1.0, 0, 0, 0, 0, 0, "thr", -2.0, 1.0, "svd", 0)
    with pytest.raises(Exception, match=r"i2v\.safetensors: 4 of 24 LoRA layers are placed on no weight by "
                                        r"ComfyUI's key map .*lora_unet_blocks_0_cross_attn_k_img") as info:
        nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=t2v.model)
    assert type(info.value).__name__ == "LoraError"
    assert not (checkpoints_dir / ".lora_resize_norms.json").exists()
    rank, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "rank", 2, 1.0, "svd", 0)
    assert nodes["LoraResize_ResizeLoRA"]().resize(lora, rank, model=t2v.model)["result"][0].lora.layers


def test_keys_the_host_renames_before_mapping_are_followed(comfy_hosts, pack):
    """Wan Fun LoRAs (``lora_unet__blocks_...``): ComfyUI's convert_lora renames them before its key map; the
    node's base follows the host's own renaming and places every layer on the weight the host patches."""
    host = FAMILY_BUILDERS["wan21_t2v"]()
    state = {key.replace("lora_unet_", "lora_unet__", 1): value
             for key, value in convention("wan21_t2v", "musubi").write(host, 0).items()}
    assert "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in state  # what the host's converter looks for
    load = host_load(host, state)
    assert not load.unloaded and load.lowrank == 20
    layers = _layers(pack, state)
    base, placed, missing = _module(pack, "nodes.host").host_base(host.model, None, layers)
    assert not missing
    assert {(_model_key(layer), layer.offset) for layer in placed.values()} == set(_targets(load))
    norms = _module(pack, "core.norms").reference_norms(base, [(lay.name, lay.offset) for lay in placed.values()],
                                                        kinds=("frobenius",))
    weights = host_state(host)
    for (name, _), values in norms.items():
        assert values["frobenius"] == pytest.approx(float(weights[name + ".weight"].double().norm()), rel=1e-5)


def test_text_encoder_layers_without_the_clip_ask_for_the_clip(comfy_hosts, pack, folders):
    """SD3 kohya with CLIP-L/G and T5 layers, MODEL connected alone: the encoder layers are counted and named."""
    loras_dir, _ = folders
    host = FAMILY_BUILDERS["sd3"]()
    unet_only = len(_layers(pack, convention("sd3", "kohya_unet").write(host, 0)))
    save_file(convention("sd3", "kohya").write(host, 0), str(loras_dir / "sd3.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("sd3.safetensors")
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 1.0, 0, 0, 0, 0, "thr", -2.0, 1.0, "svd", 0)
    missing = len(lora.lora) - unet_only
    with pytest.raises(Exception, match=rf"{missing} of {len(lora.lora)} LoRA layers are placed on no weight .*"
                                        r"lora_te\d_.*Fix: connect the CLIP too"):
        nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model)
    assert missing > 0 and nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model, clip=host.clip)


def test_a_patched_model_still_scores_against_its_unpatched_weights(comfy_hosts, pack):
    import comfy.model_management
    import comfy.sd

    host = FAMILY_BUILDERS["wan21_t2v"]()
    state = convention("wan21_t2v", "comfy").write(host, 0)
    layers = _layers(pack, state)
    host_base = _module(pack, "nodes.host").host_base
    reference_norms = _module(pack, "core.norms").reference_norms
    clean, placed, _ = host_base(host.model, None, layers)
    targets = [(layer.name, layer.offset) for layer in placed.values()]
    before = reference_norms(clean, targets)
    model, _ = comfy.sd.load_lora_for_models(host.model, None, state, 1.0, 0.0)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    try:
        key = next(iter(model.backup))
        assert not torch.equal(model.model.state_dict()[key], model.backup[key].weight)  # patched in place now
        after, _, _ = host_base(model, None, layers)
        assert reference_norms(after, targets) == before
        assert after.fingerprint == clean.fingerprint
    finally:
        comfy.model_management.unload_all_models()


def test_base_norms_go_to_the_gpu_only_when_the_largest_slice_fits_in_its_free_memory(comfy_hosts, pack,
                                                                                       monkeypatch):
    """The rule of nodes/host.py scoring_device, with the host's free-VRAM answer set (these tests run --cpu):
    the model's GPU when four fp32 copies of the largest base slice fit, else the CPU; the weights stay put."""
    import comfy.model_management
    import comfy.model_patcher

    host = FAMILY_BUILDERS["hidream"]()
    layers = _layers(pack, convention("hidream", "comfy").write(host, 0))
    gpu = torch.device("cuda", 0)
    on_gpu = comfy.model_patcher.ModelPatcher(host.model.model, load_device=gpu, offload_device=torch.device("cpu"))
    host_module = _module(pack, "nodes.host")
    base, placed, _ = host_module.host_base(on_gpu, None, layers)
    largest = max(math.prod(base.shape(layer.name, layer.offset)) for layer in placed.values())
    assert base.largest_slice() == largest
    asked = []
    for free, want in ((16 * largest, gpu), (16 * largest - 1, torch.device("cpu"))):
        monkeypatch.setattr(comfy.model_management, "get_free_memory",
                            lambda device=None, torch_free_too=False, free=free: asked.append(device) or free)
        assert host_module.scoring_device(on_gpu, base) == want
    assert asked == [gpu, gpu]
    assert {t.device.type for t in host.model.model.state_dict().values()} == {"cpu"}


def test_dora_magnitudes_are_refitted_on_the_weights_the_host_places(comfy_hosts, pack, folders):
    """A DoRA LoRA of a family no table knows: each rebuilt layer's magnitude is refitted against the host's weight
    for that layer (ResizeLoRA hands the engine the same base under the LoRA's own layer names)."""
    loras_dir, _ = folders
    host = FAMILY_BUILDERS["wan21_t2v"]()
    state = convention("wan21_t2v", "musubi").write(host, 0)
    weights = host_state(host)
    delta_weight = _module(pack, "core.delta").delta_weight
    g = torch.Generator().manual_seed(5)
    for layer in _layers(pack, state):  # magnitudes near ‖W + ΔW‖ per output row, as a trained DoRA has them
        weight = weights[host.key_map[layer.source_key]]
        row_norms = (weight + delta_weight(layer).float()).norm(dim=1, keepdim=True)
        state[layer.source_key + ".dora_scale"] = (row_norms * (1 + 0.1 * torch.rand(row_norms.shape, generator=g)))
    save_file(state, str(loras_dir / "dora.safetensors"))
    nodes = pack.NODE_CLASS_MAPPINGS
    lora, _ = nodes["LoraResize_LoadLoRAForResize"]().load("dora.safetensors")
    assert all(layer.dora_scale is not None for layer in lora.lora)
    recipe, _ = nodes["LoraResize_ScoreRecipe"]().build(0, 0, 0, 0, 0, 0, "rank", 2, 1.0, "svd", 0)
    resized, report = nodes["LoraResize_ResizeLoRA"]().resize(lora, recipe, model=host.model)["result"]
    assert "20 DoRA layers: magnitudes refitted to the resized directions on the base" in report
    refit_dora = _module(pack, "core.resize").refit_dora
    for key, layer in resized.lora.layers.items():
        source = lora.lora.layers[key]
        want = refit_dora(source, layer, weights[host.key_map[source.source_key]])
        assert torch.allclose(layer.dora_scale, want, rtol=1e-5, atol=0), key
        assert not torch.allclose(layer.dora_scale, source.dora_scale, rtol=1e-3)  # really refitted


def test_a_layer_the_host_maps_through_a_function_is_scored_in_the_files_rows(comfy_hosts, pack):
    """Flux diffusers ``norm_out.linear``: ComfyUI adds swap_scale_shift(ΔW_file) to final_layer.adaLN_modulation.1.
    Read by the Flux table (halves swapped into the model's rows) or verbatim (the file's rows, the host's function
    then brings the base weight into them), the subspace references are |uᵢᵀ swap(W) vᵢ| for the file's ΔW = U S Vᵀ
    and the norms are the weight's."""
    import comfy.utils

    host = comfy_hosts["flux"]()
    target = "diffusion_model.final_layer.adaLN_modulation.1.weight"
    weight = host_state(host)[target].to(torch.float64)
    g = torch.Generator().manual_seed(7)
    down, up = torch.randn(4, weight.shape[1], generator=g) / 8, torch.randn(weight.shape[0], 4, generator=g) / 10
    state = {"transformer.norm_out.linear.lora_A.weight": down, "transformer.norm_out.linear.lora_B.weight": up}
    assert host_load(host, state).lowrank == 1
    U, S, Vh = torch.linalg.svd(up.double() @ down.double(), full_matrices=False)
    swapped = comfy.utils.swap_scale_shift(weight)
    want = ((U[:, :4].T @ swapped) * Vh[:4]).sum(dim=1).abs()
    formats = _module(pack, "core.formats")
    recipe = _module(pack, "core.recipe").parse_recipe("subspace=1,spn_ckpt=1,thr=-3")
    decompose = _module(pack, "core.decompose").decompose
    readings = {"table": formats.lora_from_state_dict(state, {}),
                "verbatim": formats.lora_from_state_dict(state, {}, arch="wan")}  # a table without it
    assert [layer.verbatim for layer in readings["table"]] == [False]
    assert [layer.verbatim for layer in readings["verbatim"]] == [True]
    for how, lora in readings.items():
        base, placed, missing = _module(pack, "nodes.host").host_base(host.model, host.clip, list(lora))
        (layer,) = placed.values()
        assert not missing and layer.name + ".weight" == target
        assert (base.placement(layer.name).function is None) == (how == "table")
        items = [dataclasses.replace(item, layer=placed[item.key]) for item in decompose(lora)]
        (refs,) = _module(pack, "core.resize").reference_table(items, [recipe], base).values()
        assert torch.allclose(refs.subspace.double(), want, rtol=1e-4, atol=1e-6), how
        assert refs.spectral == pytest.approx(float(torch.linalg.matrix_norm(weight, 2)), rel=1e-3)


_ARCH_OF = {"wan21_t2v": "wan", "wan21_i2v": "wan", "wan22_ti2v_5b": "wan", "qwen_image": "qwen_image", "sd3": "sd3",
            "hunyuan_video": "hunyuan_video", "ltxv": "ltxv", "hidream": "hidream", "lumina2": "lumina2",
            "chroma": "chroma", "sdxl_refiner": "sdxl_refiner"}


@pytest.mark.parametrize("family", sorted(_ARCH_OF))
def test_the_loaded_model_names_its_family_as_the_cli_does(comfy_hosts, pack, family):
    """The node's base family (used to say "this LoRA is for X, the model is Y") is the family the CLI's
    registry detects from that family's LoRAs, for every tiny real model."""
    from core.naming import ARCHITECTURES

    host = FAMILY_BUILDERS[family]()
    assert _module(pack, "nodes.host").host_architecture(host.model) == _ARCH_OF[family]
    assert _ARCH_OF[family] in ARCHITECTURES

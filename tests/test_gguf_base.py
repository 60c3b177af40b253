"""GGUF base checkpoints on the command line (core/gguf_base.py), against their dequantized safetensors twin.

A bare Wan 2.1 diffusion model at width 256 (ComfyUI's names, as city96's converter keeps them) is written as a
real .gguf file by the ``gguf`` library's writer: weight matrices in Q8_0, Q5_1, Q4_0, BF16 and F32, one in Q6_K
(random but valid blocks: the library cannot quantize to K-quants) and one stored reshaped to rows of 256 with
ComfyUI-GGUF's ``comfy.gguf.orig_shape`` key; a second file has every name under ``model.diffusion_model.``.
Every weight read from it equals, bit for bit, the ``gguf`` library's dequantization of the same bytes, row
slices included; a base-aware resize against it writes the same tensors as against the safetensors file of
those dequantized weights. Without the library, or with a cut file, it is an error naming the file and the fix.
"""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.base import open_base
from core.cli import main
from core.errors import LoraError
from tests.helpers import skip_or_fail

WIDTH, FFN, BLOCKS, RANK = 256, 512, 2, 8
_KINDS = ("Q8_0", "Q5_1", "Q4_0", "BF16", "F32", "Q6_K")


@pytest.fixture(scope="module")
def gguf():
    try:
        import gguf
    except ImportError:
        skip_or_fail("the gguf library is not installed (pip install gguf): GGUF bases cannot be tested")
    return gguf


def _modules() -> dict[str, tuple[int, int]]:
    shapes = {}
    for block in range(BLOCKS):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{block}.{attn}.{proj}"] = (WIDTH, WIDTH)
        shapes[f"blocks.{block}.ffn.0"] = (FFN, WIDTH)
        shapes[f"blocks.{block}.ffn.2"] = (WIDTH, FFN)
    return shapes


def _encode(gguf, name: str, weight: np.ndarray, kind: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "Q6_K":  # random quants and small finite fp16 scales (its last two bytes per block)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(sum(name.encode()))
        blocks = rng.integers(0, 256, size=(weight.size // block, size), dtype=np.uint8)
        blocks[:, size - 2:] = rng.uniform(1e-4, 1e-3, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
        return blocks.reshape(weight.shape[0], -1)
    return gguf.quants.quantize(weight, qtype)


@pytest.fixture(scope="module")
def files(gguf, tmp_path_factory):
    """(gguf path, prefixed gguf path, safetensors twin path, {model key: (kind, fp32 weight)})."""
    folder = tmp_path_factory.mktemp("gguf")
    g = torch.Generator().manual_seed(0)
    state = {f"{m}.weight": (torch.randn(shape, generator=g) / shape[1] ** 0.5) for m, shape in _modules().items()}
    state.update({f"blocks.{b}.norm3.weight": torch.ones(WIDTH) for b in range(BLOCKS)})  # 1-D: not a matrix
    held, paths = {}, {}
    for prefix, name in (("", "wan.gguf"), ("model.diffusion_model.", "wan_prefixed.gguf")):
        writer = gguf.GGUFWriter(path=None, arch="wan")
        for index, (key, tensor) in enumerate(sorted(state.items())):
            array = tensor.numpy()
            kind = "F32" if tensor.dim() == 1 else _KINDS[index % len(_KINDS)]
            stored = array
            if key == "blocks.1.ffn.2.weight":  # as ComfyUI-GGUF's converter reshapes: rows of 256
                stored, kind = array.reshape(-1, 256), "Q8_0"
                writer.add_array(f"comfy.gguf.orig_shape.{prefix}{key}", list(array.shape))
            data = _encode(gguf, key, stored, kind) if kind != "F32" else stored
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(prefix + key, data, raw_dtype=qtype)
            if tensor.dim() == 2:
                values = gguf.quants.dequantize(data, qtype).reshape(array.shape)
                held[key] = (kind, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
        path = folder / name
        writer.write_header_to_file(path=str(path))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths[name] = str(path)
    twin = folder / "wan_dequantized.safetensors"
    save_file({key: weight for key, (_, weight) in held.items()}, str(twin))
    return paths["wan.gguf"], paths["wan_prefixed.gguf"], str(twin), held


def test_every_weight_is_the_librarys_dequantization_of_its_bytes(files):
    path, prefixed, _, held = files
    assert {kind for kind, _ in held.values()} == set(_KINDS)
    for source in (path, prefixed):
        base = open_base(source)
        assert base.names() == {"diffusion_model." + key[: -len(".weight")] for key in held}
        for key, (kind, want) in held.items():
            name = "diffusion_model." + key[: -len(".weight")]
            assert base.shape(name) == tuple(want.shape)
            got = base.weight(name)
            assert got.dtype == torch.float32 and torch.equal(got, want), (key, kind)
            got.zero_()  # a private copy: never the file's mapping (F32 tensors come back as it)
            assert torch.equal(base.weight(name), want), (key, kind)
            assert torch.equal(base.weight(name, (0, 16, 32)), want[16:48]), (key, kind)
            assert base.shape(name, (0, 16, 32)) == (32, *want.shape[1:])
    assert open_base(path).fingerprint != open_base(prefixed).fingerprint


def test_a_resize_against_a_gguf_base_equals_the_one_against_its_dequantized_weights(files, tmp_path):
    path, _, twin, held = files
    g = torch.Generator().manual_seed(1)
    lora = {}
    for module, (rows, columns) in _modules().items():
        prefix = "lora_unet_" + module.replace(".", "_")
        decay = 0.5 ** torch.arange(RANK, dtype=torch.float32)
        lora[prefix + ".lora_up.weight"] = (torch.randn(rows, RANK, generator=g) * 0.05 * decay).half()
        lora[prefix + ".lora_down.weight"] = torch.randn(RANK, columns, generator=g).half()
        lora[prefix + ".alpha"] = torch.tensor(float(RANK))
    lora_path = tmp_path / "wan_lora.safetensors"
    save_file(lora, str(lora_path))
    recipes = "fro_ckpt=1,thr=-2.2:spn_ckpt=1,thr=-2.2"
    outputs = {}
    for label, base in (("gguf", path), ("twin", twin)):
        out = tmp_path / label
        assert main(["resize", base, str(lora_path), "-o", str(out), "-r", recipes, "-q"]) == 0
        written = sorted(out.glob("*.safetensors"))
        assert len(written) == 2
        outputs[label] = {}
        for file in written:
            with safe_open(str(file), "pt") as fh:
                outputs[label][file.name] = {key: fh.get_tensor(key) for key in fh.keys()}
    assert outputs["gguf"].keys() == outputs["twin"].keys()
    for name, tensors in outputs["gguf"].items():
        assert tensors.keys() == outputs["twin"][name].keys()
        assert all(torch.equal(tensors[k], outputs["twin"][name][k]) for k in tensors), name
    # fro_ckpt=1,thr=-2.2 keeps each σ of ΔW with log10(σ / ‖W‖_F) > -2.2, W the GGUF file's dequantized weight
    (fro_file,) = [name for name in outputs["gguf"] if "frockpt" in name]
    ranks = {k[: -len(".lora_down.weight")]: v.shape[0] for k, v in outputs["gguf"][fro_file].items()
             if k.endswith(".lora_down.weight")}
    expected = {}
    for key, (_, weight) in held.items():
        prefix = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        delta = lora[prefix + ".lora_up.weight"].double() @ lora[prefix + ".lora_down.weight"].double()
        scores = torch.log10(torch.linalg.svdvals(delta) / weight.double().norm())
        expected[prefix] = int((scores > -2.2).sum())
    assert ranks == expected


def test_a_cut_gguf_file_and_a_missing_library_are_errors_that_say_so(files, tmp_path, monkeypatch, capsys):
    path, _, _, _ = files
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])
    with pytest.raises(LoraError, match="cut.gguf.*GGUF") as info:
        open_base(str(cut))
    assert "Fix: " in str(info.value)
    lora = tmp_path / "l.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(WIDTH, 1),
               "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(1, WIDTH)}, str(lora))
    assert main(["resize", str(cut), str(lora), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "cut.gguf" in capsys.readouterr().err and not (tmp_path / "o").exists()

    assert main(["inspect", path]) == 1  # given where a LoRA goes: said what it is
    assert "this is a GGUF file (a quantized model), not a safetensors file" in capsys.readouterr().err

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(LoraError, match="pip install gguf"):
        open_base(path)

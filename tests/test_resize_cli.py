"""The resize command end to end: every fixture with every recipe kind, size bounds on written files,
merges, reproducible random projection, output names and metadata."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from core.cli import main
from core.delta import delta_weight
from core.formats import read_lora
from core.resize_cli import parse_lora_spec
from tests.conftest import FIXTURES

LORA_DIR = os.path.join(FIXTURES, "lora")
FILES = sorted(f for f in os.listdir(LORA_DIR) if f.endswith(".safetensors"))
RECIPES = ["spn_lora=1,thr=-0.5", "fro_lora,params=0.3,size=0.02", "rank=2", "rank=2,method=rsvd",
           "rank=2,conv_rank=1,method=randproj", "sv_ratio=2", "sv_fro=0.9", "sv_cumulative=0.7,rank=3"]


def _ranks(path):
    return {l.name + str(l.offset or ""): l.rank for l in read_lora(path)}


@pytest.mark.parametrize("name", FILES)
def test_every_fixture_resizes_with_every_recipe_kind(name, tmp_path, capsys):
    src = os.path.join(LORA_DIR, name)
    assert main(["-", src, "-o", str(tmp_path), "-r", ":".join(RECIPES), "-q"]) == 0
    outputs = sorted(os.listdir(tmp_path))
    assert len(outputs) == len(RECIPES)
    source = read_lora(src)
    for out in outputs:
        lora = read_lora(tmp_path / out, arch=source.architecture)
        assert lora.unknown_keys == [] and len(lora) > 0
        assert all(layer.kind == "lora" for layer in lora)  # output is always plain LoRA/LoCon
        fused = {l.name for l in source if l.offset is not None}  # slices written as one fused kohya layer
        if "rank2" in out:
            assert max(l.rank for l in lora if l.name not in fused) <= 2
    size_file = next(o for o in outputs if "size0.02" in o)
    assert os.path.getsize(tmp_path / size_file) <= 0.02 * 2**20


@pytest.mark.parametrize("target", [0.03, 0.05, 0.08])
def test_size_target_is_never_exceeded_and_lands_close(target, tmp_path):
    src = os.path.join(LORA_DIR, "sd15_kohya_via_diffusers.safetensors")
    assert main(["-", src, "-o", str(tmp_path), "-r", f"spn_lora,size={target}", "-q"]) == 0
    (out,) = os.listdir(tmp_path)
    size = os.path.getsize(tmp_path / out)
    budget = target * 2**20
    lora = read_lora(tmp_path / out)
    step = max(2 * (l.out_features + l.in_features) for l in lora)  # one rank of the largest layer, fp16
    assert size <= budget
    assert size >= min(0.99 * budget, budget - step)


def test_keep_all_is_exact_and_error_is_discarded_energy(tmp_path):
    src = os.path.join(LORA_DIR, "sdxl_peft_r8a4.safetensors")
    assert main(["-", src, "-o", str(tmp_path), "-r", "spn_lora,thr=-99:rank=3", "-t", "32", "-q"]) == 0
    source = read_lora(src)
    keep_all = read_lora(next(tmp_path.glob("*th-99*")), arch="sdxl")
    for layer in source:
        other = keep_all.layers[layer.name]
        assert float((delta_weight(other) - delta_weight(layer)).norm() / delta_weight(layer).norm()) < 1e-5
    rank3 = read_lora(next(tmp_path.glob("*rank3*")), arch="sdxl")
    for layer in source:
        S = torch.linalg.svdvals(delta_weight(layer).double())
        error = float((delta_weight(rank3.layers[layer.name]).double() - delta_weight(layer).double()).norm())
        assert abs(error - float(S[3:].pow(2).sum().sqrt())) <= 1e-4 * float(S.norm())


def test_merge_then_resize_is_exact_with_negative_weights(tmp_path):
    a = os.path.join(LORA_DIR, "sd15_kohya_via_diffusers.safetensors")
    b = os.path.join(LORA_DIR, "sd15_peft_r4a8_meta.safetensors")
    spec = f"{a}:0.6,{b}:-1.5"
    assert main(["-", spec, "-o", str(tmp_path), "-r", "spn_lora,thr=-99", "-t", "32", "-q"]) == 0
    (out,) = os.listdir(tmp_path)
    assert out.startswith("sd15_kohya_via_diffusers0.6_sd15_peft_r4a8_meta-1.5_")
    merged = read_lora(tmp_path / out)
    first, second = read_lora(a), read_lora(b)
    for name, layer in merged.layers.items():
        expected = 0.6 * delta_weight(first.layers[name]) - 1.5 * delta_weight(second.layers[name])
        assert float((delta_weight(layer) - expected).norm() / expected.norm()) < 1e-5
    provenance = json.loads(safe_open(str(tmp_path / out), "pt").metadata()["lora_resize"])
    assert provenance["operation"] == "merge+resize" and len(provenance["sources"]) == 2
    assert [s["weight"] for s in provenance["sources"]] == [0.6, -1.5]


def test_random_projection_is_reproducible_and_hits_the_rank(tmp_path):
    src = os.path.join(LORA_DIR, "sd15_kohya_via_diffusers.safetensors")
    for folder in ("a", "b"):
        assert main(["-", src, "-o", str(tmp_path / folder), "-r", "rank=3,method=randproj,seed=7", "-q"]) == 0
    (name,) = os.listdir(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / name), "pt") as fa, safe_open(str(tmp_path / "b" / name), "pt") as fb:
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    assert set(_ranks(tmp_path / "a" / name).values()) == {3}
    assert main(["-", src, "-o", str(tmp_path / "c"), "-r", "rank=3,method=randproj,seed=8", "-q"]) == 0
    with safe_open(str(tmp_path / "a" / name), "pt") as fa, safe_open(str(tmp_path / "c" / name), "pt") as fc:
        key = next(k for k in fa.keys() if k.endswith("lora_down.weight"))
        assert not torch.equal(fa.get_tensor(key), fc.get_tensor(key))


def test_windows_paths_and_merge_specs(tmp_path):
    assert parse_lora_spec(r"C:\loras\a.safetensors") == [(r"C:\loras\a.safetensors", 1.0)]
    assert parse_lora_spec(r"C:\loras\a.safetensors:0.7,D:\b.safetensors:-0.3") == [
        (r"C:\loras\a.safetensors", 0.7), (r"D:\b.safetensors", -0.3)]
    existing = tmp_path / "odd,name.safetensors"
    existing.write_bytes(b"")
    assert parse_lora_spec(str(existing)) == [(str(existing), 1.0)]


def test_base_needed_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    """Both are wrong command lines: exit 2, like argparse's own errors."""
    src = os.path.join(LORA_DIR, "sd15_kohya_via_diffusers.safetensors")
    assert main(["-", src, "-o", str(tmp_path), "-r", "fro_ckpt=1,thr=-3.5"]) == 2
    err = capsys.readouterr().err
    assert "fro_ckpt=1,thr=-3.5" in err and "CHECKPOINT is '-'" in err
    assert not os.listdir(tmp_path)
    assert main(["-", src, "-o", str(tmp_path), "-r", "fro_ckpt=1,trh=-3"]) == 2
    assert "'trh=-3'" in capsys.readouterr().err


def test_inspect_json(capsys):
    src = os.path.join(LORA_DIR, "sd15_kohya_locon_r4a2_c2a1.safetensors")
    assert main(["inspect", src, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "kohya" and info["architecture"] == "sd15"
    assert len(info["layers"]) == 91 and info["bytes"] == os.path.getsize(src)
    layer = next(l for l in info["layers"] if l["name"] == "diffusion_model.input_blocks.1.0.in_layers.2")
    assert layer == {**layer, "kind": "locon", "rank": 2, "alpha": 1.0, "scale": 0.5, "shape": [32, 32, 3, 3]}
    assert info["rank_histogram"] == {"2": 18, "4": 73}


def test_metadata_kept_updated_and_hashed(tmp_path):
    import hashlib

    src = os.path.join(LORA_DIR, "sd15_kohya_locon_r4a2_c2a1.safetensors")
    assert main(["-", src, "-o", str(tmp_path), "-r", "rank=2", "-q"]) == 0
    (out,) = os.listdir(tmp_path)
    path = tmp_path / out
    meta = safe_open(str(path), "pt").metadata()
    original = safe_open(src, "pt").metadata()
    assert meta["modelspec.title"] == original["modelspec.title"]
    assert meta["ss_network_module"] == original["ss_network_module"]
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2.0"
    provenance = json.loads(meta["lora_resize"])
    assert provenance["recipe"] == "rank=2" and provenance["operation"] == "resize"
    assert provenance["sources"][0]["sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()
    assert set(provenance["ranks"].values()) == {2}
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert main(["-", src, "-o", str(tmp_path), "-r", "rank=2", "--bogus"]) == 2  # argparse's error, no SystemExit
    assert main(["-", src, "-o", str(tmp_path), "-r", "rank=2", "-q"]) == 1  # never overwrites
    assert os.listdir(tmp_path) == [out]


def test_sd_scripts_hashes_match_a_real_serialization():
    """Our streamed hashes equal hashes of the bytes sd-scripts would hash (ss_* metadata only)."""
    import hashlib

    from safetensors.torch import save as serialize

    from core.metadata import SdScriptsHasher
    from core.safetensors_io import data_chunks, header_size

    g = torch.Generator().manual_seed(0)
    tensors = {"a.lora_up.weight": torch.randn(700, 300, generator=g).half(),
               "a.alpha": torch.tensor(3.0), "b.lora_down.weight": torch.randn(300, 900, generator=g).bfloat16()}
    meta = {"ss_network_dim": "300", "ss_note": "é" * 50}
    data = serialize(tensors, meta)
    header = int.from_bytes(data[:8], "little")
    hasher = SdScriptsHasher(header_size(tensors, meta))
    for chunk in data_chunks(tensors):
        hasher.update(chunk)
    assert hasher.digests() == (hashlib.sha256(data[8 + header:]).hexdigest(),
                                                hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])


def test_streamed_write_equals_safetensors_serialization(tmp_path):
    """write_lora streams tensors and writes the header last: the file is what safetensors itself
    serializes for the same tensors and metadata (same header, same length, same data bytes; only
    the order of metadata keys, a hash map in safetensors, may differ), hashes included."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save as serialize  # safetensors' own serialization, the reference

    from core.formats import write_lora
    from tests.helpers import synthetic_lora

    lora = synthetic_lora(count=80, rank=48)
    out = tmp_path / "streamed.safetensors"
    size = write_lora(lora, out, dtype=torch.float32, operation="resize", recipe="rank=48")
    data = out.read_bytes()
    assert size == len(data) > 0x110000  # past the legacy hash's window
    header = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header])["__metadata__"]  # in written order (safe_open's is a hash map)
    with safe_open(str(out), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    reference = serialize(tensors, meta)
    ref_header = int.from_bytes(reference[:8], "little")
    assert ref_header == header and len(reference) == len(data)
    assert json.loads(reference[8:8 + header]) == json.loads(data[8:8 + header])
    assert reference[8 + header:] == data[8 + header:]
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    ss_only = serialize(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert len(tensors) == 80 * 3


def test_whole_file_reads_equal_safetensors_own(tmp_path):
    """LoRA files are read in one pass into one buffer (tensors are views of it): every tensor equals
    what safetensors itself loads, also after a misaligned offset, for empty and fp8 tensors."""
    from safetensors.torch import load_file, save_file

    from core.safetensors_io import load_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a.odd": torch.randn(3, generator=g).half(),  # 6 bytes: what follows is misaligned for fp32
               "b.f32": torch.randn(5, 7, generator=g), "c.bf16": torch.randn(4, 4, generator=g).bfloat16(),
               "d.empty": torch.zeros(0, 3), "e.i64": torch.arange(5), "f.f8": torch.randn(4, generator=g).to(
                   torch.float8_e4m3fn)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    ours, theirs = load_tensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys() == tensors.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
        assert torch.equal(ours[key].float(), value.float()), key


def test_several_loras_overlapped_give_the_bytes_and_order_of_one_at_a_time(tmp_path, capsys):
    """Several LoRAs in one command are pipelined (the next read and the last written during this one's
    decomposition): the same files, byte for byte, as one LoRA per command; reports in input order; a LoRA
    refused at planning (its output exists) fails alone, after the one before it was written."""
    names = ["sd15_kohya_locon_r4a2_c2a1.safetensors", "sd15_lycoris_loha_r4a2.safetensors",
             "sd15_peft_r4a8_meta.safetensors", "flux_kohya_r4a1.safetensors"]
    paths = [os.path.join(LORA_DIR, n) for n in names]
    alone = tmp_path / "alone"
    for path in paths:
        assert main(["-", path, "-o", str(alone), "-r", "rank=2:sv_ratio=2", "-q"]) == 0
    capsys.readouterr()
    together = tmp_path / "together"
    together.mkdir()
    blocker = together / (os.path.splitext(names[2])[0] + "_rank2.safetensors")
    blocker.write_bytes(b"someone else's file")
    assert main(["-", *paths, "-o", str(together), "-r", "rank=2:sv_ratio=2", "-q"]) == 1
    captured = capsys.readouterr()
    reported = [line.split(":")[0] for line in captured.out.splitlines() if line.startswith(str(together))]
    expected = [str(together / name) for name in sorted(os.listdir(alone))]
    expected_order = [p for n in names if n != names[2] for p in expected if os.path.basename(p).startswith(
        os.path.splitext(n)[0] + "_")]
    assert reported == expected_order and len(reported) == 6
    assert "output file already exists" in captured.err and "3 done, 1 failed" in captured.err
    assert blocker.read_bytes() == b"someone else's file"
    for path in expected_order:
        with open(path, "rb") as a, open(alone / os.path.basename(path), "rb") as b:
            assert a.read() == b.read(), path
    assert sorted(os.listdir(together)) == sorted([blocker.name] + [os.path.basename(p) for p in expected_order])

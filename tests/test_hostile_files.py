"""Hostile LoRA files (issue 12, the file classes): each is refused with the project's own error.

One table, ``BAD``, of 61 distinct bad files (33 of them malformed safetensors that the library
refuses too) built here byte by byte, or with safetensors for files whose format is valid but whose
values are not:
- the header as a whole (11): deep JSON nesting (100,000 levels, and an unknown field nested past
  the library's 128 levels), a header over safetensors' 100 MB limit, UTF-16,
  invalid UTF-8, NUL padding, NaN and Infinity literals, a top-level array, a tensor key given twice,
  an unpaired UTF-16 surrogate;
- ``__metadata__`` not a str→str map (5): an array, a string, number, object and null values;
- one tensor entry (18): dtype not a string or unknown, entry not an object, shape not a list,
  negative, string, float, bool, 0×2^70, overflowing, not matching its bytes; offsets float, three,
  reversed, overlapping, leaving a gap, not starting at 0, trailing bytes nobody references;
- factors (25): NaN/Inf or beyond-fp32 values in every kind (LoRA, LoHa, LoKr, full diff, diff_b,
  DoRA scale, PEFT magnitude), integer factors, NaN and Inf alpha, rank-0 LoRA and LoHa factors,
  factors of the wrong rank (a 6-D LoRA, 1-D and 3-D LoKr halves, a 1-D Tucker core, a 1-D diff), a
  diff_b or DoRA scale that fits no side of the weight, PEFT metadata with a text, NaN or 400-digit
  alpha, a bad regex or an alpha_pattern that is not a map;
- pickles (2), which are never unpickled.

Every file goes through ``read_lora`` (LoraError naming the file, and the tensor or layer where
there is one) and through the CLI's ``inspect`` and ``convert`` (exit code 1, the message on
stderr, no traceback, nothing written, no temp file left). Header-level rows are also checked to be
refused by the safetensors library itself: the header is validated as strictly as the library does
(a duplicate key, which the library resolves silently to the last one, is refused here), so a file
accepted here is one ComfyUI loads. The positive side: fp8 LoRAs read, convert as stored and to
fp16/bf16/fp32; an fp8 base checkpoint resizes exactly as its fp32 copy; layouts the library
accepts (zero-size tensors sharing an offset, space padding, extra entry fields, a null
``__metadata__``) are accepted here too; provenance text that is not our record is ignored by
``inspect`` (3 variants), not fatal.

What already held before issue 12 and is kept so (these rows passed on the old code): pickles never
unpickled; NaN/Inf LoRA, LoHa, LoKr and full-diff factors; NaN/Inf alpha; integer factors; an
unknown dtype name; an entry that is not an object; a shape that does not match its bytes; NUL
padding and invalid UTF-8 in the header; and the valid odd layouts being accepted.
"""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.cli import main
from core.errors import LoraError
from core.formats import read_lora
from core.safetensors_io import read_header

LAYER = "lora_te_text_model_encoder_layers_0_mlp_fc1"
UP, DOWN, ALPHA = f"{LAYER}.lora_up.weight", f"{LAYER}.lora_down.weight", f"{LAYER}.alpha"
PEFT = "text_encoder.encoder.layers.0.mlp.fc1"


# --- building files by hand ---

def _blob(header: dict | None = None, data: bytes = b"", raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _entries(**changes) -> dict:
    """A valid kohya LoRA header (up 64×4, down 4×32, F32), with some fields replaced."""
    header = {UP: {"dtype": "F32", "shape": [64, 4], "data_offsets": [0, 1024]},
              DOWN: {"dtype": "F32", "shape": [4, 32], "data_offsets": [1024, 1536]}}
    for key, fields in changes.items():
        name = UP if key == "up" else DOWN if key == "down" else key
        header[name] = {**header.get(name, {}), **fields}
    return header


def _good(**changes) -> bytes:
    return _blob(_entries(**changes), b"\0" * 1536)


def _with_meta(meta) -> bytes:
    return _blob({"__metadata__": meta, **_entries()}, b"\0" * 1536)


def _tensors(**factors) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = {UP: torch.randn(64, 4, generator=g), DOWN: torch.randn(4, 32, generator=g), ALPHA: torch.tensor(2.0)}
    return {**base, **factors}


def _poisoned(shape, where=(0, 0), value=float("nan"), dtype=torch.float32) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    t[where] = value
    return t.to(dtype)


def _peft(meta: dict) -> tuple[dict, dict]:
    tensors = {f"{PEFT}.lora_A.weight": torch.randn(4, 32), f"{PEFT}.lora_B.weight": torch.randn(64, 4)}
    return tensors, {"lora_adapter_metadata": json.dumps(meta)}


def _pickle_bytes() -> bytes:
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned_by_hostile_file",))

    return pickle.dumps({"x": Boom()}, protocol=4)


_DEEP = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
_DUP = (b'{"%s":{"dtype":"F32","shape":[64,4],"data_offsets":[0,1024]},'
        b'"%s":{"dtype":"F32","shape":[4,32],"data_offsets":[1024,1536]},'
        b'"%s":{"dtype":"F32","shape":[4,32],"data_offsets":[1024,1536]}}'
        ) % (UP.encode(), DOWN.encode(), DOWN.encode())
_LAYOUT_TOO_BIG = "sparse file with a header length over 100 MB"

# (id, content, words the message must hold, whether the safetensors library refuses it too)
# content: bytes, a dict of tensors (save_file), a (tensors, metadata) pair, or a marker string
BAD = [
    # --- the header as a whole ---
    ("deep_json_nesting", _blob(raw=_DEEP), ["nested too deeply"], True),
    ("extra_field_nested_past_128", _blob(raw=json.dumps(_entries()).replace(
        '"data_offsets": [0, 1024]', '"data_offsets": [0, 1024], "x": ' + "[" * 126 + "]" * 126).encode(),
        data=b"\0" * 1536), ["nested more than 128 levels deep", UP], True),
    ("header_over_100MB_limit", _LAYOUT_TOO_BIG, ["100,000,000-byte limit"], True),
    ("header_utf16", _blob(raw=json.dumps(_entries()).encode("utf-16"), data=b"\0" * 1536), ["not valid"], True),
    ("header_invalid_utf8", _blob(raw=b'{"\xff\xfe":1}'), ["not valid"], True),
    ("header_nul_padding", _blob(raw=json.dumps(_entries()).encode() + b"\0\0", data=b"\0" * 1536),
     ["not valid"], True),
    ("header_nan_literal", _blob(raw=json.dumps(_entries()).replace("1536]", "NaN]").encode(), data=b"\0" * 1536),
     ["not valid"], True),
    ("header_infinity_offset", _blob(raw=json.dumps(_entries()).replace("1536]", "Infinity]").encode(),
                                     data=b"\0" * 1536), ["not valid"], True),
    ("header_top_level_array", _blob(raw=b"[]"), ["not an object"], True),
    ("duplicate_tensor_key", _blob(raw=_DUP, data=b"\0" * 1536), ["twice", DOWN], False),
    ("unpaired_surrogate_in_metadata", _blob(raw=b'{"__metadata__":{"k":"a\\ud800"},' + json.dumps(_entries())
                                             .encode()[1:], data=b"\0" * 1536), ["surrogate"], True),
    # --- __metadata__ ---
    ("metadata_array", _with_meta(["a", "b"]), ["__metadata__ is a JSON array", "map of strings"], True),
    ("metadata_string", _with_meta("hello"), ["__metadata__ is a JSON string"], True),
    ("metadata_number_value", _with_meta({"ss_network_dim": 4}), ["'ss_network_dim' is a JSON integer"], True),
    ("metadata_object_value", _with_meta({"x": {"y": "z"}}), ["'x' is a JSON object"], True),
    ("metadata_null_value", _with_meta({"x": None}), ["'x' is a JSON null"], True),
    # --- one tensor entry ---
    ("dtype_not_a_string", _good(up={"dtype": ["F32"]}), ["unknown dtype", UP], True),
    ("dtype_unknown", _good(up={"dtype": "F33"}), ["unknown dtype", UP], True),
    ("entry_not_an_object", _blob({**_entries(), "x": 5}, b"\0" * 1536), ["malformed", "layer x"], True),
    ("shape_not_a_list", _good(up={"shape": 256}), ["integers ≥ 0", UP], True),
    ("shape_negative", _good(up={"shape": [-64, -4]}), ["integers ≥ 0", UP], True),
    ("shape_string", _good(up={"shape": ["64", 4]}), ["integers ≥ 0", UP], True),
    ("shape_float", _good(up={"shape": [64.0, 4]}), ["integers ≥ 0", UP], True),
    ("shape_bool", _good(up={"shape": [True, 256]}), ["integers ≥ 0", UP], True),
    ("shape_zero_by_2_70", _blob(_entries(**{"x": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [1536, 1536]}}),
                                 b"\0" * 1536), ["too large for any tensor", "layer x"], True),
    ("shape_product_overflows", _good(up={"shape": [2**40, 2**40]}), ["too large for any tensor", UP], True),
    ("shape_does_not_fit_bytes", _good(up={"shape": [64, 5]}), ["does not fit its 1024 bytes", UP], True),
    ("offsets_float", _good(up={"data_offsets": [0.0, 1024.0]}), ["not two integers", UP], True),
    ("offsets_three", _good(up={"data_offsets": [0, 1024, 1536]}), ["not two integers", UP], True),
    ("offsets_reversed", _good(up={"data_offsets": [1024, 0]}), ["end before they start", UP], True),
    ("offsets_overlap", _blob(_entries(down={"data_offsets": [512, 1024]}), b"\0" * 1024),
     ["overlaps", UP, DOWN], True),
    ("offsets_gap", _blob(_entries(down={"data_offsets": [1040, 1552]}), b"\0" * 1552),
     ["16 bytes after", "gap", DOWN], True),
    ("offsets_not_from_zero", _blob(_entries(up={"data_offsets": [8, 1032]}, down={"data_offsets": [1032, 1544]}),
                                    b"\0" * 1544), ["8 bytes at the start of the data", UP], True),
    ("trailing_unreferenced_bytes", _blob(_entries(), b"\0" * 1600), ["64 bytes after the last tensor", DOWN], True),
    # --- values (valid safetensors, refused by what they hold) ---
    ("lora_nan_factor", _tensors(**{UP: _poisoned((64, 4))}), ["factor up holds NaN or Inf", LAYER], False),
    ("lora_fp64_beyond_fp32", _tensors(**{DOWN: _poisoned((4, 32), value=1e300, dtype=torch.float64)}),
     ["too large for fp32", LAYER], False),
    ("lora_integer_factor", _tensors(**{UP: torch.ones(64, 4, dtype=torch.int32)}), ["not a float", LAYER], False),
    ("alpha_nan", _tensors(**{ALPHA: torch.tensor(float("nan"))}), ["alpha is NaN or Inf", LAYER], False),
    ("alpha_inf_fp64", _tensors(**{ALPHA: torch.tensor(1e300, dtype=torch.float64)}), ["alpha is NaN or Inf"], False),
    ("rank0_lora", _tensors(**{UP: torch.zeros(64, 0), DOWN: torch.zeros(0, 32)}), ["rank-0", LAYER], False),
    ("rank0_loha", {f"{LAYER}.hada_w1_a": torch.zeros(64, 0), f"{LAYER}.hada_w1_b": torch.zeros(0, 32),
                    f"{LAYER}.hada_w2_a": torch.zeros(64, 0), f"{LAYER}.hada_w2_b": torch.zeros(0, 32)},
     ["rank-0", LAYER], False),
    ("loha_inf_factor", {f"{LAYER}.hada_w1_a": torch.randn(64, 4), f"{LAYER}.hada_w1_b": torch.randn(4, 32),
                         f"{LAYER}.hada_w2_a": _poisoned((64, 4), value=float("inf")),
                         f"{LAYER}.hada_w2_b": torch.randn(4, 32)}, ["factor w2a holds NaN or Inf", LAYER], False),
    ("lokr_nan_factor", {f"{LAYER}.lokr_w1": _poisoned((4, 4)), f"{LAYER}.lokr_w2": torch.randn(16, 8)},
     ["factor w1 holds NaN or Inf", LAYER], False),
    ("full_diff_nan", {f"{LAYER}.diff": _poisoned((64, 32)), f"{LAYER}.diff_b": torch.randn(64)},
     ["factor diff holds NaN", LAYER], False),
    ("diff_b_inf", {f"{LAYER}.diff": torch.randn(64, 32), f"{LAYER}.diff_b": _poisoned((64,), (3,), float("-inf"))},
     ["diff_b holds NaN or Inf", LAYER], False),
    ("lora_down_6d", _tensors(**{UP: torch.randn(64, 4, 1, 1, 1, 1), DOWN: torch.randn(4, 32, 1, 1, 1, 1)}),
     ["up has shape (64, 4, 1, 1, 1, 1): 6-D, expected 2-D to 5-D", LAYER], False),
    ("lokr_w1_1d", {f"{LAYER}.lokr_w1": torch.randn(4), f"{LAYER}.lokr_w2": torch.randn(16, 8)},
     ["lokr_w1 has shape (4,): 1-D, expected 2-D", LAYER], False),
    ("lokr_w1_3d", {f"{LAYER}.lokr_w1": torch.randn(4, 4, 2), f"{LAYER}.lokr_w2": torch.randn(16, 8)},
     ["lokr_w1 has shape (4, 4, 2)", LAYER], False),
    ("lokr_t2_1d", {f"{LAYER}.lokr_w1": torch.randn(4, 4), f"{LAYER}.lokr_w2_a": torch.randn(4, 16),
                    f"{LAYER}.lokr_w2_b": torch.randn(4, 8), f"{LAYER}.lokr_t2": torch.randn(4)},
     ["lokr_t2 has shape (4,): 1-D, expected 4-D", LAYER], False),
    ("full_diff_1d", {f"{LAYER}.diff": torch.randn(64)}, ["diff has shape (64,)", LAYER], False),
    ("diff_b_wrong_shape", {f"{LAYER}.diff": torch.randn(64, 32), f"{LAYER}.diff_b": torch.randn(3, 3)},
     ["diff_b has shape (3, 3), but the weight has 64 output rows", LAYER], False),
    ("dora_scale_wrong_size", _tensors(**{f"{LAYER}.dora_scale": torch.rand(7)}),
     ["DoRA scale of shape (7,) fits neither", LAYER], False),
    ("dora_scale_nan", _tensors(**{f"{LAYER}.dora_scale": _poisoned((64, 1))}), ["dora_scale holds NaN", LAYER],
     False),
    ("peft_magnitude_inf", ({**_peft({})[0], f"{PEFT}.lora_magnitude_vector": _poisoned((64,), (0,), float("inf"))},
                            {}), ["magnitude holds NaN or Inf", PEFT], False),
    ("peft_alpha_text", _peft({"text_encoder.r": 4, "text_encoder.lora_alpha": "eight"}),
     ["lora_alpha is 'eight', not a finite number", PEFT], False),
    ("peft_alpha_nan", ({**_peft({})[0]}, {"lora_adapter_metadata": '{"text_encoder.lora_alpha": NaN}'}),
     ["lora_alpha is 'nan', not a finite number", PEFT], False),
    ("peft_alpha_huge_integer", ({**_peft({})[0]},
                                 {"lora_adapter_metadata": '{"text_encoder.lora_alpha": 1%s}' % ("0" * 400)}),
     ["lora_alpha is '1000", "not a finite number", PEFT], False),
    ("peft_alpha_pattern_bad_regex", _peft({"text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": {"fc1(": 4}}),
     ["not a regular expression", PEFT], False),
    ("peft_alpha_pattern_not_a_map", _peft({"text_encoder.lora_alpha": 8, "text_encoder.alpha_pattern": ["fc1"]}),
     ["alpha_pattern is a list, not a map", PEFT], False),
    # --- never unpickled ---
    ("pickle_protocol_4", _pickle_bytes(), ["pickle", "never unpickled"], True),
    ("torch_zip_checkpoint", "torch.save", ["pickle", "never unpickled"], True),
]
assert len({case[0] for case in BAD}) == len(BAD) == 61


def _make(tmp_path, name: str, content) -> str:
    path = tmp_path / f"{name}.safetensors"
    if content == _LAYOUT_TOO_BIG:
        with open(path, "wb") as fh:  # sparse: costs no disk, and is never read past its first 8 bytes
            fh.write(struct.pack("<Q", 100_000_008))
            fh.truncate(8 + 100_000_008)
    elif content == "torch.save":
        torch.save({"a": torch.zeros(1)}, path)  # writing a pickle is safe; reading one is what never happens
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, tuple):
        save_file(content[0], str(path), metadata=content[1])
    else:
        save_file(content, str(path))
    return str(path)


def _words_in(message: str, path: str, words) -> None:
    assert path in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("name,content,words,library_refuses", BAD, ids=[case[0] for case in BAD])
def test_read_lora_refuses(tmp_path, monkeypatch, name, content, words, library_refuses):
    monkeypatch.chdir(tmp_path)
    path = _make(tmp_path, name, content)
    with pytest.raises(LoraError) as info:
        read_lora(path)
    _words_in(str(info.value), path, words)
    assert not (tmp_path / "pwned_by_hostile_file").exists()
    if library_refuses and "pickle" not in words:  # the library is never handed a pickle
        with pytest.raises(Exception):
            with safe_open(path, framework="pt") as fh:
                [fh.get_tensor(k) for k in fh.keys()]


@pytest.mark.parametrize("name,content,words,library_refuses", BAD, ids=[case[0] for case in BAD])
def test_cli_refuses(tmp_path, monkeypatch, capsys, name, content, words, library_refuses):
    monkeypatch.chdir(tmp_path)
    path = _make(tmp_path, name, content)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["inspect", path]) == 1
    err = capsys.readouterr().err
    _words_in(err, path, words)
    assert "Traceback" not in err
    assert main(["convert", path, "-o", str(out / "converted.safetensors")]) == 1
    err = capsys.readouterr().err
    _words_in(err, path, words)
    assert "Traceback" not in err
    assert list(out.iterdir()) == []  # nothing written, no temp file left
    assert not (tmp_path / "pwned_by_hostile_file").exists()


# --- what the library accepts is accepted here too ---

def test_valid_layouts_the_library_accepts(tmp_path):
    """Zero-size tensors sharing an offset, space padding, extra entry fields, a null __metadata__."""
    header = {"__metadata__": None, **_entries(),
              "empty_a": {"dtype": "F16", "shape": [0, 8], "data_offsets": [0, 0]},
              "empty_b": {"dtype": "F32", "shape": [0], "data_offsets": [1536, 1536], "note": "extra field"}}
    path = tmp_path / "odd_but_valid.safetensors"
    path.write_bytes(_blob(raw=json.dumps(header).encode() + b"   ", data=torch.randn(384).numpy().tobytes()))
    with safe_open(str(path), framework="pt") as fh:
        theirs = {k: fh.get_tensor(k) for k in fh.keys()}
    ours, metadata = read_header(path)
    assert metadata == {}
    assert sorted(ours) == sorted(theirs) == sorted(["empty_a", "empty_b", UP, DOWN])
    lora = read_lora(path)
    assert lora.unknown_keys == ["empty_a", "empty_b"]
    layer = next(iter(lora))
    assert torch.equal(layer.factors["up"], theirs[UP]) and torch.equal(layer.factors["down"], theirs[DOWN])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_lora_reads_and_converts(tmp_path, dtype):
    """fp8 LoRAs: read, inspected, converted as stored (still fp8) and to fp16/bf16/fp32, values exact."""
    source = tmp_path / "fp8.safetensors"
    tensors = {UP: (torch.randn(64, 4) * 0.1).to(dtype), DOWN: (torch.randn(4, 32) * 0.1).to(dtype),
               ALPHA: torch.tensor(2.0)}
    save_file(tensors, str(source))
    lora = read_lora(source)
    layer = next(iter(lora))
    assert layer.factors["up"].dtype == dtype and layer.alpha == 2.0
    assert main(["inspect", str(source), "--json"]) == 0
    for flag, expected in ((None, dtype), ("16", torch.float16), ("bf16", torch.bfloat16), ("32", torch.float32)):
        target = tmp_path / f"out_{flag}.safetensors"
        assert main(["convert", str(source), "-o", str(target), *(["-t", flag] if flag else [])]) == 0
        with safe_open(str(target), framework="pt") as fh:
            written = {k: fh.get_tensor(k) for k in fh.keys()}
        assert written[UP].dtype == expected and written[DOWN].dtype == expected
        for key in (UP, DOWN):  # fp8 values are exact in every wider type
            assert torch.equal(written[key].float(), tensors[key].float())
        assert float(written[ALPHA].float()) == 2.0
        back = next(iter(read_lora(target)))
        assert back.alpha == 2.0 and back.shape == (64, 32)


def test_fp8_base_checkpoint(tmp_path):
    """An fp8 base checkpoint (as ComfyUI ships Flux) is read layer by layer and its norms are computed in
    fp32: the resize keeps exactly what it keeps against the same values stored in fp32."""
    from safetensors.torch import load_file

    from tests.conftest import FIXTURES

    weights = load_file(os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors"))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() and v.dim() >= 2 else v for k, v in weights.items()}
    lora = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
    outputs = {}
    for name, tensors in (("fp8", fp8), ("fp32", {k: v.float() if v.is_floating_point() else v
                                                   for k, v in fp8.items()})):
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "base.safetensors"))
        args = [str(folder / "base.safetensors"), lora, "-o", str(folder / "out"), "-r", "fro_ckpt=1,thr=-2.6"]
        assert main(args) == 0
        (written,) = (folder / "out").iterdir()
        with safe_open(str(written), framework="pt") as fh:
            outputs[name] = {k: fh.get_tensor(k) for k in fh.keys()}
    assert outputs["fp8"].keys() == outputs["fp32"].keys()
    assert all(torch.equal(outputs["fp8"][k], outputs["fp32"][k]) for k in outputs["fp8"])
    ranks = {k: v.shape[0] for k, v in outputs["fp8"].items() if k.endswith("lora_down.weight")}
    assert 0 < sum(ranks.values()) < 328  # thr=-2.6 drops some ranks: the norms were really used


@pytest.mark.parametrize("provenance", ["not json", "[1, 2]", "[" * 100_000])
def test_foreign_provenance_metadata_is_not_fatal(tmp_path, capsys, provenance):
    """Text under our provenance key that is not our record (another tool's, or hostile) is noted and
    ignored by inspect, never a failure: metadata is the file author's free text."""
    path = tmp_path / "foreign.safetensors"
    save_file(_tensors(), str(path), metadata={"lora_resize": provenance})
    assert main(["inspect", str(path)]) == 0
    captured = capsys.readouterr()
    assert "provenance metadata is not a JSON object; ignored" in captured.out and "Traceback" not in captured.err
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["provenance"] == {"unreadable": True}

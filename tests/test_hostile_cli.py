"""Hostile command lines: every bad recipe number, merge weight, device, output path and flag is refused
before any work, with the project's own one-line error naming the token, file or folder and the fix, the
documented exit code (2: the command line is wrong; 1: the run failed), no traceback, and nothing
written anywhere (the whole tmp tree, the base's folder included, is compared before and after).

Covered: 74 distinct bad command lines in ``BAD`` (recipes 33, merge specs 8, devices 8, output folders
13, flags 6, convert 6), plus
- all or nothing per LoRA: two size= recipes that name one file, a second recipe that keeps nothing, an
  existing output for the second recipe, a write failing on the second file (the first is removed);
  the outputs' total size checked against the free space (a 256 KiB tmpfs) before the first write;
- a batch goes on past bad LoRAs (a missing and an empty file between good ones) and exits 1 with
  "2 done, 2 failed";
- unexpected exceptions (a bug, an OSError, MemoryError, KeyboardInterrupt): one line, exit 1 (130),
  the traceback only with -vv;
- merge weights refused in core.merge.merge itself (the node path), devices checked by
  core.devices.resolve_device against what torch reports.
The read-only folder rows mount a read-only tmpfs when root (chmod does not stop root) and use chmod
otherwise; where neither works they skip, saying why.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from core.cli import main
from tests.conftest import FIXTURES

LOCON = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
OTHER = os.path.join(FIXTURES, "lora", "sd15_kohya_via_diffusers.safetensors")
BASE = os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors")
NO_CUDA = not torch.cuda.is_available()


def _r(recipe: str, word: str | None = None, base: bool = False):
    """A bad -r row: refused with exit 2, naming the token."""
    return pytest.param(["{base}" if base else "-", "{lora}", "-o", "{out}", "-r", recipe], 2, [word or recipe],
                        id=f"recipe[{recipe}]")


BAD = [
    # recipe numbers: non-finite, out of range, not integers, Python-only spellings
    _r("fro_ckpt=1,thr=nan", "'thr=nan'", base=True),
    _r("fro_ckpt=1,thr=inf", "'thr=inf'", base=True),
    _r("fro_ckpt=1,thr=-1e400", "'thr=-1e400'", base=True),
    _r("fro_ckpt=1,thr=Infinity", "'thr=Infinity'", base=True),
    _r("fro_ckpt=1,thr=-5000", "'thr=-5000'", base=True),
    _r("spn_lora,size=nan", "'size=nan'"),
    _r("spn_lora,size=inf", "'size=inf'"),
    _r("spn_lora,size=1e300", "'size=1e300'"),
    _r("spn_lora,size=-1", "'size=-1'"),
    _r("rank=2,rescale=nan", "'rescale=nan'"),
    _r("rank=2,rescale=inf", "'rescale=inf'"),
    _r("rank=2,rescale=1e30", "'rescale=1e30'"),
    _r("rank=2,rescale=1e-30", "'rescale=1e-30'"),
    _r("fro_ckpt=nan,thr=-3", "'fro_ckpt=nan'", base=True),
    _r("fro_ckpt=inf,thr=-3", "'fro_ckpt=inf'", base=True),
    _r("spn_lora=-1,thr=-1", "'spn_lora=-1'"),
    _r("spn_lora=1e400,thr=-1", "'spn_lora=1e400'"),
    _r("sv_ratio=nan", "'sv_ratio=nan'"),
    _r("sv_ratio=inf", "'sv_ratio=inf'"),
    _r("sv_fro=nan", "'sv_fro=nan'"),
    _r("sv_cumulative=nan", "'sv_cumulative=nan'"),
    _r("rank=2,method=rsvd,niter=1000000000", "'niter=1000000000'"),
    _r("rank=2,method=randproj,sparse=2", "'sparse=2'"),
    _r("rank=2,method=randproj,sparse=nan", "'sparse=nan'"),
    _r("rank=100000", "'rank=100000'"),
    _r("rank=1.5", "'rank=1.5'"),
    _r("rank=1e3", "'rank=1e3'"),
    _r("rank=1_0", "'rank=1_0'"),
    _r("conv_rank=-2", "'conv_rank=-2'"),
    _r("rank=2,method=randproj,seed=-1", "'seed=-1'"),
    _r("rank=2,method=randproj,seed=99999999999999999999999", "'seed=99999999999999999999999'"),
    _r("rank=2:rank=2", "same output file"),
    _r("rank=2::rank=3", "empty recipe"),
    # merge specs: weights that are not finite (they ended in a LinAlgError), a weight without a file
    pytest.param(["-", "{lora}:nan,{other}:0.5", "-o", "{out}", "-r", "rank=2"], 2, ["'nan'", "{lora}"],
                 id="merge[nan]"),
    pytest.param(["-", "{lora}:0.5,{other}:inf", "-o", "{out}", "-r", "rank=2"], 2, ["'inf'", "{other}"],
                 id="merge[inf]"),
    pytest.param(["-", "{lora}:1e400,{other}:1", "-o", "{out}", "-r", "rank=2"], 2, ["'1e400'", "{lora}"],
                 id="merge[1e400]"),
    pytest.param(["-", "{lora}:-Infinity", "-o", "{out}", "-r", "rank=2"], 2, ["'-Infinity'", "{lora}"],
                 id="merge[-Infinity]"),
    pytest.param(["-", "{lora}:NaN", "-o", "{out}", "-r", "rank=2"], 2, ["'NaN'"], id="merge[NaN-single]"),
    pytest.param(["-", ":0.5,{other}:0.5", "-o", "{out}", "-r", "rank=2"], 2, ["no file before it"],
                 id="merge[weight-without-file]"),
    pytest.param(["-", "{lora}:0.5,,{other}:0.5", "-o", "{out}", "-r", "rank=2"], 2, ["empty entry"],
                 id="merge[empty-entry]"),
    pytest.param(["-", "{lora}:0.5,{tmp}/missing.safetensors:0.5", "-o", "{out}", "-r", "rank=2"], 1,
                 ["{tmp}/missing.safetensors", "not found"], id="merge[missing-member]"),
    # devices: checked against what torch has, before the base is even opened
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-d", "foo"], 2, ["'foo'", "cpu"], id="device[foo]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-d", "cuda:99"], 2, ["'cuda:99'", "cpu"],
                 id="device[cuda:99]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-d", "cuda" if NO_CUDA else "cuda:64"], 2,
                 ["'cuda", "available" if NO_CUDA else "does not exist"], id="device[cuda]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-d", "mps"], 2, ["'mps'"], id="device[mps]",
                 marks=pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None
                                          and torch.backends.mps.is_available(), reason="this machine has MPS")),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-d", "cpu:3"], 2, ["'cpu:3'"], id="device[cpu:3]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-d", "meta"], 2, ["'meta'"], id="device[meta]"),
    pytest.param(["{tmp}/no_base.safetensors", "{lora}", "-o", "{out}", "-d", "foo"], 2, ["'foo'"],
                 id="device[before-base]"),
    # output folders: checked before the base is read or anything decomposed
    pytest.param(["{base}", "{lora}", "-o", "{file}"], 2, ["{file}", "is a file"], id="out[is-a-file]"),
    pytest.param(["{base}", "{lora}", "-o", "{file}/sub"], 2, ["{file}/sub", "lies below the file"],
                 id="out[below-a-file]"),
    pytest.param(["{base}", "{lora}", "-o", "{tmp}/" + "x" * 300], 2, ["300 bytes"], id="out[name-too-long]"),
    pytest.param(["{base}", "{lora}", "-o", "{tmp}/" + "/".join(["y" * 200] * 25)], 2, ["longer than"],
                 id="out[path-too-long]"),
    pytest.param(["{base}", "{lora}", "-o", "{loop}"], 2, ["{loop}", "symbolic link loop"], id="out[loop]"),
    pytest.param(["{base}", "{lora}", "-o", "{loop}/sub"], 2, ["symbolic link loop"], id="out[below-loop]"),
    pytest.param(["{base}", "{lora}", "-o", "{broken}"], 2, ["{broken}", "broken symbolic link"],
                 id="out[broken-link]"),
    pytest.param(["{base}", "{lora}", "-o", "{tmp}/a\0b"], 2, ["NUL"], id="out[nul]"),
    pytest.param(["{base}", "{lora}", "-o", ""], 2, ["empty"], id="out[empty]"),
    pytest.param(["{base}", "{lora}", "-o", "{ro}"], 1, ["{ro}", "not writable"], id="out[read-only]"),
    pytest.param(["{base}", "{lora}", "-o", "{ro}/new/deeper"], 1, ["not writable", "{ro}"],
                 id="out[inside-read-only]"),
    pytest.param(["-", "{ro_lora}", "-r", "rank=2"], 1, ["not writable", "beside the LoRA"],
                 id="out[beside-lora-read-only]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-r", "rank=2", "--overwrite", "-d", "nope"], 2, ["'nope'"],
                 id="device[with-overwrite]"),
    pytest.param(["-", "{long_lora}", "-o", "{out}", "-q", "-r", "spn_lora=0.25,fro_lora=0.75,params=0.5,thr=-1.25"],
                 1, ["bytes", "file system"], id="out[output-name-too-long]"),
    # flags
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-t", "8"], 2, ["-t", "'8'"], id="flag[-t 8]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "-f", "diffusers"], 2, ["'diffusers'"], id="flag[-f]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "--bogus"], 2, ["--bogus"], id="flag[--bogus]"),
    pytest.param(["{base}", "-o", "{out}"], 2, ["lora_model_paths"], id="flag[no-lora]"),
    pytest.param(["{base}", "{lora}", "-o", "{out}", "--arch", "sd2"], 2, ["'sd2'"], id="flag[--arch]"),
    pytest.param(["-", "{lora}", "-o", "{out}", "-r", "fro_ckpt=1,thr=-3.5"], 2, ["CHECKPOINT is '-'"],
                 id="flag[base-recipe-without-base]"),
    # convert: the output is checked before the input is read
    pytest.param(["convert", "{lora}", "-o", "{tmp}"], 2, ["{tmp}", "is a folder"], id="convert[-o folder]"),
    pytest.param(["convert", "{lora}", "-o", "{file}/x.safetensors"], 2, ["{file} is a file"],
                 id="convert[below-a-file]"),
    pytest.param(["convert", "{lora}", "-o", "{loop}/x.safetensors"], 2, ["symbolic link loop"],
                 id="convert[loop]"),
    pytest.param(["convert", "{lora}", "-o", "{tmp}/" + "z" * 300 + ".safetensors"], 2, ["bytes"],
                 id="convert[name-too-long]"),
    pytest.param(["convert", "{lora}", "-o", "{out}/x.safetensors", "-t", "8"], 2, ["-t 8", "16, bf16 or 32"],
                 id="convert[-t 8]"),
    pytest.param(["convert", "{lora}", "-o", "{ro}/x.safetensors"], 1, ["not writable"], id="convert[read-only]"),
]


def _tree(root) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, name), root) for name in dirs + files]
    return sorted(found)


def _readonly_folder(path):
    """A folder nobody can write in: a read-only tmpfs for root, chmod for anyone else.
    Returns the cleanup callable."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root, where chmod does not stop writes, and mounting a read-only tmpfs "
                    f"failed: {done.stderr.strip() or done.returncode}")
    return lambda: subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def places(tmp_path):
    """Paths the table refers to; the base is a copy, so a norms cache written by mistake shows."""
    shutil.copy(BASE, tmp_path / "base.safetensors")
    (tmp_path / "plain_file").write_text("not a folder")
    os.symlink("loop", tmp_path / "loop")
    os.symlink(tmp_path / "gone", tmp_path / "broken")
    long_name = "l" * 225 + ".safetensors"  # fits; with a recipe slug it does not
    shutil.copy(LOCON, tmp_path / long_name)
    values = {"tmp": str(tmp_path), "base": str(tmp_path / "base.safetensors"), "lora": LOCON, "other": OTHER,
              "out": str(tmp_path / "out"), "file": str(tmp_path / "plain_file"), "loop": str(tmp_path / "loop"),
              "broken": str(tmp_path / "broken"), "long_lora": str(tmp_path / long_name)}
    cleanups = []
    yield values, cleanups
    for cleanup in cleanups:
        cleanup()


def _expand(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("argv, code, words", BAD)
def test_bad_command_line_is_refused_cleanly_and_writes_nothing(argv, code, words, places, tmp_path, capsys):
    values, cleanups = places
    if any("{ro}" in a for a in argv):
        cleanups.append(_readonly_folder(tmp_path / "ro"))
        values["ro"] = str(tmp_path / "ro")
    if any("{ro_lora}" in a for a in argv):
        cleanups.append(_make_ro_lora(tmp_path, values))
    before = _tree(tmp_path)
    assert main([_expand(a, values) for a in argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip(), "no message"
    for word in words:
        assert _expand(word, values) in err, err
    assert err.count("error:") == 1, err  # one error line (argparse's comes after its usage line)
    assert _tree(tmp_path) == before  # nothing written: no output, no temp, no norms cache, no folder


def _make_ro_lora(tmp_path, values) -> callable:
    """A LoRA inside a read-only folder (output beside it, no -o): a second read-only mount holding a copy."""
    folder = tmp_path / "ro_src"
    folder.mkdir()
    shutil.copy(LOCON, folder / "mine.safetensors")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        values["ro_lora"] = str(folder / "mine.safetensors")
        return lambda: folder.chmod(0o755)
    staging = tmp_path / "ro_src_rw"
    folder.rename(staging)
    folder.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(staging), str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a read-only bind mount failed: {done.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=False, capture_output=True)
    values["ro_lora"] = str(folder / "mine.safetensors")
    return lambda: subprocess.run(["umount", str(folder)], check=False)


# ---- all or nothing per LoRA -------------------------------------------------------------------------

def test_two_size_recipes_naming_one_file_write_nothing(tmp_path, capsys):
    """size=1 and size=1.001 both keep everything of a 0.14 MiB LoRA: one name, found only after the
    selection. Today the first file is written and the second fails."""
    out = tmp_path / "out"
    assert main(["-", LOCON, "-o", str(out), "-r", "spn_lora,size=1:spn_lora,size=1.001", "-q"]) == 1
    err = capsys.readouterr().err
    assert "'spn_lora,size=1'" in err and "'spn_lora,size=1.001'" in err and "both give" in err
    assert "nothing was written" in err and "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


def test_a_second_recipe_that_keeps_nothing_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-", LOCON, "-o", str(out), "-r", "rank=2:spn_lora,thr=50", "-q"]) == 1
    err = capsys.readouterr().err
    assert "'spn_lora,thr=50' keeps nothing" in err and LOCON in err
    assert not out.exists() or os.listdir(out) == []


def test_an_existing_output_of_the_second_recipe_stops_before_the_first_write(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-", LOCON, "-o", str(out), "-r", "rank=3", "-q"]) == 0
    (existing,) = os.listdir(out)
    stamp = os.stat(out / existing).st_mtime_ns
    capsys.readouterr()
    assert main(["-", LOCON, "-o", str(out), "-r", "rank=2:rank=3", "-q"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and existing in err and "'rank=3'" in err
    assert os.listdir(out) == [existing] and os.stat(out / existing).st_mtime_ns == stamp
    assert main(["-", LOCON, "-o", str(out), "-r", "rank=2:rank=3", "-q", "--overwrite"]) == 0
    assert len(os.listdir(out)) == 2


def test_a_write_failing_midway_removes_the_files_already_written(tmp_path, capsys, monkeypatch):
    """The second write fails (as on a full disk): the first file, new, is removed and the error says so."""
    import core.formats
    from core.errors import LoraError

    real = core.formats.write_lora
    calls = []

    def flaky(lora, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise LoraError(f"no space left in {os.path.dirname(path)}", file=str(path), fix="free some space")
        return real(lora, path, **kwargs)

    monkeypatch.setattr(core.formats, "write_lora", flaky)
    out = tmp_path / "out"
    assert main(["-", LOCON, "-o", str(out), "-r", "rank=2:rank=3:rank=1", "-q"]) == 1
    err = capsys.readouterr().err
    assert len(calls) == 2 and "no space left" in err
    assert "the 1 file(s) already written for this LoRA were removed" in err and os.path.basename(calls[0]) in err
    assert os.listdir(out) == []


def test_outputs_larger_than_the_free_space_are_refused_before_writing(tmp_path, capsys):
    """Three full-rank copies of a 0.3 MiB LoRA do not fit a 256 KiB tmpfs: refused up front, by size."""
    out = tmp_path / "small"
    out.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a full disk cannot be made otherwise here)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs failed: {done.stderr.strip()}")
    try:
        assert main(["-", OTHER, "-o", str(out), "-r", "rank=4:rank=3:rank=2", "-q", "-t", "32"]) == 1
        err = capsys.readouterr().err
        assert f"no space left in {out}" in err and "MiB are free" in err and "Traceback" not in err
        assert os.listdir(out) == []
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_a_batch_goes_on_past_bad_loras_and_exits_1(tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    missing = str(tmp_path / "missing.safetensors")
    assert main(["-", LOCON, missing, str(empty), OTHER, "-o", str(out), "-r", "rank=2", "-q"]) == 1
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["sd15_kohya_locon_r4a2_c2a1_rank2.safetensors",
                                       "sd15_kohya_via_diffusers_rank2.safetensors"]
    assert f"{missing}: LoRA file not found" in captured.err and f"{empty}: " in captured.err
    assert captured.err.count("error:") == 2 and "2 done, 2 failed" in captured.err
    assert "Traceback" not in captured.err
    assert main(["-", LOCON, OTHER, "-o", str(tmp_path / "again"), "-r", "rank=2", "-q"]) == 0
    assert "2 done, 0 failed" in capsys.readouterr().out


# ---- unexpected exceptions: one line, the traceback on request -----------------------------------------

@pytest.mark.parametrize("exc, code, line", [
    (RuntimeError("boom\n  second line"), 1, "error: RuntimeError: boom second line"),
    (OSError(5, "Input/output error"), 1, "error: OSError: [Errno 5] Input/output error"),
    (MemoryError(), 1, "error: MemoryError: (no message)"),
    (ZeroDivisionError("division by zero"), 1, "error: ZeroDivisionError: division by zero"),
    (KeyboardInterrupt(), 130, "error: interrupted"),
])
def test_unexpected_exceptions_are_one_line_without_vv(exc, code, line, monkeypatch, capsys):
    import core.cli

    def broken(args):
        raise exc

    monkeypatch.setattr(core.cli, "cmd_inspect", broken)
    assert main(["inspect", LOCON]) == code
    err = capsys.readouterr().err
    assert line in err and "Traceback" not in err
    if code == 1:
        assert "run with -vv for the traceback" in err
    assert main(["inspect", LOCON, "-vv"]) == code
    err = capsys.readouterr().err
    assert "Traceback" in err and line in err and "run with -vv" not in err


def test_argparse_errors_return_2_and_help_returns_0(capsys):
    assert main(["resize", "--help"]) == 0
    assert "CHECKPOINT" in capsys.readouterr().out.upper()
    assert main(["inspect"]) == 2
    assert "the following arguments are required" in capsys.readouterr().err


# ---- the same checks in core, where the nodes call them ------------------------------------------------

@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf"), "abc"])
def test_merge_refuses_non_finite_weights_naming_the_file(weight):
    from core.errors import LoraError
    from core.formats import read_lora
    from core.merge import merge

    good, other = read_lora(LOCON), read_lora(OTHER)
    with pytest.raises(LoraError) as info:
        merge([(good, 0.5), (other, weight)])
    assert OTHER in str(info.value) and "merge weight" in str(info.value)


def test_parse_lora_spec_refuses_non_finite_weights_and_keeps_paths():
    from core.errors import UsageError
    from core.resize_cli import parse_lora_spec

    for weight in ("nan", "inf", "-inf", "1e400", "Infinity"):
        with pytest.raises(UsageError) as info:
            parse_lora_spec(f"a.safetensors:{weight},b.safetensors:0.5")
        assert "a.safetensors" in str(info.value) and repr(weight) in str(info.value)
    assert parse_lora_spec(r"C:\l\a.safetensors:0.7,D:\b.safetensors:-1e-1") == [
        (r"C:\l\a.safetensors", 0.7), (r"D:\b.safetensors", -0.1)]
    assert parse_lora_spec("a.safetensors:1_0") == [("a.safetensors:1_0", 1.0)]  # not a weight: a (missing) path


def test_resolve_device_checks_what_torch_has(monkeypatch):
    from core.devices import available_devices, resolve_device
    from core.errors import UsageError

    assert resolve_device(None) is None and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"'cuda' is not available: torch sees no CUDA device.*use one of: cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_devices()[:3] == ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device(" CUDA ") == torch.device("cuda")
    with pytest.raises(UsageError, match=r"'cuda:2' does not exist: torch sees 2 CUDA devices.*cuda:0, cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        resolve_device("gpu")

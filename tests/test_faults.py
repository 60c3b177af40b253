"""Process faults: real processes, real signals, real full and read-only file systems.

Faults covered (14 cases):
 1-3. SIGKILL of ``python -m core convert`` (a 36 MiB LoRA) at three points of its write: when the temp
      file first appears, when it has grown to half the output, and right after it reached the full
      output size (hashing, header, fsync and rename still to come). The kill points are found by polling
      the temp file's size every ~0.5 ms; on a hit the writer is frozen with SIGSTOP at once (so what we
      inspect is exactly what the kill leaves), then SIGKILLed. The sizes seen at the kill are asserted
      (first appearance < half <= the half-point kill < full), so a kill that lands elsewhere fails
      instead of testing nothing. Each time: no file at the target name (or a complete, valid one if the
      rename had happened), the killed writer's temp is there, and the next write into the folder
      removes it and succeeds.
 4. Two writers of one output at once (no --overwrite): exactly one wins, the other says "already
    exists", the file is valid, no temp is left.
 5. Two processes computing the norms of one checkpoint at once (fro_ckpt): both succeed with identical
    files, the cache is valid JSON holding every layer, the same as one process alone writes.
 6-7. A read-only output folder (convert and resize): the project's error, exit 1, nothing written.
 8. A read-only model folder: the norms go to the user cache folder and the run succeeds.
 9. A full output folder (a 64 KiB tmpfs): "no space left in <folder>", exit 1, no partial file, no temp.
 10. A full model folder (the cache cannot be saved): a warning, the output is written, the old cache
     is intact, no temp.
 11-14. A norms cache that is valid JSON of another layout, a JSON list, corrupt bytes, or a folder at
     its path: the run succeeds with a warning, a bad file is moved aside (``.bad-*``), and the next
     run uses the fresh cache without computing a norm.
Plus the sweep's rules (only dead writers' temps of this pattern and this host go; a live writer's,
another host's and other files stay). Read-only and full file systems are tmpfs mounts (root in a
container allows them); where mounting is not permitted those tests skip and say so.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.cli import main
from core.formats import read_lora
from core.norms_cache import CACHE_NAME
from tests.conftest import FIXTURES, ROOT

GOOD = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
BASE = os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors")
RECIPE = "fro_ckpt=1,thr=-2.6"
TEMP = re.compile(r"^\..*\.tmp$")  # any hidden temp, today's mkstemp names included


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _core(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "core", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temps(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if TEMP.match(name))


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory):
    """A 36 MiB kohya LoRA (fp32, rank 384): its write takes a few hundred ms, enough to stop it midway.
    Returns (path, size of its converted output), the size from one uninterrupted conversion."""
    folder = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(6):
        name = f"lora_unet_down_blocks_{i // 2}_attentions_{i % 2}_proj_in"
        tensors[f"{name}.lora_up.weight"] = torch.randn(2048, 384, generator=g)
        tensors[f"{name}.lora_down.weight"] = torch.randn(384, 2048, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(8.0)
    path = folder / "big.safetensors"
    save_file(tensors, str(path))
    assert main(["convert", str(path), "-o", str(folder / "ref.safetensors"), "-t", "32"]) == 0
    return path, (folder / "ref.safetensors").stat().st_size


def _kill_when(proc: subprocess.Popen, folder: Path, reached, deadline_s: float = 40.0) -> int:
    """Poll the writer's temp in ``folder``; when ``reached(size)`` holds, SIGSTOP then SIGKILL the writer.
    Returns the temp's size at the kill."""
    stop = time.monotonic() + deadline_s
    try:
        while time.monotonic() < stop and proc.poll() is None:
            for entry in os.scandir(folder):
                if not TEMP.match(entry.name):
                    continue
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                if reached(size):
                    os.kill(proc.pid, signal.SIGSTOP)
                    size = os.stat(entry.path).st_size  # frozen: exactly what the kill leaves
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    return size
            time.sleep(0.0005)  # yield the core: the writer shares two with the rest of the suite
        pytest.fail(f"the writer ended (rc {proc.poll()}) before its temp file reached the kill point: "
                    f"{proc.communicate()[1][-500:] if proc.poll() is not None else 'timed out'}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("point", ["appears", "half", "full"])
def test_sigkill_mid_write_leaves_no_partial_file_and_the_next_write_sweeps_the_temp(big_lora, tmp_path, point):
    source, full = big_lora
    target = tmp_path / "out.safetensors"
    reached = {"appears": lambda size: True, "half": lambda size: size >= full // 2,
               "full": lambda size: size >= full}[point]
    size = _kill_when(_core("convert", str(source), "-o", str(target), "-t", "32"), tmp_path, reached)
    if point == "appears":
        assert size < full // 2
    elif point == "half":
        assert full // 2 <= size < full, (size, full)  # not yet complete: the kill was mid-write
    else:
        assert size == full

    if target.exists():  # renamed before the kill: then it is the complete file
        assert point == "full" and target.stat().st_size == full
        assert len(read_lora(str(target))) == 6
    stray = _temps(tmp_path)
    assert len(stray) == 1 and stray[0].startswith(".out.safetensors."), stray  # what a kill leaves

    nxt = tmp_path / "next.safetensors"
    assert main(["convert", GOOD, "-o", str(nxt)]) == 0  # any later write into the folder
    assert _temps(tmp_path) == [], "the killed writer's temp was not removed by the next write"
    assert len(read_lora(str(nxt))) == len(read_lora(GOOD))


def test_two_writers_of_one_output_exactly_one_wins(big_lora, tmp_path):
    source, full = big_lora
    target = tmp_path / "same.safetensors"
    procs = [_core("convert", str(source), "-o", str(target), "-t", "32") for _ in range(2)]
    results = [(p.wait(60), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "already exists" in loser and str(target) in loser and "Traceback" not in loser
    assert target.stat().st_size == full and len(read_lora(str(target))) == 6
    assert _temps(tmp_path) == []


def _resize_args(ckpt, out, recipe=RECIPE):
    return [str(ckpt), GOOD, "-o", str(out), "-r", recipe, "-q"]


def _cache_keys(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert len(data) == 1
    return next(iter(data.values()))


def test_two_processes_computing_norms_of_one_checkpoint(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    ckpt = models / "base.safetensors"
    shutil.copy(BASE, ckpt)
    procs = [_core(*_resize_args(ckpt, tmp_path / f"out{i}")) for i in range(2)]
    results = [(p.wait(120), p.communicate()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    files = [sorted((tmp_path / f"out{i}").iterdir()) for i in range(2)]
    assert len(files[0]) == 1 and [f.name for f in files[0]] == [f.name for f in files[1]]
    assert files[0][0].read_bytes() == files[1][0].read_bytes()

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(BASE, alone / "base.safetensors")
    assert main(_resize_args(alone / "base.safetensors", tmp_path / "out_alone")) == 0
    expected = _cache_keys(alone / CACHE_NAME)
    assert len(expected) > 10
    assert _cache_keys(models / CACHE_NAME) == expected  # every layer, the same values
    assert _temps(models) == []


@contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}): this fault needs a small or read-only file system")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}): this fault needs one")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount_ro(path: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"remounting read-only is not permitted here ({done.stderr.strip()})")


@pytest.mark.parametrize("command", ["convert", "resize"])
def test_read_only_output_folder_is_a_clean_error_and_writes_nothing(tmp_path, capsys, command):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        if command == "convert":
            args = ["convert", GOOD, "-o", str(folder / "out.safetensors")]
        else:
            args = ["-", GOOD, "-o", str(folder), "-r", "rank=2", "-q"]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 1, err
        assert str(folder) in err and ("writable" in err or "read-only" in err.lower()), err
        assert "Traceback" not in err and "OSError" not in err
        assert os.listdir(folder) == []


def test_read_only_model_folder_caches_norms_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with _tmpfs(tmp_path / "models", "size=4m") as models:
        shutil.copy(BASE, models / "base.safetensors")
        _remount_ro(models)
        assert main(_resize_args(models / "base.safetensors", tmp_path / "out")) == 0
        assert sorted(os.listdir(models)) == ["base.safetensors"]
    assert len(list((tmp_path / "out").iterdir())) == 1
    assert len(_cache_keys(tmp_path / "xdg" / "comfyui-lora-resize" / CACHE_NAME)) > 10


def test_full_output_folder_says_no_space_and_leaves_nothing(tmp_path, capsys):
    with _tmpfs(tmp_path / "full", "size=64k") as folder:
        target = folder / "out.safetensors"
        rc = main(["convert", GOOD, "-o", str(target)])  # 146 kB into 64 KiB
        err = capsys.readouterr().err
        assert rc == 1, err
        assert f"no space left in {folder}" in err and "Fix:" in err and "Traceback" not in err, err
        assert os.listdir(folder) == []


def _fill(folder: Path) -> None:
    """Use up every free byte of ``folder``'s file system."""
    with open(folder / "filler", "wb", buffering=0) as fh:  # unbuffered: nothing left to flush at close
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


def test_full_model_folder_is_a_warning_and_keeps_the_old_cache(tmp_path, caplog):
    with _tmpfs(tmp_path / "models", "size=2m") as models:
        shutil.copy(BASE, models / "base.safetensors")
        old = json.dumps({"another-checkpoint": {"layer": {"spectral": 1.0}}})
        (models / CACHE_NAME).write_text(old)
        _fill(models)
        out = tmp_path / "out"
        assert main(_resize_args(models / "base.safetensors", out)) == 0
        assert len(list(out.iterdir())) == 1
        assert "norms cache not saved" in caplog.text and f"no space left in {models}" in caplog.text
        assert (models / CACHE_NAME).read_text() == old
        assert _temps(models) == []


BAD_CACHES = {
    "another layout": json.dumps({"version": 2, "entries": [{"name": "x", "norm": 1.0}]}),
    "a list": json.dumps([1, 2, 3]),
    "corrupt bytes": "{\"fp\": {\"x\": {\"spectral\": 1.0",
    "a folder": None,
}


@pytest.mark.parametrize("kind", list(BAD_CACHES))
def test_a_bad_norms_cache_is_a_warning_moved_aside_and_replaced(tmp_path, monkeypatch, caplog, kind):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    models = tmp_path / "models"
    models.mkdir()
    ckpt = models / "base.safetensors"
    shutil.copy(BASE, ckpt)
    bad = models / CACHE_NAME
    if BAD_CACHES[kind] is None:
        bad.mkdir()
        (bad / "keep.txt").write_text("user data")
    else:
        bad.write_text(BAD_CACHES[kind])
    assert main(_resize_args(ckpt, tmp_path / "out1")) == 0
    if BAD_CACHES[kind] is None:
        assert "is a folder, not a norms cache" in caplog.text and "Fix: remove" in caplog.text, caplog.text
        assert (bad / "keep.txt").read_text() == "user data"  # a folder is never touched
        fresh = tmp_path / "xdg" / "comfyui-lora-resize" / CACHE_NAME
    else:
        assert "norms cache unreadable" in caplog.text and "moved aside" in caplog.text, caplog.text
        aside = [p for p in models.iterdir() if p.name.startswith(CACHE_NAME + ".bad-")]
        assert len(aside) == 1 and aside[0].read_text() == BAD_CACHES[kind]
        fresh = bad
    assert len(_cache_keys(fresh)) > 10

    import core.norms as norms

    def no_compute(*args, **kwargs):
        raise AssertionError("a norm was computed although the fresh cache holds it")

    monkeypatch.setattr(norms, "spectral_norm", no_compute)
    monkeypatch.setattr(norms, "frobenius_norm", no_compute)
    caplog.clear()
    assert main(_resize_args(ckpt, tmp_path / "out2")) == 0
    assert "moved aside" not in caplog.text
    assert [p.read_bytes() for p in (tmp_path / "out1").iterdir()] == \
           [p.read_bytes() for p in (tmp_path / "out2").iterdir()]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def test_the_sweep_removes_only_dead_writers_temps_of_its_pattern(tmp_path):
    from core import atomic

    dead = _dead_pid()
    host = atomic.HOST_TAG
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    stale = [f".a.safetensors.lora-resize-{host}-{dead}-0a1b2c3d.tmp",
             f".{CACHE_NAME}.lora-resize-{host}-{dead}-deadbeef.tmp"]
    kept = [f".b.safetensors.lora-resize-{host}-{os.getpid()}-0a1b2c3d.tmp",  # a live writer (this one)
            f".c.safetensors.lora-resize-{host}-1-0a1b2c3d.tmp",  # PID 1 is alive: never swept
            f".d.safetensors.lora-resize-{other_host}-{dead}-0a1b2c3d.tmp",  # another machine's PID
            ".e.safetensors.x1y2z3.tmp", "f.safetensors", f"g.lora-resize-{host}-{dead}-00.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    assert all(atomic.is_temp_name(name) for name in stale)
    assert main(["convert", GOOD, "-o", str(tmp_path / "new.safetensors")]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["new.safetensors"])


def test_temp_names_follow_the_one_pattern_and_fit_long_targets(tmp_path):
    from core import atomic

    name = atomic.temp_name("x" * 250 + ".safetensors")
    assert atomic.is_temp_name(name) and len(name.encode()) <= 255
    assert f"-{os.getpid()}-" in name and name.startswith(".x")
    seen = []

    def fill(fh):
        seen.extend(n for n in os.listdir(tmp_path) if n != "long")
        fh.write(b"data")

    atomic.atomic_write(fill, tmp_path / ("y" * 240 + ".bin"))
    assert len(seen) == 1 and atomic.is_temp_name(seen[0])
    assert (tmp_path / ("y" * 240 + ".bin")).read_bytes() == b"data" and _temps(tmp_path) == []

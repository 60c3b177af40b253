"""The norms cache: hits, invalidation on checkpoint change, corruption, read-only folders, two writers."""
import json
import multiprocessing
import os
import time

import torch
from safetensors.torch import save_file

from core.base import open_base
from core.norms import reference_norms
from core.norms_cache import CACHE_NAME, NormCache


def _checkpoint(path, value=1.0):
    save_file({"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.full((8, 8), value),
               "model.diffusion_model.out.2.weight": torch.eye(8) * value}, str(path))


def test_hits_skip_work_and_a_changed_checkpoint_misses(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    _checkpoint(ckpt)
    base = open_base(str(ckpt))
    targets = [("diffusion_model.input_blocks.1.1.proj_in", None), ("diffusion_model.out.2", None)]
    cache = NormCache.for_checkpoint(str(ckpt))
    first = reference_norms(base, targets, cache=cache)
    assert abs(first[targets[0]]["spectral"] - 8.0) < 1e-4 and abs(first[targets[1]]["frobenius"] - 8 ** 0.5) < 1e-5
    cache.save()
    assert (tmp_path / CACHE_NAME).exists()

    calls = []
    import core.norms as norms

    monkeypatch.setattr(norms, "spectral_norm", lambda w, **k: calls.append(w) or 0.0)
    again = reference_norms(open_base(str(ckpt)), targets, cache=NormCache.for_checkpoint(str(ckpt)))
    assert calls == [] and again == first

    time.sleep(0.01)
    _checkpoint(ckpt, value=2.0)  # the checkpoint changes: new fingerprint, recomputed
    changed = open_base(str(ckpt))
    assert changed.fingerprint != base.fingerprint
    reference_norms(changed, targets, cache=NormCache.for_checkpoint(str(ckpt)))
    assert len(calls) == 2


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, caplog):
    (tmp_path / CACHE_NAME).write_text("{not json")
    cache = NormCache.in_folder(str(tmp_path))
    assert cache.get("fp", "x") is None
    assert "unreadable" in caplog.text
    cache.put("fp", "x", {"spectral": 1.5})
    cache.save()
    assert json.loads((tmp_path / CACHE_NAME).read_text()) == {"fp": {"x": {"spectral": 1.5}}}


def test_unwritable_folder_falls_back_to_user_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = NormCache.in_folder(str(blocker / "models"))  # a folder under a file can never be created
    assert cache.path == str(tmp_path / "xdg" / "comfyui-lora-resize" / CACHE_NAME)
    cache.put("fp", "a", {"frobenius": 2.0})
    cache.save()
    assert os.path.exists(cache.path)


def _writer(folder, tag, count):
    cache = NormCache.in_folder(folder)
    for i in range(count):
        cache.put("fp", f"{tag}{i}", {"spectral": float(i)})
        if i % 20 == 19:
            cache.save()
            time.sleep(0.001)
    cache.save()


def test_two_concurrent_writer_processes_lose_nothing(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), tag, 200)) for tag in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    data = json.loads((tmp_path / CACHE_NAME).read_text())
    assert len(data["fp"]) == 400


def _aside(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith(CACHE_NAME + ".bad-"))


def test_non_finite_norms_are_never_cached(tmp_path, caplog):
    cache = NormCache.in_folder(str(tmp_path))
    cache.put("fp", "nan", {"spectral": float("nan"), "frobenius": 2.0})
    cache.put("fp", "inf", {"spectral": float("inf")})
    assert cache.get("fp", "nan") == {"frobenius": 2.0} and cache.get("fp", "inf") is None
    assert "not a finite number" in caplog.text and "nan" in caplog.text
    assert cache.save()
    assert json.loads((tmp_path / CACHE_NAME).read_text()) == {"fp": {"nan": {"frobenius": 2.0}}}


def test_a_file_off_the_layout_is_moved_aside_not_trusted(tmp_path, caplog):
    bad = '{"fp": {"a": {"spectral": 1.0}, "b": {"spectral": NaN}}}'  # json.dumps writes NaN: not ours
    (tmp_path / CACHE_NAME).write_text(bad)
    cache = NormCache.in_folder(str(tmp_path))
    assert cache.get("fp", "a") is None  # nothing of a file off the layout is used
    assert [open(tmp_path / name).read() for name in _aside(tmp_path)] == [bad]
    assert "moved aside" in caplog.text and not (tmp_path / CACHE_NAME).exists()


def test_absurdly_nested_json_is_a_corrupt_cache(tmp_path):
    (tmp_path / CACHE_NAME).write_text("[" * 200_000 + "]" * 200_000)
    cache = NormCache.in_folder(str(tmp_path))
    assert cache.get("fp", "a") is None and len(_aside(tmp_path)) == 1


def test_an_unreadable_cache_is_left_alone_and_never_written_over(tmp_path, monkeypatch, caplog):
    import core.norms_cache as norms_cache

    (tmp_path / CACHE_NAME).write_text('{"fp": {"a": {"spectral": 1.0}}}')

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(norms_cache, "_read_bytes", denied)
    cache = NormCache.in_folder(str(tmp_path))
    assert "unreadable (Permission denied)" in caplog.text
    cache.put("fp", "b", {"spectral": 2.0})
    assert cache.save() is False
    assert json.loads((tmp_path / CACHE_NAME).read_text()) == {"fp": {"a": {"spectral": 1.0}}}
    assert _aside(tmp_path) == []


def test_a_save_that_cannot_lock_or_write_is_a_warning_and_keeps_the_old_file(tmp_path, caplog):
    old = '{"fp": {"a": {"spectral": 1.0}}}'
    (tmp_path / CACHE_NAME).write_text(old)
    cache = NormCache.in_folder(str(tmp_path))
    (tmp_path / (CACHE_NAME + ".lock")).mkdir()  # the lock file cannot be opened
    cache.put("fp", "b", {"spectral": 2.0})
    assert cache.save() is False and "norms cache not saved" in caplog.text
    assert (tmp_path / CACHE_NAME).read_text() == old
    os.rmdir(tmp_path / (CACHE_NAME + ".lock"))
    assert cache.save() is True  # kept its entries: a later save succeeds
    assert json.loads((tmp_path / CACHE_NAME).read_text())["fp"] == {"a": {"spectral": 1.0}, "b": {"spectral": 2.0}}


def test_a_killed_savers_temp_is_swept_by_the_next_cache(tmp_path):
    import subprocess
    import sys

    from core.atomic import HOST_TAG

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    stale = tmp_path / f".{CACHE_NAME}.lora-resize-{HOST_TAG}-{dead.pid}-0123abcd.tmp"
    stale.write_text('{"fp": {')  # half a cache, as a SIGKILL mid-save leaves it
    cache = NormCache.in_folder(str(tmp_path))
    assert not stale.exists()
    cache.put("fp", "a", {"frobenius": 1.0})
    assert cache.save()
    assert sorted(os.listdir(tmp_path)) == [CACHE_NAME, CACHE_NAME + ".lock"]


def test_norms_cached_by_an_older_algorithm_are_not_read(tmp_path):
    """NORMS_VERSION bumps when a norm's algorithm changes its answers (2: spectral norms checked against σ₂):
    a cache written under the bare fingerprint by version 1 holds values that are never read again."""
    from core.norms import NORMS_VERSION, cache_id

    path = tmp_path / "base.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.randn(300, 300, generator=torch.Generator().manual_seed(1))},
              str(path))
    base = open_base(str(path))
    name = next(iter(base.names()))
    (tmp_path / CACHE_NAME).write_text(json.dumps({base.fingerprint: {name: {"spectral": 123.0, "frobenius": 456.0}}}))
    norms = reference_norms(base, [(name, None)], cache=NormCache.for_checkpoint(str(path)))[(name, None)]
    assert NORMS_VERSION >= 2 and cache_id(base) != base.fingerprint
    assert norms["spectral"] != 123.0 and norms["frobenius"] != 456.0

"""`lora-resize batch`: a tree of the repo's fixtures (the SD1.5 LoRAs that fit the tiny base, one of
them twice in two folders, an SDXL and a Flux LoRA with no base given) plus three broken files
(truncated, garbage header, not a LoRA), with a base-aware recipe and a fixed rank.

Checked with real numbers: every good file written once per recipe it can run, loadable, with the
ranks, bytes and sha256 its record states; every broken one failed in the manifest with its error;
exit 1; a rerun does no work (0 new records, outputs untouched); a deleted output is made again and
only it; -j 2 writes the same bytes as -j 1 and computes no base norm in a worker (the parent computed
each touched layer once); SIGKILL mid-run then a rerun gives the same bytes as an uninterrupted run,
and so does Ctrl-C (exit 130, no temp left); an output already there without a record is kept when
identical and refused when not; inputs as globs and @lists.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.batch import collect_inputs, parse_bases
from core.cli import main
from core.errors import UsageError
from core.formats import read_lora
from core.manifest import MANIFEST_NAME
from core.metadata import file_sha256
from tests.conftest import FIXTURES, ROOT

LORAS = os.path.join(FIXTURES, "lora")
BASE = os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors")
RECIPES = "fro_ckpt=1,thr=-2.6:rank=2"
SD15 = ["sd15_kohya_locon_r4a2_c2a1", "sd15_kohya_via_diffusers", "sd15_peft_dora", "sd15_peft_r4a8_meta"]
OTHERS = {"sdxl": "sdxl_peft_r8a4", "flux": "flux_peft_r4"}
BROKEN = ["truncated", "garbage_header", "not_a_lora"]
GOOD_FILES = len(SD15) + 1 + len(OTHERS)
DONE_PAIRS = 2 * (len(SD15) + 1) + len(OTHERS)  # SD1.5: both recipes; SDXL/Flux: rank=2 only (no base)


def _make_tree(root: Path) -> Path:
    lib = root / "lib"
    for copy, names in (("a", SD15), ("b/deeper", SD15[:1])):  # one name twice, in two folders
        (lib / "sd15" / copy).mkdir(parents=True)
        for name in names:
            shutil.copy(os.path.join(LORAS, name + ".safetensors"), lib / "sd15" / copy)
    for family, name in OTHERS.items():
        (lib / family).mkdir(parents=True)
        shutil.copy(os.path.join(LORAS, name + ".safetensors"), lib / family)
    broken = lib / "broken"
    broken.mkdir()
    data = Path(LORAS, SD15[0] + ".safetensors").read_bytes()
    (broken / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (broken / "garbage_header.safetensors").write_bytes((64).to_bytes(8, "little") + b"{not json" + b"\0" * 55)
    save_file({"foo.weight": torch.randn(4, 4)}, str(broken / "not_a_lora.safetensors"))
    (lib / "notes.txt").write_text("not a LoRA name: never an input")
    return lib


def _base(root: Path) -> str:
    """A private copy of the base: its norms cache starts empty."""
    folder = root / "base"
    folder.mkdir(exist_ok=True)
    path = folder / "sd15_tiny_base.safetensors"
    if not path.exists():
        shutil.copy(BASE, path)
    return str(path)


def _args(lib, out, base, *extra) -> list[str]:
    return ["batch", str(lib), "-o", str(out), "--base", f"sd15={base}", "-r", RECIPES, "-q", *extra]


def _records(out: Path, name: str = MANIFEST_NAME) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def _temps(out: Path) -> list[str]:
    return [str(p) for p in out.rglob(".*") if p.is_file()]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted -j 1 run: (tree, base, out, its records, exit code, its outputs)."""
    root = tmp_path_factory.mktemp("batch")
    lib, base, out = _make_tree(root), _base(root), root / "out"
    code = main(_args(lib, out, base))
    return lib, base, out, _records(out), code, _outputs(out)


def test_every_good_file_written_and_every_broken_one_recorded(reference):
    lib, _, out, records, code, outputs = reference
    assert code == 1  # three files failed
    assert len(records) == (GOOD_FILES + len(BROKEN)) * 2  # one record per input and recipe
    done = [r for r in records if r["status"] == "done"]
    assert len(done) == DONE_PAIRS and len(outputs) == DONE_PAIRS
    for record in done:
        output = Path(record["output"])
        source = Path(record["input"])
        assert output.parent == out / source.parent.relative_to(lib)  # the input tree, mirrored
        assert output.name.startswith(source.stem + "_")
        assert os.path.getsize(output) == record["bytes"] and file_sha256(str(output)) == record["output_sha256"]
        assert record["sha256"] == file_sha256(str(source))
        lora = read_lora(output, arch=record["family"])
        assert lora.unknown_keys == [] and len(lora) > 0
        assert sum(layer.rank for layer in lora) == record["ranks_after"] <= record["ranks_before"]
        if record["recipe"] == "rank=2":  # slices of a fused weight are written as one fused layer
            fused = {layer.name for layer in read_lora(source) if layer.offset is not None}
            assert max(layer.rank for layer in lora if layer.name not in fused) <= 2
        assert 0 <= record["relative_error"] < 1
    skipped = [r for r in records if r["status"] == "skipped"]
    assert sorted(r["family"] for r in skipped) == ["flux", "sdxl"]
    assert all(r["recipe"] == "fro_ckpt=1,thr=-2.6" and "--base " + r["family"] + "=" in r["error"] for r in skipped)
    for record in records:  # every record, done, skipped or failed, has the input's hash
        assert record["sha256"] == file_sha256(record["input"]), record
    failed = [r for r in records if r["status"] == "failed"]
    assert sorted({Path(r["input"]).stem for r in failed}) == sorted(BROKEN)
    for record in failed:
        assert record["output"] is None and record["input"] in record["error"]
    by_name = {Path(r["input"]).stem: r["error"] for r in failed}
    assert "truncated" in by_name["truncated"] or "past the end" in by_name["truncated"]
    assert "header" in by_name["garbage_header"].lower()
    assert "LoRA" in by_name["not_a_lora"]


def test_outputs_are_those_of_the_resize_command(reference, tmp_path):
    lib, base, out, records, _, _ = reference
    source = lib / "sd15" / "a" / (SD15[0] + ".safetensors")
    assert main([base, str(source), "-o", str(tmp_path), "-r", RECIPES, "-q"]) == 0
    for record in (r for r in records if r["input"] == str(source)):
        assert Path(record["output"]).read_bytes() == (tmp_path / Path(record["output"]).name).read_bytes()


def test_rerun_does_no_work_and_redoes_only_a_deleted_output(reference, tmp_path):
    lib, base, ref_out, _, _, ref_outputs = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    manifest = out / MANIFEST_NAME
    text = manifest.read_text().replace(str(ref_out), str(out))  # the copy's records point at the copy
    manifest.write_text(text)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    before = len(_records(out))
    assert main(_args(lib, out, base)) == 1  # the broken files are tried again, and fail again
    new = _records(out)[before:]
    assert [r for r in new if r["status"] == "done"] == []  # re-work = 0
    assert sorted({Path(r["input"]).stem for r in new if r["status"] == "failed"}) == sorted(BROKEN)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    victim = next(iter(stamps))
    victim.unlink()
    before = len(_records(out))
    assert main(_args(lib, out, base)) == 1
    redone = [r for r in _records(out)[before:] if r["status"] == "done"]
    assert [r["output"] for r in redone] == [str(victim)]
    assert _outputs(out) == ref_outputs


def test_each_input_is_read_once_and_a_rerun_only_hashes_it(reference, tmp_path, monkeypatch):
    """A fresh run reads each LoRA once (the probe reads its header; the resize pass reads the file and hashes
    those very bytes); a rerun with every record holding hashes each input once and reads nothing else."""
    import core.formats.reader
    import core.metadata

    lib, base, _, ref_records, _, ref_outputs = reference
    reads, hashes = {}, {}
    real_load, real_hash = core.formats.reader.load_tensors, core.metadata.file_sha256

    def load(path, keys=None, **kwargs):
        if keys is None:
            reads[str(path)] = reads.get(str(path), 0) + 1
        return real_load(path, keys, **kwargs)

    def hashed(path, *args):
        hashes[str(path)] = hashes.get(str(path), 0) + 1
        return real_hash(path, *args)

    monkeypatch.setattr(core.formats.reader, "load_tensors", load)
    monkeypatch.setattr(core.metadata, "file_sha256", hashed)
    out = tmp_path / "out"
    assert main(_args(lib, out, _base(tmp_path))) == 1
    inputs = {r["input"] for r in ref_records}
    good = {r["input"] for r in ref_records if r["status"] != "failed"}
    to_resize = {r["input"] for r in ref_records if r["status"] == "done"}
    assert {p: n for p, n in reads.items() if p in inputs} == {p: 1 for p in to_resize}
    assert not any(p in good for p in hashes)  # good inputs: hashed only as they were read
    assert not any(p.startswith(str(out)) for p in hashes)  # outputs: hashed from memory as they were written
    assert _outputs(out) == ref_outputs
    assert [(r["input"], r["recipe"], r["status"], r["sha256"]) for r in _records(out)] == \
        [(r["input"], r["recipe"], r["status"], r["sha256"]) for r in ref_records]

    reads.clear()
    hashes.clear()
    assert main(_args(lib, out, _base(tmp_path))) == 1
    assert not any(p in good for p in reads)  # nothing to do: no LoRA read
    assert {p: n for p, n in hashes.items() if p in to_resize} == {p: 1 for p in to_resize}


def test_shards_split_the_library_and_together_give_the_whole_run(reference, tmp_path):
    """--shard 0/3, 1/3, 2/3 into one -o: each input in exactly one shard's manifest, together the records and
    bytes of the unsharded run; a shard rerun does no work; the split does not depend on where the library is."""
    lib, base, _, ref_records, _, ref_outputs = reference
    out = tmp_path / "out"
    counts = []
    for k in range(3):
        assert main(_args(lib, out, base, "--shard", f"{k}/3")) in (0, 1)
        counts.append(len(_records(out, f"lora-resize-batch.shard-{k}-of-3.jsonl")))
    assert not (out / MANIFEST_NAME).exists()
    shards = [{(r["input"], r["recipe"]): r for r in _records(out, f"lora-resize-batch.shard-{k}-of-3.jsonl")}
              for k in range(3)]
    inputs = [{i for i, _ in shard} for shard in shards]
    assert all(inputs) and sum(map(len, inputs)) == len(set().union(*inputs))  # disjoint, none empty
    merged = {key: record for shard in shards for key, record in shard.items()}
    strip = ("seconds", "output", "error")  # times, and paths under another -o

    def same(record):
        kept = {k: v for k, v in record.items() if k not in strip}
        return kept, Path(record["output"]).name if record["output"] else None

    assert {(r["input"], r["recipe"]): same(r) for r in ref_records} == {k: same(r) for k, r in merged.items()}
    assert _outputs(out) == ref_outputs
    assert main(_args(lib, out, base, "--shard", "1/3")) in (0, 1)
    again = _records(out, "lora-resize-batch.shard-1-of-3.jsonl")[counts[1]:]
    assert [r for r in again if r["status"] == "done"] == []
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    for split in ([], ["--shard", "0/2"]):  # split another way (or not at all): the shards' records hold
        assert main(_args(lib, out, base, *split)) == 1  # the broken files, tried again
        name = MANIFEST_NAME if not split else "lora-resize-batch.shard-0-of-2.jsonl"
        assert [r for r in _records(out, name) if r["status"] == "done"] == []  # re-work = 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps
    moved = tmp_path / "elsewhere" / "lib"  # the same library mounted elsewhere: the same split
    shutil.copytree(lib, moved)
    from core.batch import in_shard

    for k, names in enumerate(inputs):
        here = {str(Path(p).relative_to(lib)) for p in names}
        there = {str(Path(i.path).relative_to(moved)) for i in collect_inputs([str(moved)], str(tmp_path / "o2"))
                 if in_shard(i, str(tmp_path / "o2"), (k, 3))}
        assert here == there
    for bad in ("3/3", "x/2", "1", "-1/2"):
        assert main(_args(lib, tmp_path / "bad", base, "--shard", bad)) == 2


def test_two_workers_write_the_same_bytes_and_compute_norms_once(reference, tmp_path, capsys):
    lib, _, _, _, _, ref_outputs = reference
    base = _base(tmp_path)  # a fresh cache: every norm is computed in this run
    out = tmp_path / "out"
    assert main(_args(lib, out, base, "-j", "2")) == 1
    assert _outputs(out) == ref_outputs
    done = [r for r in _records(out) if r["status"] == "done"]
    assert len(done) == DONE_PAIRS
    assert all(r["norms_computed"] == 0 for r in done)  # no worker computed a base norm
    from core.base import open_base

    names = open_base(base).names()
    touched = {(layer.name, layer.offset) for name in SD15
               for layer in read_lora(os.path.join(LORAS, name + ".safetensors")) if layer.name in names}
    assert f"base norms of sd15: {len(touched)} computed" in capsys.readouterr().err
    cache = json.loads((Path(base).parent / ".lora_resize_norms.json").read_text())
    assert sum(len(entries) for entries in cache.values()) == len(touched)
    one = lib / "sd15" / "a" / (SD15[0] + ".safetensors")  # another run on the same base: all cached
    assert main(["batch", str(one), "-o", str(tmp_path / "again"), "--base", f"sd15={base}", "-r", RECIPES, "-q"]) == 0
    assert "base norms of sd15: 0 computed" in capsys.readouterr().out


def _done_count(manifest: Path) -> int:
    try:
        return manifest.read_text().count('"status": "done"')
    except FileNotFoundError:
        return 0


def _start(lib, out, base, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "core", *_args(lib, out, base, *extra)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_first_done(proc: subprocess.Popen, manifest: Path) -> None:
    deadline = time.monotonic() + 120
    while _done_count(manifest) == 0:
        assert proc.poll() is None, f"the batch ended before its first record: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_outputs(reference, tmp_path):
    lib, base, _, _, _, ref_outputs = reference
    out = tmp_path / "out"
    proc = _start(lib, out, base)
    _wait_first_done(proc, out / MANIFEST_NAME)
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen where we saw it, then killed there
    at_kill = _done_count(out / MANIFEST_NAME)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < at_kill < DONE_PAIRS  # killed mid-run, not after it
    assert main(_args(lib, out, base)) == 1
    assert _outputs(out) == ref_outputs
    assert _temps(out) == []
    records = _records(out)
    done = {(r["input"], r["recipe"]) for r in records if r["status"] == "done"}
    assert len(done) == DONE_PAIRS


def test_ctrl_c_exits_130_leaves_no_partial_file_and_resumes(reference, tmp_path):
    lib, base, _, _, _, ref_outputs = reference
    out = tmp_path / "out"
    proc = _start(lib, out, base, "-j", "2")
    _wait_first_done(proc, out / MANIFEST_NAME)
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen mid-run; Ctrl-C (to the whole group, as a terminal sends
    assert _done_count(out / MANIFEST_NAME) < DONE_PAIRS  # it) is delivered the moment it resumes
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _temps(out) == []
    for path in out.rglob("*.safetensors"):  # whatever is there is whole
        assert len(read_lora(path)) > 0
    finished = _done_count(out / MANIFEST_NAME)
    assert main(_args(lib, out, base)) == 1
    assert _outputs(out) == ref_outputs
    assert finished <= DONE_PAIRS


def test_output_there_without_a_record_is_kept_if_identical_else_refused(reference, tmp_path):
    lib, base, ref_out, _, _, ref_outputs = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    (out / MANIFEST_NAME).unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert main(_args(lib, out, base)) == 1
    assert len([r for r in _records(out) if r["status"] == "done"]) == DONE_PAIRS
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps  # kept, not rewritten
    other = tmp_path / "other"  # one folder of the tree: its outputs go straight into -o
    shutil.copytree(ref_out / "sd15" / "a", other)
    victim = other / f"{SD15[0]}_rank2.safetensors"
    victim.write_bytes(b"someone else's file")
    assert main(_args(lib / "sd15" / "a", other, base)) == 1
    failed = [r for r in _records(other) if r["status"] == "failed"]
    assert {r["input"] for r in failed} == {str(lib / "sd15" / "a" / f"{SD15[0]}.safetensors")}
    assert all("differs" in r["error"] and str(victim) in r["error"] for r in failed)
    assert victim.read_bytes() == b"someone else's file"
    assert _outputs(other) == {**{k[len("sd15/a/"):]: v for k, v in ref_outputs.items() if k.startswith("sd15/a/")},
                               victim.name: b"someone else's file"}


def test_a_record_cut_by_a_kill_is_ignored_and_the_next_starts_a_line(reference, tmp_path):
    lib, base, ref_out, _, _, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    manifest = out / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace(str(ref_out), str(out)) + '{"input": "/x", "rec')
    assert main(_args(lib, out, base)) == 1
    lines = manifest.read_text().splitlines()
    cut = lines.index('{"input": "/x", "rec')  # kept as it was; the new records start on the next line
    new = [json.loads(line) for line in lines[cut + 1:]]
    assert sorted(r["status"] for r in new) == ["failed"] * 6 + ["skipped"] * 2


def test_inputs_by_glob_and_list(reference, tmp_path):
    lib, base, _, _, _, _ = reference
    listing = tmp_path / "list.txt"
    sdxl = lib / "sdxl" / (OTHERS["sdxl"] + ".safetensors")
    listing.write_text(f"# comment\n{sdxl}\n\n{lib}/sd15/**/*.safetensors\n")
    out = tmp_path / "out"
    items = collect_inputs([f"@{listing}"], str(out))
    assert [(Path(i.path).name, Path(i.out_dir).relative_to(out)) for i in items] == \
        [(OTHERS["sdxl"] + ".safetensors", Path("."))] + [(n + ".safetensors", Path("a")) for n in sorted(SD15)] \
        + [(SD15[0] + ".safetensors", Path("b/deeper"))]  # the tree below the glob's root, lib/sd15
    assert main(["batch", f"@{listing}", "-o", str(out), "-r", "rank=2", "-q"]) == 0
    assert len([r for r in _records(out) if r["status"] == "done"]) == 2 + len(SD15)


def test_inputs_refused_up_front(reference, tmp_path):
    lib, _, _, _, _, _ = reference
    out = tmp_path / "out"
    one = lib / "sd15" / "a" / (SD15[0] + ".safetensors")
    two = lib / "sd15" / "b" / "deeper" / (SD15[0] + ".safetensors")
    with pytest.raises(UsageError, match="would both be written"):
        collect_inputs([str(one), str(two)], str(out))
    assert main(["batch", str(one), str(two), "-o", str(out), "-r", "rank=2", "-q"]) == 2
    assert main(["batch", str(lib / "nothing*.safetensors"), "-o", str(out), "-q"]) == 2
    with pytest.raises(UsageError, match="unknown family 'nosuch'"):
        parse_bases(["nosuch=x"])
    with pytest.raises(UsageError, match="checkpoint not found"):
        parse_bases([f"sd15={lib / 'missing.safetensors'}"])
    assert main(["batch", str(lib), "-o", str(out), "--base", "nosuch=x", "-q"]) == 2
    assert main(["batch", str(lib), "-o", str(out), "-j", "0", "-q"]) == 2
    assert not out.exists()  # nothing made before the command line is known good
    inside = lib / "sd15" / "a" / "resized"  # an output folder inside an input folder is never read as input
    items = collect_inputs([str(lib / "sd15" / "a")], str(inside))
    inside.mkdir()
    shutil.copy(one, inside)
    assert collect_inputs([str(lib / "sd15" / "a")], str(inside)) == items
    shutil.rmtree(inside)

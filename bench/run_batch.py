"""Batch figures (issue 11): files per minute, and the per-LoRA (marginal) time against its floor and the seed tool.

    python bench/make_data.py DATA --ranks 64 --variants 8     # once: the base + 8 distinct SDXL r64 LoRAs
    ELIAS_RESIZE_LORA=/path/to/resize_lora python bench/run_batch.py DATA [--repeat 1] [--only ...]

Scenarios, each a whole process timed from outside (wall time and peak RSS from its rusage, as bench/run.py):

- ``batch small -j1/-j2/--ray``: ``lora-resize batch`` on 100 small LoRAs (the 4 SD1.5 fixtures that fit the
  tiny base, copied round-robin under 100 names) against the tiny SD1.5 fixture base (copied, so its norms
  cache is not written into the repo), ``fro_ckpt=1,thr=-3.5``; a fresh output folder each time (no resume).
- ``batch sdxl8 -j1/-j2/--ray``: the same on the 8 full-size SDXL r64 LoRAs against the SDXL base (warm norms).
  Files per minute = files / wall × 60, ``import torch`` and (Ray) the local cluster's start included.
- ``marginal``: the resize command on 1 and on 8 of those LoRAs in one process, ours, the seed tool's (it takes
  many LoRAs in one process too) and the floor (this script's ``--floor`` mode: the CLI's imports, then per
  LoRA read all its bytes into memory and write and fsync a safetensors file of our output's size). Per-LoRA time =
  (T(8) − T(1)) / 7: ``import torch``, the base's header and the norms cache are paid once and cancel out.
  Rounds are interleaved (ours, seed, floor, each 1 then 8); medians over rounds.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
RECIPE = "fro_ckpt=1,thr=-3.5"
SMALL_COUNT = 100
# the repo's SD1.5 fixtures whose layers the tiny fixture base holds at their shapes (the LyCORIS ones were
# made against other widths): kohya LoCon, kohya from diffusers, PEFT, PEFT DoRA
SMALL_SOURCES = ("sd15_kohya_locon_r4a2_c2a1", "sd15_kohya_via_diffusers", "sd15_peft_r4a8_meta", "sd15_peft_dora")
FULL_COUNT = 8


def timed(cmd, cwd=ROOT, timeout=3600):
    from bench.run import timed as run_timed

    return run_timed(cmd, cwd, timeout)


def small_set(folder: str, count: int = SMALL_COUNT) -> tuple[str, list[str]]:
    """(base, 100 LoRA paths): SD1.5 fixtures the tiny base serves, copied round-robin under distinct names."""
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, "sd15_tiny_base.safetensors")
    shutil.copy(os.path.join(fixtures, "base", "sd15_tiny_base.safetensors"), base)
    sources = [os.path.join(fixtures, "lora", name + ".safetensors") for name in SMALL_SOURCES]
    loras = os.path.join(folder, "loras")
    os.makedirs(loras)
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        path = os.path.join(loras, f"{i:03d}_{os.path.basename(source)}")
        shutil.copy(source, path)
        paths.append(path)
    return base, paths


def full_set(data: str, count: int = FULL_COUNT) -> list[str]:
    from bench.make_data import lora_name

    paths = [os.path.join(data, lora_name(64, v)) for v in range(count)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit(f"missing {missing[0]}: run python bench/make_data.py {data} --ranks 64 --variants {FULL_COUNT}")
    return paths


def manifest_counts(out: str) -> dict:
    counts: dict[str, int] = {}
    seconds = 0.0
    with open(os.path.join(out, "lora-resize-batch.jsonl")) as fh:
        for line in fh:
            record = json.loads(line)
            counts[record["status"]] = counts.get(record["status"], 0) + 1
            seconds += record.get("seconds") or 0.0
    return {"statuses": counts, "record_seconds": round(seconds, 2)}


def batch_runs(name: str, inputs: list[str], base_arg: str, files: int, repeat: int, work: str) -> list[dict]:
    rows = []
    for label, mode in (("-j 1", ["-j", "1"]), ("-j 2", ["-j", "2"]), ("--ray", ["--ray"])):
        runs = []
        for _ in range(repeat):
            out = os.path.join(work, "batch-out")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [PY, "-m", "core", "batch", *inputs, "-o", out, "-r", RECIPE, "--base", base_arg, "-q", *mode]
            wall, rss, code = timed(cmd)
            runs.append((wall, rss, code, manifest_counts(out) if code == 0 else {}))
        wall = statistics.median(r[0] for r in runs)
        rows.append({"scenario": f"batch {name} {label}", "files": files, "wall_s": wall,
                     "files_per_min": files / wall * 60, "rss_mib": max(r[1] for r in runs),
                     "ok": all(r[2] == 0 for r in runs), "runs": [r[0] for r in runs], "manifest": runs[-1][3],
                     "command": " ".join(cmd[:4] + ["<inputs>"] + cmd[4 + len(inputs):])})
        print(f"{rows[-1]['scenario']}: {wall:.1f} s, {rows[-1]['files_per_min']:.1f} files/min, "
              f"{rows[-1]['rss_mib']:.0f} MiB, {runs[-1][3]}", flush=True)
    return rows


def marginal(data: str, loras: list[str], repeat: int, work: str, elias: str | None,
             seed_passive_too: bool = False) -> dict:
    base = os.path.join(data, "sdxl_base_synthetic.safetensors")
    out = os.path.join(work, "marginal-out")

    def fresh() -> str:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        return out

    def ours(n):
        return timed([PY, "-m", "core", base, *loras[:n], "-o", fresh(), "-q"])

    fresh()
    timed([PY, "-m", "core", base, loras[0], "-o", out, "-q"])  # warm: norms cache, page cache
    produced = glob.glob(os.path.join(out, "*.safetensors"))
    out_bytes = os.path.getsize(produced[0])

    def floor(n):
        return timed([PY, os.path.abspath(__file__), "--floor", str(out_bytes), fresh(), *loras[:n]])

    def seed(n):
        return timed([PY, "resize_lora.py", base, *loras[:n], "-o", fresh(), "-d", "cpu"], cwd=elias)

    def seed_passive(n):  # the seed tool with the OpenMP wait policy our CLI sets (core/__init__.py)
        return timed(["env", "OMP_WAIT_POLICY=PASSIVE", PY, "resize_lora.py", base, *loras[:n], "-o", fresh(),
                      "-d", "cpu"], cwd=elias)

    tools = {"ours": ours, "floor": floor}
    if elias:
        seed(1)  # warm its norms cache
        tools["seed"] = seed
        if seed_passive_too:
            tools["seed_passive"] = seed_passive
    rounds: dict[str, list] = {name: [] for name in tools}
    n = len(loras)
    for _ in range(repeat):
        for name, run in tools.items():
            one, many = run(1), run(n)
            rounds[name].append({"t1": one[0], f"t{n}": many[0], "rss1": one[1], f"rss{n}": many[1],
                                 "ok": one[2] == 0 and many[2] == 0, "per_lora": (many[0] - one[0]) / (n - 1)})
            print(f"marginal {name}: T(1) {one[0]:.2f} s, T({n}) {many[0]:.2f} s, per LoRA "
                  f"{rounds[name][-1]['per_lora']:.2f} s", flush=True)
    summary = {name: {"per_lora_s": statistics.median(r["per_lora"] for r in rs), "rounds": rs}
               for name, rs in rounds.items()}
    summary["output_bytes"] = out_bytes
    summary["ours_over_floor"] = summary["ours"]["per_lora_s"] / summary["floor"]["per_lora_s"]
    if "seed" in summary:
        summary["seed_over_ours"] = summary["seed"]["per_lora_s"] / summary["ours"]["per_lora_s"]
    if "seed_passive" in summary:
        summary["seed_passive_over_ours"] = summary["seed_passive"]["per_lora_s"] / summary["ours"]["per_lora_s"]
    return summary


def floor_main(out_bytes: int, out: str, loras: list[str]) -> None:
    """Per LoRA: read every byte of it into memory (core's one-pass read: safetensors' load_file only maps the
    file, and would read just the tensors written) and write ``out_bytes`` of its tensors as a safetensors
    file (safetensors' save_file), fsynced as ours are."""
    import torch  # noqa: F401
    from safetensors.torch import save_file

    import core.cli  # noqa: F401  (the same imports as the CLI)
    from core.safetensors_io import load_tensors

    for path in loras:
        tensors = load_tensors(path)
        kept, size = {}, 0
        for key, tensor in tensors.items():
            if size >= out_bytes:
                break
            kept[key] = tensor
            size += tensor.numel() * tensor.element_size()
        target = os.path.join(out, os.path.basename(path))
        save_file(kept, target)
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        floor_main(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=["small", "sdxl8", "marginal"], default=None)
    parser.add_argument("--seed-passive", action="store_true",
                        help="also time the seed tool with OMP_WAIT_POLICY=PASSIVE (as our CLI runs)")
    parser.add_argument("--full-count", type=int, default=FULL_COUNT, help="SDXL LoRAs (a quick check: 2)")
    parser.add_argument("--small-count", type=int, default=SMALL_COUNT, help="small LoRAs (a quick check: 8)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results_batch.json"))
    args = parser.parse_args()
    only = set(args.only or ["small", "sdxl8", "marginal"])
    work = tempfile.mkdtemp(prefix="lora-batch-bench-")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results: dict = {"started": started, "recipe": RECIPE, "cpus": os.cpu_count(), "results": []}
    try:
        loras = full_set(args.data, args.full_count) if only & {"sdxl8", "marginal"} else []
        if "marginal" in only:
            results["marginal"] = marginal(args.data, loras, args.repeat, work,
                                           os.environ.get("ELIAS_RESIZE_LORA"), args.seed_passive)
        if "small" in only:
            base, small = small_set(os.path.join(work, "small"), args.small_count)
            results["results"] += batch_runs(f"small{len(small)}", [os.path.dirname(small[0])], f"sd15={base}",
                                             len(small), args.repeat, work)
        if "sdxl8" in only:
            base = os.path.join(args.data, "sdxl_base_synthetic.safetensors")
            results["results"] += batch_runs("sdxl8", loras, f"sdxl={base}", len(loras), args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print("| scenario | files | wall s | files/min | peak RSS MiB | ok |\n|---|---|---|---|---|---|")
    for r in results["results"]:
        print(f"| {r['scenario']} | {r['files']} | {r['wall_s']:.1f} | {r['files_per_min']:.1f} | "
              f"{r['rss_mib']:.0f} | {'yes' if r['ok'] else 'FAILED'} |")
    m = results.get("marginal")
    if m:
        for name in ("ours", "seed", "seed_passive", "floor"):
            if name in m:
                print(f"per-LoRA {name}: {m[name]['per_lora_s']:.2f} s")
        print(f"ours / floor: {m['ours_over_floor']:.2f}x" +
              (f"; seed / ours: {m['seed_over_ours']:.2f}x" if "seed_over_ours" in m else ""))


if __name__ == "__main__":
    main()

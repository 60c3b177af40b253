"""Benchmark: wall time and peak RSS of whole processes, medians of N, against the issue's targets.

    python bench/make_data.py DATA              # once: ~5.8 GB base + rank-64/128 LoRAs
    python bench/run.py DATA [--repeat 3] [--out bench/results.json]
    ELIAS_RESIZE_LORA=/path/to/resize_lora KOHYA_SD_SCRIPTS=/path/to/sd-scripts python bench/run.py DATA

Each scenario is a separate process; wall time and peak RSS come from its rusage. "cold" deletes the norms cache
first (the OS page cache is left as it is: the base file is usually already cached after the first
run, which favours every tool equally); "warm" runs with the cache from the previous run. Peers
are run on the same data when their checkouts are given by environment variable.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CACHE = ".lora_resize_norms.json"


def timed(cmd: list[str], cwd: str = ROOT, timeout: int = 1800) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one process, from the kernel's rusage of the child
    (no /usr/bin/time needed, so it runs on bare machines too)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
    return (float(timeout), 0.0, 124) if wall >= timeout else (wall, usage.ru_maxrss / 1024, code)


ONLY: list[str] = []


def scenario(name, cmd, repeat, before=None, cwd=ROOT, timeout=1800):
    if ONLY and not any(part in name for part in ONLY):
        return None
    runs = []
    for _ in range(repeat):
        if before:
            before()
        runs.append(timed(cmd, cwd, timeout))
    ok = all(code == 0 for _, _, code in runs)
    return {"scenario": name, "command": " ".join(cmd), "wall_s": statistics.median(r[0] for r in runs),
            "rss_mib": max(r[1] for r in runs), "ok": ok, "runs": [r[0] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results.json"))
    parser.add_argument("--device", help="pass -d DEVICE to our runs (cpu, cuda)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers even when their paths are set")
    parser.add_argument("--only", nargs="*", help="run only the scenarios whose name contains one of these")
    args = parser.parse_args()
    device = ["-d", args.device] if args.device else []
    ONLY[:] = args.only or []
    base = os.path.join(args.data, "sdxl_base_synthetic.safetensors")
    r64 = os.path.join(args.data, "sdxl_lora_r64.safetensors")
    r128 = os.path.join(args.data, "sdxl_lora_r128.safetensors")
    out = tempfile.mkdtemp(prefix="lora-bench-")
    size_target = round(os.path.getsize(r64) / 2**20 / 2)

    def clean_out():
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)

    def cold():
        clean_out()
        for folder in (args.data, os.path.expanduser("~/.cache/comfyui-lora-resize")):
            path = os.path.join(folder, CACHE)
            if os.path.exists(path):
                os.remove(path)

    ours = [PY, "-m", "core", *device, base]
    results = [
        scenario("I/O only (load + save r64)", [PY, "bench/io_only.py", r64, os.path.join(out, "io.safetensors")],
                 args.repeat, clean_out),
        scenario("I/O + read base tensors", [PY, "bench/io_only.py", r64, os.path.join(out, "io.safetensors"),
                                             "--base", base], args.repeat, clean_out),
        scenario("cold fro_ckpt=1,thr=-3.5 r64", ours + [r64, "-o", out, "-q"], args.repeat, cold),
        scenario("warm fro_ckpt=1,thr=-3.5 r64", ours + [r64, "-o", out, "-q"], args.repeat, clean_out),
        scenario(f"cold spn_ckpt=1,size={size_target} r64", ours + [r64, "-o", out, "-q", "-r",
                                                                   f"spn_ckpt=1,size={size_target}"],
                 args.repeat, cold),
        scenario("sv_ratio=2 r64 (no base)", [PY, "-m", "core", *device, "-", r64, "-o", out, "-q", "-r", "sv_ratio=2"],
                 args.repeat, clean_out),
        scenario("warm fro_ckpt=1,thr=-3.5 r128", ours + [r128, "-o", out, "-q"], args.repeat, clean_out),
    ]
    elias = None if args.no_peers else os.environ.get("ELIAS_RESIZE_LORA")
    if elias:
        def elias_cold():
            clean_out()
            path = os.path.join(elias, "norms_cache.json")
            if os.path.exists(path):
                os.remove(path)

        cmd = [PY, "resize_lora.py", base, r64, "-o", out, "-d", "cpu"]
        results.append(scenario("elias cold fro_ckpt=1,thr=-3.5 r64", cmd, args.repeat, elias_cold, cwd=elias))
        results.append(scenario("elias warm fro_ckpt=1,thr=-3.5 r64", cmd, args.repeat, clean_out, cwd=elias))
        results.append(scenario(f"elias cold spn_ckpt=1,size={size_target} r64",
                                cmd + ["-r", f"spn_ckpt=1,size={size_target}"], 1, elias_cold, cwd=elias))
    kohya = None if args.no_peers else os.environ.get("KOHYA_SD_SCRIPTS")
    if kohya:
        kohya_py = os.environ.get("KOHYA_PYTHON", PY)
        cmd = [kohya_py, "networks/resize_lora.py", "--model", r64, "--save_to", os.path.join(out, "k.safetensors"),
               "--new_rank", "64", "--dynamic_method", "sv_ratio", "--dynamic_param", "2", "--save_precision", "fp16",
               "--device", "cpu"]
        results.append(scenario("kohya sv_ratio=2 r64", cmd, 1, clean_out, cwd=kohya,
                                timeout=int(os.environ.get("KOHYA_TIMEOUT", "900"))))
    shutil.rmtree(out, ignore_errors=True)
    results = [r for r in results if r is not None]
    with open(args.out, "w") as fh:
        json.dump({"lora_mib": os.path.getsize(r64) / 2**20, "results": results}, fh, indent=1)
    by_name = {r["scenario"]: r for r in results}
    ratios = []
    for ours_name, theirs_name in (("warm fro_ckpt=1,thr=-3.5 r64", "elias warm fro_ckpt=1,thr=-3.5 r64"),
                                   ("cold fro_ckpt=1,thr=-3.5 r64", "elias cold fro_ckpt=1,thr=-3.5 r64"),
                                   (f"cold spn_ckpt=1,size={size_target} r64",
                                    f"elias cold spn_ckpt=1,size={size_target} r64"),
                                   ("sv_ratio=2 r64 (no base)", "kohya sv_ratio=2 r64")):
        if ours_name in by_name and theirs_name in by_name:
            ratio = by_name[theirs_name]["wall_s"] / by_name[ours_name]["wall_s"]
            ratios.append(f"{theirs_name} / ours: {ratio:.2f}x")
    print("| scenario | median wall s | peak RSS MiB | runs | ok |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['wall_s']:.2f} | {r['rss_mib']:.0f} | "
              f"{', '.join(f'{x:.2f}' for x in r['runs'])} | {'yes' if r['ok'] else 'FAILED'} |")
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()

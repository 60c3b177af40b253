"""DiT benchmark rows: Flux.1-dev r64 and Wan 2.1 14B r128 (fp8 bases), beside kohya sd-scripts and KJNodes.

    python bench/make_dit_data.py DATA
    KOHYA_SD_SCRIPTS=/path/to/sd-scripts KOHYA_PYTHON=/its/python KJNODES=/path/to/ComfyUI-KJNodes \
      COMFYUI_PATH=/path/to/ComfyUI python bench/run_dit.py DATA [--family flux wan14b] [--out bench/results_dit.json]

Our runs resize the whole LoRA (fixed rank 32, kohya's sv_fro=0.9 rule, and the base-aware default recipe with
the fp8 base read tensor by tensor, whose peak RSS is checked against 2 x the LoRA file + 1 GiB). The peers do a
dense SVD of every layer's ΔW, which on this CPU takes minutes per block, so all three tools are also timed on
one subset LoRA (the first blocks of the same file, cut by ``--subset`` blocks) in the same minutes: those
ratios are the comparison; whole-file peer times are that ratio times our whole-file time, stated as such.
KJNodes' ``resize_lora_model`` (nodes/lora_nodes.py, never vendored) runs outside a server: a driver written
to a temp folder imports it from the checkout with ComfyUI on the path (``--cpu``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.make_dit_data import FAMILIES  # noqa: E402
from bench.run import ONLY, PY, scenario  # noqa: E402

MIB = 1 << 20
PEER_TIMEOUT = [3600]  # seconds a peer scenario may run before it is killed and reported as not finished
_KJ_DRIVER = '''
import importlib.util, os, sys
comfy, kj, src, dst, rank, method, param = sys.argv[1:8]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy)
os.chdir(comfy)
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import load_file, save_file
spec = importlib.util.spec_from_file_location("kj_lora_nodes", os.path.join(kj, "nodes", "lora_nodes.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sd = load_file(src)
out, _, _, ranks = module.resize_lora_model(sd, int(rank), torch.bfloat16, "cpu", method,
                                            None if param == "-" else float(param), False)
save_file({k: v.contiguous() for k, v in out.items()}, dst)
'''


def subset_lora(source: str, dest: str, blocks: int) -> int:
    """The layers of the first ``blocks`` blocks of each kind (double/single for Flux, blocks for Wan), verbatim."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    keep = {}
    with safe_open(source, "pt") as fh:
        metadata = fh.metadata()
        for key in fh.keys():
            match = re.search(r"_(double_blocks|single_blocks|blocks)_(\d+)_", key)
            if match and int(match.group(2)) < blocks:
                keep[key] = fh.get_tensor(key)
    save_file(keep, dest, metadata=metadata)
    return len({k.split(".")[0] for k in keep})


def rows_for(family: str, data: str, out: str, subset_blocks: int, repeat: int) -> list[dict]:
    spec = FAMILIES[family]
    base = os.path.join(data, spec["base"])
    lora = os.path.join(data, spec["lora"])
    lora_mib = os.path.getsize(lora) / MIB
    bound = 2 * lora_mib + 1024

    def clean():
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)

    def cold():
        clean()
        cache = os.path.join(data, ".lora_resize_norms.json")
        if os.path.exists(cache):
            os.remove(cache)

    ours = [PY, "-m", "core"]
    aware = ours + [base, lora, "-o", out, "-q", "-t", "bf16"]
    rows = [
        scenario(f"{family} ours rank=32 (no base)", ours + ["-", lora, "-o", out, "-q", "-r", "rank=32", "-t", "bf16"],
                 repeat, clean),
        scenario(f"{family} ours sv_fro=0.9 (no base)", ours + ["-", lora, "-o", out, "-q", "-r", "sv_fro=0.9",
                                                               "-t", "bf16"], repeat, clean),
        scenario(f"{family} ours cold fro_ckpt=1,thr=-3.5 (fp8 base)", aware, 1, cold, timeout=3600),
        scenario(f"{family} ours warm fro_ckpt=1,thr=-3.5 (fp8 base)", aware, repeat, clean, timeout=3600),
    ]
    for row in rows:
        if row is not None:
            row.update(lora_mib=lora_mib, rss_bound_mib=bound, within_bound=row["rss_mib"] <= bound)
    sub = os.path.join(out + "-subset", f"{family}_subset.safetensors")
    os.makedirs(os.path.dirname(sub), exist_ok=True)
    layers = subset_lora(lora, sub, subset_blocks)
    subset_rows = [
        scenario(f"{family} subset ours rank=32", ours + ["-", sub, "-o", out, "-q", "-r", "rank=32", "-t", "bf16"],
                 repeat, clean),
        scenario(f"{family} subset ours sv_fro=0.9", ours + ["-", sub, "-o", out, "-q", "-r", "sv_fro=0.9",
                                                            "-t", "bf16"], repeat, clean),
    ]
    kohya = os.environ.get("KOHYA_SD_SCRIPTS")
    if kohya:
        kpy = os.environ.get("KOHYA_PYTHON", PY)
        kohya_path = os.pathsep.join(p for p in (kohya, os.environ.get("PYTHONPATH")) if p)  # its deps there too
        env_cmd = ["env", f"PYTHONPATH={kohya_path}", kpy, "networks/resize_lora.py", "--model", sub, "--save_to",
                   os.path.join(out, "k.safetensors"), "--save_precision", "bf16", "--device", "cpu"]
        subset_rows.append(scenario(f"{family} subset kohya new_rank=32", env_cmd + ["--new_rank", "32"], 1, clean,
                                    cwd=kohya, timeout=PEER_TIMEOUT[0]))
        subset_rows.append(scenario(f"{family} subset kohya sv_fro=0.9",
                                    env_cmd + ["--new_rank", str(spec["rank"]), "--dynamic_method", "sv_fro",
                                               "--dynamic_param", "0.9"], 1, clean, cwd=kohya, timeout=PEER_TIMEOUT[0]))
    kj, comfy = os.environ.get("KJNODES"), os.environ.get("COMFYUI_PATH")
    if kj and comfy:
        driver = os.path.join(out + "-subset", "kj_driver.py")
        with open(driver, "w") as fh:
            fh.write(_KJ_DRIVER)
        base_cmd = [PY, driver, comfy, kj, sub, os.path.join(out, "kj.safetensors")]
        subset_rows.append(scenario(f"{family} subset KJNodes rank=32", base_cmd + ["32", "disabled", "-"], 1, clean,
                                    timeout=PEER_TIMEOUT[0]))
        subset_rows.append(scenario(f"{family} subset KJNodes sv_fro=0.9",
                                    base_cmd + [str(spec["rank"]), "sv_fro", "0.9"], 1, clean, timeout=PEER_TIMEOUT[0]))
    for row in subset_rows:
        if row is not None:
            row.update(subset_layers=layers, subset_mib=os.path.getsize(sub) / MIB)
    shutil.rmtree(out + "-subset", ignore_errors=True)
    return [r for r in rows + subset_rows if r is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--subset", type=int, default=2, help="blocks of each kind in the peers' subset LoRA")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results_dit.json"))
    parser.add_argument("--only", nargs="*", help="run only the scenarios whose name contains one of these")
    parser.add_argument("--peer-timeout", type=int, default=3600, help="seconds before a peer run is killed")
    args = parser.parse_args()
    ONLY[:] = args.only or []
    PEER_TIMEOUT[0] = args.peer_timeout
    out = tempfile.mkdtemp(prefix="lora-bench-dit-")
    results = []
    for family in args.family:
        for row in rows_for(family, args.data, out, args.subset, args.repeat):
            print(f"{row['scenario']:<52} {row['wall_s']:8.1f} s  {row['rss_mib']:8.0f} MiB  ok={row['ok']}",
                  flush=True)
            results.append(row)
    shutil.rmtree(out, ignore_errors=True)
    with open(args.out, "w") as fh:
        json.dump({"command": " ".join(["python", "bench/run_dit.py", *sys.argv[1:]]), "results": results}, fh,
                  indent=1)
        fh.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The seed tool's evaluation, done: how much each selection method changes a LoRA at matched file sizes.

    python bench/evaluate.py BASE LORA [--thresholds -1.0 -1.2 -1.5] [--sizes MIB ...] [--append]
                             [--kohya with|later|only] [--out bench/evaluation_sdxl.json]
    python bench/plot_evaluation.py bench/evaluation_sdxl.json docs/evaluation_sdxl.png

The seed's README procedure ("TBD" there): compress with ``spn_ckpt=1,thr=T`` and note the size S; compress
with ``spn_lora=1,size=S`` and note its threshold t; compare with kohya's ``sv_ratio`` at 10^-t. Here every
method is matched to each S (three thresholds T give three sizes): the scored methods by ``size=S``, kohya's
``sv_fro`` by bisection on its fraction, a uniform ``rank=N`` (and ``method=rsvd`` / ``method=randproj`` with
three seeds) at the largest N that fits, and kohya's sv_ratio rule at 10^-t: this pack's ``sv_ratio=`` and,
when ``KOHYA_SD_SCRIPTS`` (and optionally ``KOHYA_PYTHON``) point at sd-scripts, kohya's own
``networks/resize_lora.py`` on the same file.

Errors are exact and computed without forming ΔW: for ΔW = U·diag(S)·Vh (the decomposition) and a rebuilt
ΔW' = s·B'·A', ‖ΔW − ΔW'‖² = ‖S‖² + s²·tr((B'ᵀB')(A'A'ᵀ)) − 2s·Σᵢⱼ Sᵢ (UᵀB')ᵢⱼ (VhA'ᵀ)ᵢⱼ, in fp64.
Reported: the LoRA-relative error √(Σ‖ΔW − ΔW'‖² / Σ‖ΔW‖²), the base-relative error Σ‖ΔW − ΔW'‖ / Σ‖W‖ (the
issue's form: sums of per-layer norms) and √(Σ‖ΔW − ΔW'‖² / Σ‖W‖²) (what ``err_ckpt=`` budgets).
Sizes are the fp16 file each result writes (``encoded_size``: header and metadata counted).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core.base import open_base  # noqa: E402
from core.decompose import decompose  # noqa: E402
from core.delta import effective_down  # noqa: E402
from core.formats import read_lora  # noqa: E402
from core.formats.writer import encoded_size  # noqa: E402
from core.norms_cache import NormCache  # noqa: E402
from core.recipe import parse_recipe  # noqa: E402
from core.resize import apply_recipe, reference_table  # noqa: E402

MIB = 1 << 20


def factored_errors(items, lora) -> dict[str, float]:
    """Per layer key: ‖ΔW − ΔW'‖² of the rebuilt LoRA ``lora`` against the decomposed source, in fp64."""
    errors = {}
    for item in items:
        S = item.S.double()
        total = float(S.pow(2).sum())
        layer = lora.layers.get(item.key)
        if layer is None:
            errors[item.key] = total
            continue
        U, Vh = item.left().double(), item.right().double()
        B = layer.factors["up"].double().flatten(1)
        A = effective_down(layer).double()
        s = float(layer.scale)
        own = float(((B.T @ B) * (A @ A.T)).sum()) * s * s
        cross = float((S[:, None] * (U.T @ B) * (Vh @ A.T)).sum()) * s
        errors[item.key] = max(total + own - 2 * cross, 0.0)
    return errors


class Evaluation:
    """One LoRA against one base: decomposed once, base norms once, every recipe measured the same way."""

    def __init__(self, base_path: str, lora_path: str):
        self.lora = read_lora(lora_path)
        self.lora_path = lora_path
        self.base = open_base(base_path)
        started = time.perf_counter()
        self.items = decompose(self.lora)
        cache = NormCache.for_checkpoint(base_path)
        needs = [parse_recipe("spn_ckpt=1,fro_ckpt=1,subspace=1,thr=0")]
        self.refs = reference_table(self.items, needs, self.base, cache=cache, architecture=self.lora.architecture,
                                    label=base_path)
        cache.save()
        self.setup_seconds = time.perf_counter() - started
        self.energy = {item.key: float(item.S.double().pow(2).sum()) for item in self.items}
        self.base_fro = {item.key: float(self.refs[item.key].frobenius) for item in self.items}
        self.original_size = os.path.getsize(lora_path)
        self.original_rank = sum(item.layer.rank for item in self.items)

    def run(self, text: str) -> dict:
        recipe = parse_recipe(text)
        refs = self.refs if recipe.needs_base else {}
        result = apply_recipe(self.items, recipe, refs, template=self.lora, dtype=torch.float16)
        return self.measure(text, result.lora, result.threshold)

    def measure(self, text: str, lora, threshold=None, size: int | None = None) -> dict:
        errors = factored_errors(self.items, lora)
        dropped = sum(errors.values())
        if size is None:
            size = encoded_size(lora, dtype=torch.float16) if lora.layers else 0
        return {"recipe": text, "mib": size / MIB,
                "rank": sum(layer.rank for layer in lora), "threshold": threshold,
                "rle_lora": math.sqrt(dropped / sum(self.energy.values())),
                "rle_ckpt_sum": sum(math.sqrt(e) for e in errors.values()) / sum(self.base_fro.values()),
                "rle_ckpt_rss": math.sqrt(dropped / sum(f * f for f in self.base_fro.values()))}

    def largest_fitting(self, make, low: float, high: float, target_mib: float, integer: bool, steps: int = 14):
        """The parameter in [low, high] of ``make`` (monotone in size) whose size is the largest ≤ target."""
        best = None
        for _ in range(steps if not integer else 64):
            if integer and high - low <= 1:
                break
            mid = (low + high) // 2 if integer else (low + high) / 2
            row = self.run(make(mid))
            if row["mib"] <= target_mib:
                best, low = row, mid
            else:
                high = mid
        if integer and best is None:
            best = self.run(make(low))
        return best or self.run(make(low))


def _kohya_outputs(evaluation: Evaluation, ratios: list[float], tmp: str) -> list[dict]:
    """Run kohya's resize_lora.py once per ratio; by default through bench/kohya_economy.py (one process, economy
    SVDs remembered across ratios), with ``KOHYA_DENSE=1`` as their script ships (a process and dense SVDs each)."""
    scripts = os.environ["KOHYA_SD_SCRIPTS"]
    python = os.environ.get("KOHYA_PYTHON", sys.executable)
    max_rank = max(item.layer.rank for item in evaluation.items)
    common = ["--model", evaluation.lora_path, "--new_rank", str(max_rank), "--save_precision", "fp16",
              "--device", "cpu"]
    # its `library` package, as `pip install -e .` would give, before what the caller put on the path
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (scripts, os.environ.get("PYTHONPATH")) if p)}
    timeout = int(os.environ.get("KOHYA_TIMEOUT", "7200"))
    if os.environ.get("KOHYA_DENSE") != "1":
        low_rank = ["--low-rank"] if os.environ.get("KOHYA_LOW_RANK") == "1" else []
        checks = ["--check", os.environ.get("KOHYA_CHECK", "0")]
        cmd = [python, os.path.join(ROOT, "bench", "kohya_economy.py"), scripts, tmp, *map(repr, ratios), *low_rank,
               *checks, "--", *common]
        done = subprocess.run(cmd, cwd=scripts, capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return [{"error": f"exit {done.returncode}", "seconds": 0.0, "path": None} for _ in ratios]
        records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        svd = "exact range (--low-rank)" if low_rank else "economy"
        return [{**record, "svd": f"{svd}, remembered across ratios"} for record in records]
    records = []
    for ratio in ratios:
        out = os.path.join(tmp, f"kohya_dense_{ratio!r}.safetensors")
        cmd = [python, "networks/resize_lora.py", *common, "--dynamic_method", "sv_ratio", "--dynamic_param",
               repr(ratio), "--save_to", out]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=scripts, capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
        records.append({"ratio": ratio, "path": out if done.returncode == 0 else None, "svd": "dense (as shipped)",
                        "seconds": time.perf_counter() - started, "error": done.returncode or None})
    return records


def kohya_rows(evaluation: Evaluation, ratios: list[float]) -> list[dict] | None:
    """kohya sd-scripts' own resize_lora.py --dynamic_method sv_ratio at each ratio, measured on the same items."""
    if not os.environ.get("KOHYA_SD_SCRIPTS"):
        return None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio, record in zip(ratios, _kohya_outputs(evaluation, ratios, tmp)):
            recipe = f"kohya sv_ratio={ratio:.4g}"
            if not record.get("path"):
                rows.append({"recipe": recipe, "error": str(record.get("error"))})
                continue
            resized = read_lora(record["path"])
            layers = {}
            for item in evaluation.items:  # kohya keeps its key names: match by the canonical layer name
                layers.update({item.key: layer for layer in resized if layer.name == item.layer.name})
            resized.layers = layers
            row = evaluation.measure(recipe, resized, size=os.path.getsize(record["path"]))
            row["seconds"] = record["seconds"]
            row["kohya_svd"] = record["svd"]
            row.update({k: record[k] for k in ("checked_layers", "max_rel_diff_vs_dense") if k in record})
            rows.append(row)
    return rows


def at_kohya_size(evaluation: Evaluation, kohya: dict) -> list[dict]:
    """kohya's file is larger than the matched size (+1 rank in every layer): the pack's rules at its size."""
    return [{**evaluation.run(f"{method},size={kohya['mib']:.6g}"), "at_kohya_size": True}
            for method in ("fro_ckpt=1", "spn_lora=1")]


def print_row(row: dict) -> None:
    print(f"  {row['recipe']:<38} {row.get('mib', float('nan')):8.2f} MiB  rank {row.get('rank', 0):6d}  "
          f"lora {100 * row.get('rle_lora', float('nan')):6.2f}%  ckpt {100 * row.get('rle_ckpt_sum', 0):.4f}%",
          flush=True)


def write_report(report: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")


def evaluate(evaluation: Evaluation, anchors: list[str], seeds: int = 3, with_kohya: bool = True) -> list[dict]:
    """One group per anchor recipe (``spn_ckpt=1,thr=T`` as the seed's procedure, or ``spn_ckpt=1,size=S``)."""
    rows = []
    for text in anchors:
        anchor = evaluation.run(text)
        target = anchor["mib"]
        group = {"size_mib": target, "anchor": anchor["recipe"], "rows": [anchor]}
        seed_step = evaluation.run(f"spn_lora=1,size={target:.6g}")
        group["rows"].append(seed_step)
        for method in ("fro_ckpt=1", "subspace=1", "fro_ckpt=1,params=0.25"):
            group["rows"].append(evaluation.run(f"{method},size={target:.6g}"))
        group["rows"].append(evaluation.largest_fitting(lambda f: f"sv_fro={f:.6f}", 0.05, 0.999999, target, False))
        top = max(item.layer.rank for item in evaluation.items)
        rank_row = evaluation.largest_fitting(lambda n: f"rank={int(n)}", 1, top + 1, target, True)
        group["rows"].append(rank_row)
        rank = int(rank_row["recipe"].split("=")[1])
        group["rows"].append(evaluation.run(f"rank={rank},method=rsvd"))
        for seed in range(seeds):
            group["rows"].append(evaluation.run(f"rank={rank},method=randproj,seed={seed}"))
        ratio = 10 ** -seed_step["threshold"]
        group["kohya_ratio"] = ratio
        group["rows"].append(evaluation.run(f"sv_ratio={ratio:.6g}"))
        kohya = kohya_rows(evaluation, [ratio]) if with_kohya else None
        group["rows"].extend(kohya or [])
        for row in [r for r in kohya or [] if "mib" in r]:
            group["rows"].extend(at_kohya_size(evaluation, row))
        for row in group["rows"]:
            print_row(row)
        rows.append(group)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("lora")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[-1.0, -1.2, -1.5])
    parser.add_argument("--sizes", type=float, nargs="*", default=[],
                        help="also anchor at spn_ckpt=1,size=S MiB (the threshold that size gives)")
    parser.add_argument("--append", action="store_true", help="add the groups to an existing --out")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "evaluation.json"))
    parser.add_argument("--kohya", choices=("with", "later", "only", "matched"), default="with",
                        help="later: skip kohya's script; only: add its rows to an existing --out (the same ratios), "
                             "with fro_ckpt and spn_lora at kohya's file size; matched: only those two")
    args = parser.parse_args()
    torch.manual_seed(0)
    evaluation = Evaluation(args.base, args.lora)
    if args.kohya in ("only", "matched"):
        report = json.load(open(args.out))
        stored = next(r for r in report["groups"][0]["rows"] if r["recipe"].startswith("sv_ratio="))
        again = evaluation.run(stored["recipe"])  # the rows being added must measure the same files as the rest
        if not math.isclose(again["rle_lora"], stored["rle_lora"], rel_tol=1e-9) or again["mib"] != stored["mib"]:
            sys.exit(f"{args.lora} is not the LoRA {args.out} measured ({stored['recipe']}: "
                     f"{again['rle_lora']:.6g} here, {stored['rle_lora']:.6g} there): rerun the whole evaluation")
        if args.kohya == "only":
            rows = kohya_rows(evaluation, [group["kohya_ratio"] for group in report["groups"]])
            if rows is None:
                sys.exit("--kohya only needs KOHYA_SD_SCRIPTS (a checkout of kohya-ss/sd-scripts)")
            for group, row in zip(report["groups"], rows):
                group["rows"] = [old for old in group["rows"] if not old["recipe"].startswith("kohya")] + [row]
            report["kohya_command"] = " ".join(["python", "bench/evaluate.py", *sys.argv[1:]])
        for group in report["groups"]:
            group["rows"] = [old for old in group["rows"] if not old.get("at_kohya_size")]
            kohya = next((r for r in group["rows"] if r["recipe"].startswith("kohya") and "mib" in r), None)
            if kohya is not None:
                group["rows"].extend(at_kohya_size(evaluation, kohya))
                for row in [kohya] + group["rows"][-2:]:
                    print_row(row)
        write_report(report, args.out)
        return
    print(f"{args.lora}: {evaluation.original_size / MIB:.1f} MiB, total rank {evaluation.original_rank}, "
          f"{len(evaluation.items)} layers; decomposition and base norms {evaluation.setup_seconds:.1f} s", flush=True)
    anchors = [f"spn_ckpt=1,thr={t:g}" for t in args.thresholds] + [f"spn_ckpt=1,size={m:g}" for m in args.sizes]
    groups = evaluate(evaluation, anchors, args.seeds, with_kohya=args.kohya == "with")
    command = " ".join(["python", "bench/evaluate.py", *sys.argv[1:]])
    commands = [command]
    if args.append and os.path.exists(args.out):
        previous = json.load(open(args.out))
        groups = previous["groups"] + groups
        commands = previous.get("commands", [previous.get("command")]) + commands
    report = {"lora": os.path.basename(args.lora), "base": os.path.basename(args.base),
              "original_mib": evaluation.original_size / MIB, "original_rank": evaluation.original_rank,
              "layers": len(evaluation.items), "commands": commands,
              "torch": torch.__version__, "groups": groups}
    write_report(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Error against file size per selection method, from bench/evaluate.py's JSON: one PNG for docs/.

    python bench/plot_evaluation.py bench/evaluation_sdxl.json docs/evaluation_sdxl.png [--markdown]

``--markdown`` also prints the tables BENCHMARKS.md shows (one per matched size).

Needs matplotlib (`pip install "comfyui-lora-resize[bench]"`), never a requirement of the node pack.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def method_of(recipe: str) -> str:
    """The method a row stands for, with its size-matching parameter removed."""
    if recipe.startswith("kohya"):
        return "kohya sd-scripts sv_ratio"
    text = re.sub(r",?(size|thr)=[-0-9.e]+", "", recipe)
    text = re.sub(r"sv_fro=[0-9.]+", "sv_fro", text)
    text = re.sub(r"sv_ratio=[0-9.]+", "sv_ratio (pack)", text)
    text = re.sub(r"rank=\d+", "rank=N", text)
    return re.sub(r",seed=\d+", "", text) or recipe


def markdown(report: dict) -> str:
    """One table per matched size: every method's size, total rank and errors, best base-relative first."""
    lines = []
    for group in report["groups"]:
        lines += [f"\n**Matched to {group['anchor']}: {group['size_mib']:.1f} MiB** "
                  f"(kohya ratio 10^-t = {group['kohya_ratio']:.4g})\n",
                  "| method | MiB | total rank | LoRA-relative | base-relative Σ‖·‖/Σ‖W‖ | √(Σ‖·‖²/Σ‖W‖²) |",
                  "|---|---:|---:|---:|---:|---:|"]
        rows = sorted((r for r in group["rows"] if "mib" in r), key=lambda r: r["rle_ckpt_sum"])
        for row in rows:
            lines.append(f"| `{row['recipe']}` | {row['mib']:.1f} | {row['rank']} | {100 * row['rle_lora']:.2f} % | "
                         f"{100 * row['rle_ckpt_sum']:.4f} % | {100 * row['rle_ckpt_rss']:.4f} % |")
        for row in group["rows"]:
            if "error" in row:
                lines.append(f"| `{row['recipe']}` | failed: {row['error']} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation")
    parser.add_argument("png")
    parser.add_argument("--markdown", action="store_true", help="print the tables for BENCHMARKS.md")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.load(open(args.evaluation))))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.load(open(args.evaluation))
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for group in report["groups"]:
        for row in group["rows"]:
            if "mib" in row:
                series[method_of(row["recipe"])].append((row["mib"], row["rle_lora"], row["rle_ckpt_sum"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^v<>pPX*h"
    for index, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        for axis, column in zip(axes, (1, 2)):
            axis.plot([p[0] for p in points], [100 * p[column] for p in points], marker=markers[index % len(markers)],
                      linestyle="-" if "randproj" not in name else ":", label=name, alpha=0.85)
    axes[0].set_ylabel("LoRA-relative error ‖ΔW−ΔW'‖ / ‖ΔW‖  (%)")
    axes[1].set_ylabel("base-relative error Σ‖ΔW−ΔW'‖ / Σ‖W‖  (%)")
    for axis in axes:
        axis.set_xlabel("output file size (MiB, fp16)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{report['lora']} ({report['original_mib']:.0f} MiB, total rank {report['original_rank']}): "
                 "error at matched sizes (lower is better)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

"""`lora-resize [resize] CHECKPOINT LORA... -o DIR [-r RECIPES] [-t 16|32|bf16] [-d DEVICE] [-v|-vv]`.

The seed tool's arguments and output names. A LORA argument may be a weighted merge
``"a.safetensors:0.7,b.safetensors:-0.3"`` (Windows drive letters are fine: only a trailing
``:<number>`` is a weight). CHECKPOINT ``-`` means no base (recipes that need one fail clearly).
The base is opened once for all LoRAs and its norms are cached beside it.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import LoraError
from .recipe import DEFAULT_RECIPE, Recipe, format_float, parse_recipes

log = logging.getLogger("lora_resize")
_DTYPES = {"16": torch.float16, "fp16": torch.float16, "32": torch.float32, "fp32": torch.float32,
           "bf16": torch.bfloat16}


def parse_lora_spec(spec: str) -> list[tuple[str, float]]:
    """``a:0.7,b:0.3`` -> [(a, 0.7), (b, 0.3)]; a plain path -> [(path, 1.0)]."""
    if os.path.exists(spec):
        return [(spec, 1.0)]
    members = []
    for entry in spec.split(","):
        path, sep, weight = entry.rpartition(":")
        if sep:
            try:
                members.append((path, float(weight)))
                continue
            except ValueError:
                pass  # the colon belongs to the path (C:\...)
        members.append((entry, 1.0))
    return members


def _merge_name(members: list[tuple[str, float]]) -> str:
    if len(members) == 1 and members[0][1] == 1.0:
        return Path(members[0][0]).stem
    return "_".join(f"{Path(p).stem}{format_float(w) if w != 1.0 else ''}" for p, w in members)


def output_name(stem: str, recipe: Recipe, threshold: float | None) -> str:
    shown = threshold if recipe.scored else None
    return f"{stem}_{recipe.slug(shown)}.safetensors"


def _log_scores(scores: torch.Tensor | None) -> None:
    if scores is None or scores.numel() == 0:
        return
    fractions = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    quantiles = torch.quantile(scores.double(), torch.tensor(fractions, dtype=torch.float64))
    log.info("Score quantiles: " + " ".join(f"{f:.2f}:{float(q):.3f}" for f, q in zip(fractions, quantiles)))


def cmd_resize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .formats import read_lora, write_lora
    from .merge import merge
    from .metadata import file_sha256
    from .resize import provenance_extra, resize

    recipes = parse_recipes(args.score_recipes)
    dtype = _DTYPES[args.output_dtype]
    device = torch.device(args.device) if args.device else None
    base = cache = None
    if args.checkpoint != "-":
        from .base import open_base
        from .norms_cache import NormCache

        base = open_base(args.checkpoint)
        cache = NormCache.for_checkpoint(args.checkpoint)
    elif any(r.needs_base for r in recipes):
        needing = next(r.text for r in recipes if r.needs_base)
        raise LoraError(f"recipe {needing!r} compares with the base checkpoint, but CHECKPOINT is '-'",
                        fix="pass the base checkpoint, or use spn_lora/fro_lora/params, rank= or sv_ratio=")
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, leave=False, disable=args.quiet)
        bar.update(done - bar.n)

    out_dir = Path(args.output_folder) if args.output_folder else None
    for spec in args.lora_model_paths:
        members = parse_lora_spec(spec)
        with ThreadPoolExecutor(max_workers=1) as pool:  # hash the sources while reading them
            digests = [(p, w, pool.submit(file_sha256, p)) for p, w in members if os.path.exists(p)]
            loras = [(read_lora(path, arch=args.arch), weight) for path, weight in members]
            sources = [{"file": os.path.basename(p), "sha256": d.result(), "weight": w} for p, w, d in digests]
        if len(loras) == 1 and loras[0][1] == 1.0:
            lora, operation = loras[0][0], "resize"
        else:
            lora, operation = merge(loras), "merge+resize"
        folder = out_dir or Path(members[0][0]).parent
        stem = _merge_name(members)
        results = resize(lora, recipes, base=base, device=device, cache=cache, convention=args.format,
                         dtype=dtype, sources=sources, progress=progress)
        for result in results:
            for bar in bars.values():
                bar.close()
            bars.clear()
            path = folder / output_name(stem, result.recipe, result.threshold)
            size = write_lora(result.lora, path, convention=args.format, dtype=dtype, operation=operation,
                              recipe=result.recipe.text, sources=sources,
                              extra_provenance=provenance_extra(result),
                              overwrite=args.overwrite)
            _report(result, path, size, args.verbose)
        if cache is not None:
            cache.save()  # after each LoRA: a later failure keeps the norms already computed
    return 0


def _report(result, path: Path, size: int, verbosity: int) -> None:
    rows = result.layers
    old = sum(r["old_rank"] for r in rows)
    new = sum(r["new_rank"] for r in rows)
    threshold = "" if result.threshold is None else f", threshold {format_float(result.threshold, 3)}"
    print(f"{path}: {size / 2**20:.3f} MiB, total rank {old} -> {new}{threshold}, "
          f"relative error {100 * result.total_error:.2f}%")
    for note in result.notes:
        print(f"  note: {note}")
    if verbosity >= 1:
        _log_scores(result.scores)
    if verbosity >= 2:
        for r in rows:
            ckpt = f"{100 * r['rle_ckpt']:6.2f}%" if r["rle_ckpt"] is not None else "     -"
            log.debug(f"dim:{r['old_rank']:>4}->{r['new_rank']:<4} rle_lora:{100 * r['rle_lora']:6.2f}% "
                      f"rle_ckpt:{ckpt} {r['name']}")


def add_resize_parser(sub, handlers: dict[str, Callable], add_common: Callable) -> None:
    p = sub.add_parser("resize", help="resize (and merge) LoRAs by recipes (the default command)")
    p.add_argument("checkpoint", help="base checkpoint (.safetensors or diffusers folder), or - for none")
    p.add_argument("lora_model_paths", nargs="+", help="LoRA files, or weighted merges a.safetensors:0.7,b:0.3")
    p.add_argument("-o", "--output_folder", default=None, help="default: beside each LoRA")
    p.add_argument("-r", "--score_recipes", default=DEFAULT_RECIPE, help="recipes separated by ':'")
    p.add_argument("-t", "--output_dtype", default="16", choices=sorted(_DTYPES), help="output precision")
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("-f", "--format", default="kohya", choices=("kohya", "peft", "comfy"))
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common(p)
    handlers["resize"] = cmd_resize

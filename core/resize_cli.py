"""`lora-resize [resize] CHECKPOINT LORA... -o DIR [-r RECIPES] [-t 16|32|bf16] [-d DEVICE] [-v|-vv]`.

The seed tool's arguments and output names. A LORA argument may be a weighted merge
``"a.safetensors:0.7,b.safetensors:-0.3"`` (Windows drive letters are fine: only a trailing
``:<number>`` is a weight). CHECKPOINT ``-`` means no base (recipes that need one fail clearly).
The base is opened once for all LoRAs and its norms are cached beside it.

What can be checked without work is checked first: recipes, the device, merge weights, output folders
(core.outputs). Each LoRA is then all or nothing: all recipes' files are planned and checked (names,
no duplicates, no existing file, room on the disk) before the first is written, and if a write still
fails the files already written for that LoRA are removed. A batch goes on past a bad LoRA and ends
with "N done, M failed" and exit code 1.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from .errors import LoraError, UsageError
from .recipe import DEFAULT_RECIPE, Recipe, format_float, parse_recipes

log = logging.getLogger("lora_resize")
_DTYPES = {"16": torch.float16, "fp16": torch.float16, "32": torch.float32, "fp32": torch.float32,
           "bf16": torch.bfloat16}


_WEIGHT = re.compile(r"\s*[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)\s*",
                     re.IGNORECASE)
_MERGE_FIX = "write a.safetensors:0.7,b.safetensors:-0.3 with finite weights"


def parse_lora_spec(spec: str) -> list[tuple[str, float]]:
    """``a:0.7,b:0.3`` -> [(a, 0.7), (b, 0.3)]; a plain path -> [(path, 1.0)].

    Only a trailing ``:<number>`` is a weight (so ``C:\\loras\\a.safetensors`` is a path). A weight that
    is not finite (``nan``, ``inf``, ``1e400``) is a UsageError naming the file and the weight: it once
    reached the merge and ended in a LinAlgError. Whether the files exist is checked when each is read."""
    if os.path.exists(spec):
        return [(spec, 1.0)]
    members = []
    for entry in spec.split(","):
        path, sep, weight = entry.rpartition(":")
        if sep and _WEIGHT.fullmatch(weight):
            if not path:
                raise UsageError(f"merge {spec!r}: the weight {weight!r} has no file before it", fix=_MERGE_FIX)
            value = float(weight)
            if not math.isfinite(value):
                raise UsageError(f"merge weight {weight.strip()!r} is not a finite number", file=path,
                                 fix=_MERGE_FIX)
            members.append((path, value))
            continue
        if not entry.strip():
            raise UsageError(f"merge {spec!r} has an empty entry", fix="remove the extra comma")
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
    """Every check that needs no work comes first (recipes, device, merge weights, output folders,
    the base's header); then each LoRA is all or nothing: every recipe's result, output name and size
    are known and checked before its first file is written (so all results are held in memory at
    once, about the size of the files written). A batch goes on past a bad LoRA and exits 1 at the
    end, with a summary."""
    from tqdm import tqdm

    from .devices import resolve_device
    from .outputs import check_output_folder

    recipes = parse_recipes(args.score_recipes)
    dtype = _DTYPES[args.output_dtype]
    device = resolve_device(args.device)
    specs = [(spec, parse_lora_spec(spec)) for spec in args.lora_model_paths]
    if args.checkpoint == "-" and any(r.needs_base for r in recipes):
        needing = next(r.text for r in recipes if r.needs_base)
        raise UsageError(f"recipe {needing!r} compares with the base checkpoint, but CHECKPOINT is '-'",
                         fix="pass the base checkpoint, or use spn_lora/fro_lora/params, rank= or sv_ratio=")
    if args.output_folder is not None:
        out_dir = check_output_folder(args.output_folder, "output folder (-o)")
    else:
        out_dir = None
        for folder in dict.fromkeys(Path(m[0][0]).parent for _, m in specs if os.path.isfile(m[0][0])):
            check_output_folder(folder, "output folder (beside the LoRA; -o to choose another)")
    base = cache = None
    if args.checkpoint != "-":
        from .base import open_base
        from .norms_cache import NormCache

        base = open_base(args.checkpoint)
        cache = NormCache.for_checkpoint(args.checkpoint)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, leave=False, disable=args.quiet)
        bar.update(done - bar.n)

    job = _Job(recipes, base, cache, device, dtype, args, progress, bars)
    if len(specs) == 1:
        try:
            job.run(*specs[0], out_dir)
        finally:
            job.save_cache()
        return 0
    failed = _pipeline(job, specs, out_dir)
    summary = f"{len(specs) - failed} done, {failed} failed"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _pipeline(job: "_Job", specs: list[tuple[str, list[tuple[str, float]]]], out_dir: Path | None) -> int:
    """Several LoRAs, overlapped: the next one is hashed and read, and the last one written and read
    back, while this one is decomposed (two threads beside this one; reading and writing are mostly
    copies and hashing that wait on the kernel, the decomposition is BLAS). The order of everything
    seen stays that of a plain loop: LoRA i's outputs are planned (names, existing files, free space)
    only after LoRA i-1's are written, and each LoRA's report or error comes in input order. Holds up
    to three LoRAs at once (one being read, one resized, one's output being written). Returns the
    number of LoRAs that failed; the batch goes on past them."""
    failed = 0

    def fail(spec: str, exc: Exception) -> None:
        nonlocal failed
        failed += 1
        if job.args.verbose >= 2:
            log.error("%s failed", spec, exc_info=exc)
        text = str(exc.with_file(spec)) if isinstance(exc, LoraError) else f"{spec}: {_unexpected(exc)}"
        print(f"error: {text}", file=sys.stderr)

    reader, writer = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=1)
    writing = None  # (spec, future of the last LoRA's write)

    def drain() -> None:
        nonlocal writing
        if writing is None:
            return
        spec, future = writing
        writing = None
        try:
            future.result()
        except Exception as exc:  # a failed write: its files were removed by write_all
            fail(spec, exc)

    try:
        ahead = reader.submit(job.load, *specs[0])
        for index, (spec, _) in enumerate(specs):
            current = ahead
            ahead = reader.submit(job.load, *specs[index + 1]) if index + 1 < len(specs) else None
            try:
                loaded = current.result()
                results = job.compute(loaded, out_dir)
            except Exception as exc:  # main() handles KeyboardInterrupt
                drain()
                fail(spec, exc)
                continue
            finally:
                job.save_cache()
            drain()
            try:
                plans = job.plan(loaded, results, out_dir)
            except Exception as exc:
                fail(spec, exc)
                continue
            writing = (spec, writer.submit(job.write, loaded, plans))
            del loaded, results, plans
        drain()
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)  # a write under way ends whole (or removes its temp)
    return failed


def _unexpected(exc: BaseException) -> str:
    from .cli import unexpected

    return unexpected(exc) + " (run with -vv for the traceback)"


class _Job:
    """What every LoRA of one command shares: recipes, base, cache, device and the output settings."""

    def __init__(self, recipes, base, cache, device, dtype, args, progress, bars):
        self.recipes, self.base, self.cache, self.device, self.dtype = recipes, base, cache, device, dtype
        self.args, self.progress, self.bars = args, progress, bars

    def save_cache(self) -> None:
        if self.cache is not None:
            self.cache.save()  # after each LoRA: a later failure keeps the norms already computed

    def run(self, spec: str, members: list[tuple[str, float]], out_dir: Path | None) -> None:
        loaded = self.load(spec, members)
        results = self.compute(loaded, out_dir)
        self.write(loaded, self.plan(loaded, results, out_dir))

    def load(self, spec: str, members: list[tuple[str, float]]) -> "_Loaded":
        """Read the members (merged when several), hashing each from the bytes read: everything before the
        decomposition. The hashes finish on a side thread; :meth:`plan` waits for them."""
        from .formats import read_lora
        from .formats.writer import check_nameable
        from .merge import merge
        from .safetensors_io import StreamDigest

        args = self.args
        for path, _ in members:
            if not os.path.exists(path):
                raise LoraError("LoRA file not found", file=path,
                                fix="check the path (a merge is a.safetensors:0.7,b.safetensors:-0.3)")
        digests = [StreamDigest() for _ in members]
        loras = [(read_lora(path, arch=args.arch, digest=d), weight) for (path, weight), d in zip(members, digests)]
        # sha256 of the same length meanwhile: size= measures files with exactly this metadata's length
        sources = [{"file": os.path.basename(p), "sha256": "0" * 64, "weight": w} for p, w in members]
        if len(loras) == 1 and loras[0][1] == 1.0:
            lora, operation = loras[0][0], "resize"
        else:
            lora, operation = merge(loras), "merge+resize"
        check_nameable(lora, args.format, label=spec)  # before any work: names -f cannot spell without a table
        return _Loaded(spec, members, lora, operation, sources, digests)

    def compute(self, loaded: "_Loaded", out_dir: Path | None) -> list:
        from .resize import resize

        try:
            return list(resize(loaded.lora, self.recipes, base=self.base, device=self.device, cache=self.cache,
                               convention=self.args.format, dtype=self.dtype, sources=loaded.sources,
                               progress=self.progress))
        finally:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

    def plan(self, loaded: "_Loaded", results: list, out_dir: Path | None) -> list["_Plan"]:
        for source, digest in zip(loaded.sources, loaded.digests):
            source["sha256"] = digest.hexdigest()
        folder = out_dir or Path(loaded.members[0][0]).parent
        return plan_outputs(results, folder, _merge_name(loaded.members), convention=self.args.format,
                            dtype=self.dtype, operation=loaded.operation, sources=loaded.sources,
                            overwrite=self.args.overwrite, label=loaded.spec)

    def write(self, loaded: "_Loaded", plans: list["_Plan"]) -> None:
        sizes = write_all(plans, convention=self.args.format, dtype=self.dtype, operation=loaded.operation,
                          sources=loaded.sources, overwrite=self.args.overwrite)
        for plan, size in zip(plans, sizes):
            _report(plan.result, plan.path, size, self.args.verbose)


class _Loaded:
    """One LoRA argument read: the LoRA (merged if asked), what to record of its sources."""

    def __init__(self, spec: str, members: list[tuple[str, float]], lora, operation: str, sources: list[dict],
                 digests: list):
        self.spec, self.members, self.lora, self.operation, self.sources = spec, members, lora, operation, sources
        self.digests = digests  # StreamDigest of each member, filled into sources by _Job.plan


class _Plan:
    def __init__(self, result, path: Path, size: int):
        self.result, self.path, self.size = result, path, size


def plan_outputs(results, folder: Path, stem: str, *, convention: str, dtype, operation: str, sources,
                 overwrite: bool, label: str) -> list[_Plan]:
    """Every output's path and exact size, checked before the first write: each recipe keeps something,
    no two recipes name one file, no output exists (unless ``overwrite``), each name fits the file
    system, and the folder has room for all of them."""
    from .formats.writer import encoded_size
    from .outputs import name_limits, nearest_existing
    from .resize import provenance_extra

    nothing = "; nothing was written for this LoRA"
    existing = nearest_existing(folder, "output folder")
    name_max, _ = name_limits(str(existing))
    plans: list[_Plan] = []
    names: dict[str, str] = {}
    for result in results:
        recipe = result.recipe.text
        if not result.lora.layers:
            raise LoraError(f"recipe {recipe!r} keeps nothing: every layer was dropped{nothing}", file=label,
                            fix="loosen the threshold or raise the size/rank target")
        name = output_name(stem, result.recipe, result.threshold)
        if name in names:
            raise LoraError(f"recipes {names[name]!r} and {recipe!r} both give {name}{nothing}", file=label,
                            fix="remove one of the recipes, or make them differ")
        names[name] = recipe
        if len(os.fsencode(name)) > name_max:
            raise LoraError(f"the output name for recipe {recipe!r} would be {len(os.fsencode(name))} bytes, more "
                            f"than the file system's {name_max}{nothing}", file=label,
                            fix="rename the LoRA file to something shorter, or shorten the recipe")
        path = folder / name
        if os.path.lexists(path) and not overwrite:
            raise LoraError(f"output file already exists (recipe {recipe!r}){nothing}", file=str(path),
                            fix="choose another output folder or ask to overwrite (--overwrite)")
        size = encoded_size(result.lora, convention=convention, dtype=dtype, operation=operation, recipe=recipe,
                            sources=sources, extra_provenance=provenance_extra(result))
        plans.append(_Plan(result, path, size))
    _check_space(plans, existing, folder, overwrite, nothing)
    return plans


def _check_space(plans: list[_Plan], existing: Path, folder: Path, overwrite: bool, nothing: str) -> None:
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # the writer reports what really happens
    replaced = sum(os.path.getsize(p.path) for p in plans if overwrite and os.path.isfile(p.path))
    need = max(sum(p.size for p in plans) - replaced, max((p.size for p in plans), default=0))
    if need > free:
        raise LoraError(f"no space left in {folder}: the {len(plans)} output file(s) need {need / 2**20:.3f} MiB, "
                        f"{free / 2**20:.3f} MiB are free{nothing}",
                        fix="free some space there or choose another output folder (-o)")


def write_all(plans: list[_Plan], *, convention: str, dtype, operation: str, sources, overwrite: bool,
              digests: Optional[list] = None) -> list[int]:
    """Write every planned file; if one fails, the files this call created are removed (all or nothing
    per LoRA) and the error says so. Files it replaced under ``overwrite`` cannot be restored.
    ``digests``: a list that gets each written file's StreamDigest (its sha256 without reading it again)."""
    from .formats import write_lora
    from .resize import provenance_extra
    from .safetensors_io import StreamDigest

    created: list[Path] = []
    sizes: list[int] = []
    try:
        for plan in plans:
            existed = os.path.lexists(plan.path)
            digest = StreamDigest() if digests is not None else None
            sizes.append(write_lora(plan.result.lora, plan.path, convention=convention, dtype=dtype,
                                    operation=operation, recipe=plan.result.recipe.text, sources=sources,
                                    extra_provenance=provenance_extra(plan.result), overwrite=overwrite,
                                    digest=digest))
            if digests is not None:
                digests.append(digest)
            if not existed:
                created.append(plan.path)
    except BaseException as exc:
        removed = _remove(created)
        if not removed:
            raise
        note = f"the {len(removed)} file(s) already written for this LoRA were removed ({', '.join(removed)})"
        if isinstance(exc, LoraError):
            raise LoraError(f"{exc.problem}; {note}", file=exc.file, layer=exc.layer, fix=exc.fix) from exc
        log.warning(note)
        raise
    return sizes


def _remove(paths: list[Path]) -> list[str]:
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path.name)
        except OSError:
            log.warning("could not remove %s", path)
    return removed


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
    from .cli import FORMAT_HELP, FORMATS

    p = sub.add_parser("resize", help="resize (and merge) LoRAs by recipes (the default command)")
    p.add_argument("checkpoint", help="base checkpoint (.safetensors or diffusers folder), or - for none")
    p.add_argument("lora_model_paths", nargs="+", help="LoRA files, or weighted merges a.safetensors:0.7,b:0.3")
    p.add_argument("-o", "--output_folder", default=None, help="default: beside each LoRA")
    p.add_argument("-r", "--score_recipes", default=DEFAULT_RECIPE, help="recipes separated by ':'")
    p.add_argument("-t", "--output_dtype", default="16", choices=sorted(_DTYPES), help="output precision")
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("-f", "--format", default="kohya", choices=FORMATS, help=FORMAT_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common(p)
    handlers["resize"] = cmd_resize

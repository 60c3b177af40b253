"""ResizeLoRAFolder: every LoRA of a loras subfolder through one recipe, by the batch core (core/batch.py).

The CLI's batch in ComfyUI's process: the same output names and manifest (so files already done are
skipped, and a Cancel or a crash resumes), one job, the connected MODEL/CLIP as the base of every LoRA,
matched by the host's own key maps as ResizeLoRA does. A bad file is a row of the report, never the
node's error: the rest are written.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Optional

import comfy.model_management

from ..core.batch import BaseSpec, Settings, collect_inputs, run_batch
from ..core.decompose import decompose
from ..core.errors import LoraError
from ..core.manifest import MANIFEST_NAME, Manifest
from ..core.recipe import DEFAULT_RECIPE, parse_recipes
from ..core.resize import apply_recipe, check_base_matches, reference_table
from ..core.resize_cli import _DTYPES
from .host import (
    compute_device,
    host_base,
    lora_folders,
    norms_cache,
    progress_callback,
    refresh_lora_list,
    scoring_device,
)
from .host_base import unplaced_error
from .lora_type import CATEGORY
from .resize import dense_rank_of
from .save_path import RULE, prefix_parts, resolve_prefix

_DTYPE_NAMES = {"fp16": "16", "bf16": "bf16", "fp32": "32"}


def _subfolder(root: str, text: str, what: str) -> str:
    """``text`` below ``root`` by SaveLoRA's rules (relative, no '..', ...); empty means ``root`` itself."""
    if not text.strip().strip("/\\."):
        return os.path.abspath(root)
    try:
        folder, name = resolve_prefix(root, text)
    except LoraError as exc:
        raise LoraError(f"{what}: {exc.problem}", fix=exc.fix) from None
    return os.path.join(folder, name)


def source_folder(text: str) -> str:
    """The first loras folder holding the subfolder ``text`` (ComfyUI may have several loras folders)."""
    roots = lora_folders()
    for root in roots:
        folder = _subfolder(root, text, "loras subfolder")
        if os.path.isdir(folder):
            return folder
    raise LoraError(f"no loras folder has a subfolder {text!r}", file=roots[0] if roots else None,
                    fix="create it inside the loras folder and put the LoRAs to resize there")


def host_engine(model, clip):
    """ResizeLoRA's way in the batch: each layer placed by the host's key maps and scored against that
    model weight; one decomposition per file for all its recipes."""
    def engine(lora, recipes, spec, settings, sources, progress):
        def stage(name):
            return (lambda done, total: progress(name, done, total)) if progress else None

        needs_base = any(r.needs_base for r in recipes)
        base, placed, missing = host_base(model, clip, list(lora.layers.values()))
        if needs_base and missing:  # another family's LoRA says so by name; else the host's count
            check_base_matches((), base, lora.architecture, lora.path)
            raise unplaced_error(missing, len(lora), lora.path, clip is not None)
        device = compute_device(model)
        dense = dense_rank_of(recipes[0]) if len(recipes) == 1 else None
        items = decompose(lora, device=device, dense_rank=dense, niter=max(r.niter for r in recipes),
                          progress=stage("decompose"))
        refs = {}
        if needs_base:
            cache = norms_cache()
            scored = [dataclasses.replace(item, layer=placed[item.key]) for item in items]
            refs = reference_table(scored, recipes, base, device=scoring_device(model, base), cache=cache,
                                   progress=stage("base norms"), label=lora.path)
            cache.save()
        by_name = base.by_layer_name() if base is not None else None
        results = [apply_recipe(items, recipe, refs, template=lora, convention=settings.convention,
                                dtype=_DTYPES[settings.dtype], sources=sources, base=by_name) for recipe in recipes]
        return results, 0

    return engine


def _mib(size: Optional[int]) -> Optional[float]:
    return None if size is None else round(size / 2**20, 3)


def table_rows(records: list[dict], root: str, loras: str, now: set) -> list[dict]:
    """One row per input and recipe: file (below ``root``), status ("done earlier" when a previous run wrote
    it), ranks, MiB before/after, relative error or the reason, and the output (below ``loras``)."""
    rows = []
    for record in records:
        source = record["input"]
        status = record["status"] if (source, record["recipe"]) in now else f"{record['status']} earlier"
        rows.append({"file": os.path.relpath(source, root), "recipe": record["recipe"], "status": status,
                     "ranks": (f"{record['ranks_before']} -> {record['ranks_after']}"
                               if record.get("ranks_after") is not None else ""),
                     "mib_before": _mib(os.path.getsize(source)) if os.path.exists(source) else None,
                     "mib_after": _mib(record.get("bytes")),
                     "error": (f"{100 * record['relative_error']:.2f}%" if record.get("relative_error") is not None
                               else (record.get("error") or "").removeprefix(source + ": ")),  # the row names it
                     "output": os.path.relpath(record["output"], loras) if record.get("output") else ""})
    return rows


def report_text(rows: list[dict], summary_line: str) -> str:
    lines = [summary_line]
    for row in rows:
        if row["status"].startswith("done"):
            lines.append(f"{row['file']} [{row['recipe']}]: {row['status']}, ranks {row['ranks']}, "
                         f"{row['mib_before']} -> {row['mib_after']} MiB, error {row['error']} -> {row['output']}")
        else:
            lines.append(f"{row['file']} [{row['recipe']}]: {row['status']}: {row['error']}")
    return "\n".join(lines)


class ResizeLoRAFolder:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("One line per LoRA and recipe: ranks, MiB before/after and error, or why it failed.",)
    OUTPUT_NODE = True
    FUNCTION = "run"
    DESCRIPTION = ("Resizes every LoRA of a loras subfolder (and its subfolders) with one recipe, written under "
                   "another subfolder with the CLI's names (<name>_<recipe>.safetensors). Files already done "
                   "are skipped (a manifest in the output folder), so a cancelled run resumes. A broken file is "
                   "reported and the others are written.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "subfolder": ("STRING", {"default": "", "tooltip": "Folder inside the loras folder to read, "
                                                              "subfolders included (empty: the whole loras folder)."}),
            "pattern": ("STRING", {"default": "*.safetensors", "tooltip": "Only file names matching this glob."}),
            "recipe": ("STRING", {"default": DEFAULT_RECIPE, "tooltip": "A recipe as the CLI's -r takes it "
                                                                        "(several separated by ':')."}),
            "output_subfolder": ("STRING", {"default": "resized", "tooltip": "Where the resized files go, inside "
                                                                            "the loras folder. " + RULE}),
            "format": (["kohya", "peft", "comfy", "keep"], {"tooltip": "Naming of the written files."}),
            "dtype": (list(_DTYPE_NAMES), {"tooltip": "Precision of the written factors."}),
        }, "optional": {
            "model": ("MODEL", {"tooltip": "The base model the LoRAs were made for: needed by spn_ckpt, fro_ckpt "
                                           "and subspace. LoRAs it cannot take are reported."}),
            "clip": ("CLIP", {"tooltip": "The base text encoder(s), for LoRAs with text-encoder layers."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, recipe=None, output_subfolder=None, subfolder=None):
        """A bad recipe or folder is refused when the prompt is queued, before any node runs."""
        try:
            if isinstance(recipe, str):
                parse_recipes(recipe)
            if isinstance(output_subfolder, str):
                prefix_parts(output_subfolder)
            if isinstance(subfolder, str) and subfolder.strip().strip("/\\."):
                prefix_parts(subfolder)
        except LoraError as exc:
            return str(exc)
        return True

    def run(self, subfolder: str, pattern: str, recipe: str, output_subfolder: str, format: str, dtype: str,
            model=None, clip=None):
        recipes = parse_recipes(recipe)
        source = source_folder(subfolder)
        loras = lora_folders()[0]
        out = _subfolder(loras, output_subfolder, "output subfolder")
        if os.path.abspath(out) == os.path.abspath(source):
            raise LoraError("the output subfolder is the folder being read", file=out,
                            fix="pick another output subfolder (e.g. 'resized')")
        items = [item for item in _inputs(source, out) if fnmatch.fnmatch(os.path.basename(item.path), pattern)]
        if not items:
            raise LoraError(f"no LoRA file in this folder matches {pattern!r}", file=source,
                            fix="check the subfolder and the name pattern")
        base, _, _ = host_base(model, clip)
        bases = {"*": BaseSpec(weights=base)} if base is not None else {}
        settings = Settings(tuple(r.text for r in recipes), _DTYPE_NAMES[dtype], format)
        manifest = Manifest(os.path.join(out, MANIFEST_NAME))
        files = progress_callback(len(items))  # ComfyUI's ProgressBar over files; it honours Cancel
        check = comfy.model_management.throw_exception_if_processing_interrupted

        def on_file(stage: str, done: int, total: int, records) -> None:
            if stage == "resize":
                files(stage, done, total)
            else:
                check()  # Cancel between files

        def inner(stage: str, done: int, total: int) -> None:
            check()  # Cancel inside a file: its temps are removed, nothing of it is written

        try:
            summary = run_batch(items, settings, bases, manifest, on_file=on_file, progress=inner,
                                engine=host_engine(model, clip),
                                passthrough=(comfy.model_management.InterruptProcessingException,),
                                no_base_fix="connect the MODEL (and CLIP) this LoRA was made for")
        finally:
            refresh_lora_list()
        now = {(r["input"], r["recipe"]) for r in summary.records}
        latest = [manifest.latest[(item.path, r.text)] for item in items for r in recipes
                  if (item.path, r.text) in manifest.latest]
        rows = table_rows(latest, source, loras, now)
        line = f"{len(items)} files x {len(recipes)} recipes: {summary.line()}"
        return {"ui": {"lora_resize_folder": [{"summary": line, "rows": rows}]},
                "result": (report_text(rows, line),)}


def _inputs(source: str, out: str):
    try:
        return collect_inputs([source], out)
    except LoraError as exc:  # nothing in the folder, or two files that would get the same names
        raise LoraError(exc.problem, file=source, fix=exc.fix) from None


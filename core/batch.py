"""`lora-resize batch INPUTS... -o OUT [-r RECIPES] [--base FAMILY=PATH]... [-j N] [--manifest PATH]`.

A whole library in one run: inputs are files, folders (recursive, ``*.safetensors``), globs or
``@list.txt`` (one path, folder or glob a line, relative to the current folder); the outputs mirror
each input's tree under ``-o`` with the resize command's names and bytes (``resize_cli.output_name``,
``plan_outputs``, ``write_all``: the same sources, operation and metadata). Each LoRA is matched to
the base of its detected family (``--base sdxl=...``); a recipe that needs a base its family lacks is
recorded as skipped, with the reason.

Three passes, each over files: a probe (the header alone: family and the base layers it touches; with
records of an earlier run, the hash, and a file done already is read no further), then base norms, once
per family for the union of every LoRA's layers,
computed in this process and saved to the norms cache before any worker starts (workers find every
norm there, so none is computed twice, however many workers), then the resizes. Every input and
recipe gets one manifest record as its file finishes (``core.manifest``), so a rerun resumes. A bad
file is recorded as failed and the batch goes on; exit 1 when any failed. Ctrl-C stops the workers
(their temps are removed) and exits 130; the manifest holds every file that finished. The resize pass
reads each LoRA once and hashes the bytes it reads, so a fresh library is read once, not three times.
``--shard K/N`` splits a library too large for one manifest into N runs with a manifest each.

``-j N`` runs N spawned worker processes (``-j 1``: this process); outputs are byte-identical either way.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import LoraError, UsageError
from .manifest import MANIFEST_NAME, Manifest, Record, output_holds

log = logging.getLogger("lora_resize")
LORA_SUFFIX = ".safetensors"
_NORM_METHODS = {"spn_ckpt", "fro_ckpt", "subspace"}


# --- inputs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One input LoRA and the folder its outputs go to (its place in the input tree, under -o)."""

    path: str  # absolute
    out_dir: str
    shown: str  # as the user named it (relative paths stay relative)


def _is_lora_name(name: str) -> bool:
    return name.lower().endswith(LORA_SUFFIX) and not name.startswith(".")


def _inside(path: str, folder: Optional[str]) -> bool:
    if folder is None:
        return False
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _walk(root: str, skip: Optional[str]) -> list[str]:
    """Every LoRA file under ``root``, sorted; hidden names (temps) and the output folder left out."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not _inside(os.path.join(folder, d), skip))
        found.extend(os.path.join(folder, f) for f in sorted(files) if _is_lora_name(f))
    return found


def _glob_root(pattern: str) -> str:
    """The folders of a glob before its first wildcard: the tree below it is mirrored."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.path.join(*fixed) if fixed else "."


def _expand(spec: str, skip: Optional[str]) -> list[tuple[str, str]]:
    """(file, root) pairs of one input spec; its tree below ``root`` is mirrored under -o."""
    if os.path.isdir(spec):
        return [(f, spec) for f in _walk(spec, skip)]
    if os.path.isfile(spec):
        return [(spec, os.path.dirname(spec) or ".")]
    if glob.has_magic(spec):
        root = _glob_root(spec)
        pairs = []
        for match in sorted(glob.glob(spec, recursive=True)):
            if os.path.isdir(match):
                pairs.extend((f, root) for f in _walk(match, skip))
            elif _is_lora_name(os.path.basename(match)) and not _inside(match, skip):
                pairs.append((match, root))
        return pairs
    return []


def _list_entries(spec: str) -> list[str]:
    path = spec[1:]
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"the list of inputs cannot be read ({getattr(exc, 'strerror', None) or exc})", file=path,
                         fix="give a UTF-8 text file with one path a line (@list.txt)") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def collect_inputs(specs: Sequence[str], out: str) -> list[Item]:
    """Every input LoRA once (by real path), each with its output folder; refused up front: a spec that
    matches nothing, and two inputs whose outputs would have the same names."""
    items: list[Item] = []
    seen: set[str] = set()
    owners: dict[tuple[str, str], str] = {}
    for spec in specs:
        entries = _list_entries(spec) if spec.startswith("@") else [spec]
        for entry in entries:
            pairs = _expand(entry, out)
            if not pairs:
                where = f" (listed in {spec[1:]})" if spec.startswith("@") else ""
                raise UsageError(f"input {entry!r}{where} matches no {LORA_SUFFIX} file",
                                 fix="check the path, folder or glob (quote a glob so the shell leaves it)")
            for file, root in pairs:
                real = os.path.realpath(file)
                if real in seen:
                    continue
                seen.add(real)
                rel = os.path.relpath(os.path.dirname(os.path.abspath(file)), os.path.abspath(root))
                out_dir = os.path.normpath(os.path.join(os.path.abspath(out), rel))
                stem = Path(file).stem
                other = owners.setdefault((out_dir, stem), file)
                if other != file:
                    raise UsageError(f"inputs {other} and {file} would both be written as {stem}_*.safetensors in "
                                     f"{out_dir}", fix="give the folder that holds them, so that the tree is "
                                     "mirrored, or rename one")
                items.append(Item(os.path.abspath(file), out_dir, file))
    return items


# --- settings, bases -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What decides an output's bytes besides the input and the recipe (recorded and compared on resume)."""

    recipes: tuple[str, ...]
    dtype: str = "16"
    convention: str = "kohya"
    device: Optional[str] = None
    arch: Optional[str] = None

    def record(self, base_fingerprint: Optional[str]) -> dict:
        return {"dtype": self.dtype, "format": self.convention, "arch": self.arch, "base": base_fingerprint}


@dataclass
class BaseSpec:
    """A family's base: a checkpoint path (what workers get: each opens it itself), or, in this process
    only, weights already open (ComfyUI's MODEL/CLIP) and the norms cache to use with them."""

    path: Optional[str] = None
    weights: Any = None
    cache: Any = None
    norms: Optional[dict] = None  # {layer cache key: norms} computed by the batch (Ray: from the object store)

    def portable(self) -> "BaseSpec":
        if self.path is None:
            raise LoraError("a base given as loaded weights cannot be sent to worker processes",
                            fix="run with one job (-j 1)")
        return BaseSpec(self.path)


_OPEN: dict[str, tuple[Any, Any]] = {}  # per process: checkpoint path -> (base, norms cache)


def _open(spec: Optional[BaseSpec]) -> tuple[Any, Any]:
    if spec is None:
        return None, None
    if spec.weights is not None:
        return spec.weights, spec.cache
    if spec.path not in _OPEN:
        from .base import open_base
        from .norms_cache import NormCache

        _OPEN[spec.path] = (open_base(spec.path), NormCache.for_checkpoint(spec.path))
    base, cache = _OPEN[spec.path]
    if not spec.norms:
        return base, cache
    from .norms import cache_id

    return base, _Preloaded(cache_id(base), spec.norms, cache)


class _Preloaded:
    """The norms cache, answered first from norms handed to this worker (a node that cannot see, or has
    not yet re-read, the cache file beside the checkpoint). ``cache_id``: the base's id in the cache
    (core.norms.cache_id: its fingerprint and the norms' version)."""

    def __init__(self, cache_id: str, norms: dict, cache):
        self.cache_id, self.norms, self.cache = cache_id, norms, cache

    def get(self, cache_id: str, key: str):
        found = self.norms.get(key) if cache_id == self.cache_id else None
        return found if found is not None else self.cache.get(cache_id, key)

    def put(self, fingerprint: str, key: str, values: dict) -> None:
        self.cache.put(fingerprint, key, values)

    def save(self) -> bool:
        return self.cache.save()


def parse_bases(values: Iterable[str]) -> dict[str, BaseSpec]:
    """``--base FAMILY=PATH`` (repeatable) -> {family: spec}; each base's header is read now."""
    from .naming import ARCHITECTURES

    bases: dict[str, BaseSpec] = {}
    for value in values:
        family, sep, path = value.partition("=")
        family = family.strip().lower()
        if not sep or not path:
            raise UsageError(f"--base {value!r} is not FAMILY=PATH", fix="e.g. --base sdxl=sd_xl_base_1.0.safetensors")
        if family not in ARCHITECTURES:
            raise UsageError(f"--base {value!r}: unknown family {family!r}",
                             fix=f"use one of {', '.join(ARCHITECTURES)}")
        if family in bases:
            raise UsageError(f"--base {family}= is given twice", fix="give one base per family")
        if not os.path.exists(path):
            raise UsageError(f"--base {family}=: checkpoint not found", file=path, fix="check the path")
        spec = BaseSpec(os.path.abspath(path))
        base, _ = _open(spec)
        if base.architecture and base.architecture != family:
            raise UsageError(f"--base {family}= is a {base.architecture.upper()} checkpoint", file=path,
                             fix=f"give it as --base {base.architecture}={path}")
        bases[family] = spec
    return bases


# --- work done per file (in a worker or in this process) -----------------------------------------------

@dataclass
class Probe:
    sha256: Optional[str] = None
    family: Optional[str] = None
    targets: list = field(default_factory=list)  # (canonical name, offset, shape) of every layer
    verified: list[str] = field(default_factory=list)  # recipes whose done record still holds
    error: Optional[str] = None


def probe(path: str, arch: Optional[str], done: Sequence[Record], recipes: int, read: bool = True) -> Probe:
    """What must be done with one input, reading as little of it as that takes. With ``done`` records the
    input is hashed: recipes whose record still holds need nothing more (when that is all ``recipes`` of
    them, that is all). Otherwise, with ``read``, the LoRA's header alone gives its family and the base
    layers it touches (a file with a bad header fails here); without (ComfyUI's one base for every family)
    nothing more. The resize pass then reads the whole file once, hashing it as it reads."""
    from .formats.reader import read_lora_layout
    from .metadata import file_sha256

    found = Probe()
    try:
        if done:  # nothing to compare with otherwise: the resize pass hashes what it reads
            found.sha256 = file_sha256(path)
        held = [r for r in done if r.get("sha256") == found.sha256 and output_holds(r)]
        found.verified = [r["recipe"] for r in held]
        if held and len(held) == recipes:
            found.family = held[0].get("family")
            return found
        if not read:
            return found
        lora = read_lora_layout(path, arch=arch)
        found.family = lora.architecture
        found.targets = [(layer.name, layer.offset, tuple(layer.shape)) for layer in lora.layers.values()]
    except LoraError as exc:
        found.error = str(exc.with_file(path))
    except Exception as exc:  # a file that vanished, torch refusing bytes, a bug: the batch goes on
        found.error = f"{path}: {_unexpected(exc)}"
    return found


@dataclass
class Task:
    item: Item
    sha256: Optional[str]  # from the probe when it hashed; the resize pass records what it read
    family: str
    recipes: tuple[str, ...]  # every recipe this file runs (the same set on every run: same bytes)
    write: tuple[str, ...]  # those still to write
    base: Optional[BaseSpec]


_IN_TASK = False  # a worker's SIGTERM interrupts a task (temps removed) but ends an idle worker at once
_TERMINATED = False


Progress = Callable[[str, int, int], None]
# (lora, recipes, base spec or None, settings, sources, progress) -> (one result per recipe, norms computed)
Engine = Callable[[Any, list, Optional[BaseSpec], Settings, list, Optional[Progress]], tuple[list, int]]


def core_engine(lora, recipes: list, spec: Optional[BaseSpec], settings: Settings, sources: list,
                progress: Optional[Progress]) -> tuple[list, int]:
    """The resize command's engine (core.resize.resize) on the family's checkpoint; counts the norms it
    had to compute (none when the batch computed them before dispatch)."""
    from .resize import resize
    from .resize_cli import _DTYPES

    base, cache = _open(spec)
    counting = _CountingCache(cache) if cache is not None else None
    results = list(resize(lora, recipes, base=base, device=settings.device, cache=counting,
                          convention=settings.convention, dtype=_DTYPES[settings.dtype], sources=sources,
                          progress=progress))
    if cache is not None:
        cache.save()
    return results, counting.computed if counting else 0


def resize_file(task: Task, settings: Settings, progress: Optional[Progress] = None, engine: Engine = core_engine,
                passthrough: tuple[type, ...] = ()) -> list[Record]:
    """All of one file's recipes at once (one decomposition), writing those in ``task.write``; one
    record per recipe written, done or failed (all or nothing per file, as in the resize command).
    Exceptions of a ``passthrough`` type (the host's Cancel) are not failures: they end the batch."""
    global _IN_TASK
    _IN_TASK = True
    started = time.monotonic()
    try:
        return _resize_file(task, settings, progress, started, engine)
    except LoraError as exc:
        error = str(exc.with_file(task.item.path))
    except Exception as exc:  # an OS failure or a bug: recorded, and the batch goes on
        if isinstance(exc, passthrough):
            raise
        error = f"{task.item.path}: {_unexpected(exc)}"
    except KeyboardInterrupt:
        if _TERMINATED:  # a worker told to stop: its temps are removed by now; end without a word
            os._exit(130)
        raise
    finally:
        _IN_TASK = False
    if task.sha256 is None:  # failed before its read finished: hashed apart, if it can be read at all
        task.sha256 = _sha256_or_none(task.item.path)
    return [_record(task, recipe, "failed", settings, seconds=time.monotonic() - started, error=error)
            for recipe in task.write]


def _sha256_or_none(path: str) -> Optional[str]:
    from .metadata import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


def _resize_file(task: Task, settings: Settings, progress, started: float, engine: Engine) -> list[Record]:
    from .formats import read_lora
    from .formats.writer import check_nameable
    from .recipe import parse_recipes
    from .resize_cli import _DTYPES, output_name, plan_outputs, write_all
    from .safetensors_io import StreamDigest

    path, folder = task.item.path, Path(task.item.out_dir)
    dtype = _DTYPES[settings.dtype]
    digest = StreamDigest()
    lora = read_lora(path, arch=settings.arch, digest=digest)
    check_nameable(lora, settings.convention, label=path)
    # as cmd_resize records; the hash of the bytes read, still being computed beside the decomposition
    sources = [{"file": os.path.basename(path), "sha256": "0" * 64, "weight": 1.0}]
    recipes = parse_recipes(":".join(task.recipes))
    results, computed = engine(lora, recipes, task.base, settings, sources, progress)
    sources[0]["sha256"] = task.sha256 = digest.hexdigest()
    wanted = [r for r in results if r.recipe.text in task.write]
    stem = Path(path).stem
    fresh, there = [], []
    for result in wanted:
        target = folder / output_name(stem, result.recipe, result.threshold)
        (there if os.path.lexists(target) else fresh).append(result)
    common = dict(convention=settings.convention, dtype=dtype, operation="resize", sources=sources)
    plans = plan_outputs(fresh, folder, stem, overwrite=False, label=path, **common)
    for result in there:  # a run killed after a write and before its record: same bytes, or refused
        _same_bytes(result, folder / output_name(stem, result.recipe, result.threshold), common)
    digests: list = []
    write_all(plans, overwrite=False, digests=digests, **common)
    written = {str(plan.path): digest.hexdigest() for plan, digest in zip(plans, digests)}
    seconds = time.monotonic() - started
    records = []
    for result in wanted:
        output = folder / output_name(stem, result.recipe, result.threshold)
        records.append(_record(task, result.recipe.text, "done", settings, seconds=seconds, output=str(output),
                               result=result, computed=computed, output_sha256=written.get(str(output))))
    return records


class _CountingCache:
    """The norms cache, counting the norms computed here (a batch computes them before dispatch: 0)."""

    def __init__(self, cache):
        self.cache, self.computed = cache, 0

    def get(self, fingerprint: str, key: str):
        return self.cache.get(fingerprint, key)

    def put(self, fingerprint: str, key: str, values: dict) -> None:
        self.computed += 1
        self.cache.put(fingerprint, key, values)

    def save(self) -> bool:
        return self.cache.save()


def _same_bytes(result, target: Path, common: dict) -> None:
    """An output already at ``target`` with no record: kept if it holds exactly what this run writes
    (written to a temp beside it and compared), else refused (someone else's file is never replaced)."""
    from .atomic import temp_name
    from .formats import write_lora
    from .metadata import file_sha256
    from .resize import provenance_extra

    probe_path = target.parent / temp_name(target.name)  # the temp pattern: a kill here is swept later
    try:
        write_lora(result.lora, probe_path, recipe=result.recipe.text, extra_provenance=provenance_extra(result),
                   overwrite=False, **common)
        same = file_sha256(str(probe_path)) == file_sha256(str(target))
    finally:
        if os.path.lexists(probe_path):
            os.unlink(probe_path)
    if not same:
        raise LoraError(f"output file already exists and differs from what recipe {result.recipe.text!r} makes "
                        "(it is not in this batch's manifest); nothing was written for this LoRA", file=str(target),
                        fix="move that file away, or choose another output folder (-o)")


def _record(task: Task, recipe: str, status: str, settings: Settings, *, seconds: float = 0.0,
            output: Optional[str] = None, result=None, computed: int = 0, error: Optional[str] = None,
            output_sha256: Optional[str] = None) -> Record:
    """One manifest record; ``output_sha256`` when the writer hashed the file as it made it (else it is read:
    an output kept from a killed run)."""
    from .metadata import file_sha256

    record: Record = {"input": task.item.path, "sha256": task.sha256, "recipe": recipe, "status": status,
                      "family": task.family, "output": output, "seconds": round(seconds, 3), "error": error,
                      "settings": settings.record(_fingerprint(task.base))}
    if result is not None and output is not None:
        rows = result.layers
        record.update(ranks_before=sum(r["old_rank"] for r in rows), ranks_after=sum(r["new_rank"] for r in rows),
                      bytes=os.path.getsize(output), output_sha256=output_sha256 or file_sha256(output),
                      relative_error=result.total_error, threshold=result.threshold, norms_computed=computed)
    return record


def _fingerprint(spec: Optional[BaseSpec]) -> Optional[str]:
    base, _ = _open(spec)
    return None if base is None else base.fingerprint


def _unexpected(exc: BaseException) -> str:
    from .cli import unexpected

    return unexpected(exc)


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``K/N`` -> (K, N), 0 <= K < N."""
    if text is None:
        return None
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (-1, 0)
    if not 0 <= shard[0] < shard[1]:
        raise UsageError(f"--shard {text}: expected K/N with 0 <= K < N", fix="e.g. --shard 0/4 ... --shard 3/4")
    return shard


def in_shard(item: Item, out: str, shard: tuple[int, int]) -> bool:
    """Whether this input belongs to shard K of N: by a hash of its place in the output tree (the input's
    folder under its root, and its name), so the split is the same wherever the library is mounted and
    however the inputs were named (folder, glob or list)."""
    place = os.path.relpath(os.path.join(item.out_dir, os.path.basename(item.path)), os.path.abspath(out))
    digest = hashlib.sha1(place.replace(os.sep, "/").encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % shard[1] == shard[0]


def shard_manifest_name(shard: Optional[tuple[int, int]]) -> str:
    """Each shard has a manifest of its own (runs of several shards may share -o, side by side)."""
    if shard is None:
        return MANIFEST_NAME
    stem, dot, suffix = MANIFEST_NAME.rpartition(".")
    return f"{stem}.shard-{shard[0]}-of-{shard[1]}{dot}{suffix}"


# --- the batch -----------------------------------------------------------------------------------------

@dataclass
class Summary:
    done: int = 0  # input+recipe pairs written this run
    already: int = 0  # pairs whose record and output still held: no work at all
    skipped: int = 0
    failed: int = 0
    norms_computed: dict[str, int] = field(default_factory=dict)  # family -> norms computed before dispatch
    records: list[Record] = field(default_factory=list)  # this run's records, in the order they were appended

    def line(self) -> str:
        """Counts of (file, recipe) pairs."""
        return f"{self.done} done, {self.already} already done, {self.skipped} skipped, {self.failed} failed"


class _Runner:
    """Runs a callable in this process (``jobs == 1``) or on a pool of spawned workers."""

    def __init__(self, jobs: int, verbosity: int):
        self.pool = None
        if jobs > 1:
            import multiprocessing

            threads = max(1, (os.cpu_count() or 1) // jobs)
            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(threads, verbosity))

    def map(self, fn, calls: Sequence[tuple], on_done: Callable[[int, Any], None]) -> None:
        """``fn(*call)`` for each call; ``on_done(index, result)`` in this process, as each finishes."""
        if self.pool is None:
            for index, call in enumerate(calls):
                on_done(index, fn(*call))
            return
        pending = {self.pool.submit(fn, *call): index for index, call in enumerate(calls)}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=pending.get):
                on_done(pending.pop(future), future.result())

    def close(self, interrupted: bool = False) -> None:
        if self.pool is None:
            return
        if interrupted:  # SIGTERM: a worker inside a task unwinds (its temp removed), then exits
            processes = list((getattr(self.pool, "_processes", None) or {}).values())
            for process in processes:
                if process.is_alive():
                    process.terminate()
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
                    process.join()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int, verbosity: int) -> None:
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.signal(signal.SIGTERM, _on_term)
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def _on_term(signum, frame) -> None:
    global _TERMINATED
    _TERMINATED = True
    if _IN_TASK:
        raise KeyboardInterrupt
    os._exit(130)


def _norm_kinds(recipes) -> Optional[tuple[str, ...]]:
    """The norms reference_table asks for with these recipes (None: no base norms at all)."""
    needed = set().union(*(r.base_references for r in recipes)) if recipes else set()
    if not needed & _NORM_METHODS:
        return None
    return (("spectral",) if "spn_ckpt" in needed else ()) + ("frobenius",)


def _base_norms(base, cache, targets: Iterable[tuple], kinds: tuple[str, ...], device) -> tuple[int, dict]:
    """Norms of every base layer the family's LoRAs touch, once, into the cache; returns how many were
    computed and {layer cache key: norms} of them all. Layers the base lacks or shapes it does not match
    are left to each file's own error."""
    from .norms import cache_id, reference_norms
    from .norms_cache import layer_cache_key

    names, cached_as = base.names(), cache_id(base)
    wanted = []
    for name, offset, shape in dict.fromkeys(targets):
        if name in names and tuple(base.shape(name, offset)) == tuple(shape):
            wanted.append((name, offset))
    missing = [t for t in wanted if not _cached(cache, cached_as, layer_cache_key(*t), kinds)]
    if missing:
        try:
            reference_norms(base, missing, kinds=kinds, device=device, cache=cache)
        except LoraError as exc:  # a corrupt base layer: the sound ones are cached; each file using it fails
            log.warning("%s", exc)
        cache.save()
    keys = (layer_cache_key(*t) for t in wanted)
    return len(missing), {key: values for key in keys if (values := cache.get(cached_as, key)) is not None}


def _cached(cache, fingerprint: str, key: str, kinds: tuple[str, ...]) -> bool:
    values = cache.get(fingerprint, key) if cache is not None else None
    return values is not None and all(k in values for k in kinds)


def run_batch(items: Sequence[Item], settings: Settings, bases: Mapping[str, BaseSpec], manifest: Manifest, *,
              jobs: int = 1, verbosity: int = 0,
              on_file: Optional[Callable[[str, int, int, list[Record]], None]] = None,
              progress: Optional[Progress] = None, quiet: bool = True, engine: Optional[Engine] = None,
              passthrough: tuple[type, ...] = (), no_base_fix: str = "add --base {family}=PATH",
              runner=None) -> Summary:
    """The three passes (probe, base norms, resize); records appended as each file finishes.

    ``bases``: family -> base; ``"*"`` is the base of every family (ComfyUI's connected MODEL, where the
    host's key maps decide what matches). ``on_file(stage, done, total, records)`` runs in this process
    after each file of the "check" and "resize" passes (ComfyUI's progress bar and Cancel); ``progress``
    is each file's inner progress; ``no_base_fix`` is what a skipped record tells the user to do (a format
    string with ``{family}``). ``engine`` replaces the resize command's (in this process only, -j 1;
    the batch then leaves base norms to it). ``runner``: where files run (default: this process, or ``jobs``
    spawned workers; ``core.batch_ray.RayRunner`` for a Ray cluster)."""
    if engine is not None and (jobs != 1 or runner is not None):
        raise UsageError("a custom engine runs in this process only", fix="use one job")
    from tqdm import tqdm

    from .recipe import parse_recipes

    recipes = parse_recipes(":".join(settings.recipes))
    texts = tuple(r.text for r in recipes)
    needs_base = {r.text for r in recipes if r.needs_base}
    summary = Summary()
    runner = runner or _Runner(jobs, verbosity)
    bar = None

    def append(record: Record) -> None:
        manifest.append(record)
        summary.records.append(record)
        setattr(summary, record["status"], getattr(summary, record["status"]) + 1)

    try:
        probes: list[Optional[Probe]] = [None] * len(items)
        read = engine is None  # a family to match and base norms to compute (a custom engine has its own base)
        calls = [(item.path, settings.arch, _done_records(manifest, item, texts, settings, bases), len(texts),
                  read) for item in items]
        bar = tqdm(total=len(items), desc="check", unit="file", disable=quiet, file=sys.stderr, leave=False)

        def probed(index: int, found: Probe) -> None:
            probes[index] = found
            bar.update(1)
            if on_file is not None:
                on_file("check", sum(p is not None for p in probes), len(items), [])

        runner.map(probe, calls, probed)
        bar.close()
        tasks: list[Task] = []
        later: dict[int, list[tuple[Task, str, str]]] = {}  # task index -> its file's skipped recipes
        for item, found in zip(items, probes):
            stub = Task(item, found.sha256, found.family or "", texts, texts, None)
            if found.error is not None:
                stub.sha256 = stub.sha256 or _sha256_or_none(item.path)  # the resize pass will not read it
                for recipe in texts:
                    append(_record(stub, recipe, "failed", settings, error=found.error))
                continue
            summary.already += len(found.verified)
            base = bases.get(found.family, bases.get("*"))
            runnable = tuple(t for t in texts if base is not None or t not in needs_base)
            skips = [(stub, recipe, _no_base(found.family, recipe, no_base_fix)) for recipe in texts
                     if recipe not in runnable and recipe not in found.verified]
            write = tuple(t for t in runnable if t not in found.verified)
            if write:  # its skipped records wait for the hash of the resize pass's read
                if skips:
                    later[len(tasks)] = skips
                tasks.append(Task(item, found.sha256, found.family, runnable, write, base))
            elif skips:
                stub.sha256 = stub.sha256 or _sha256_or_none(item.path)
                for _, recipe, error in skips:
                    append(_record(stub, recipe, "skipped", settings, error=error))
        kinds = _norm_kinds(recipes)
        shared: dict[str, Any] = {}  # family -> its norms, as the runner hands them to workers
        if kinds is not None and engine is None:
            for family in dict.fromkeys(t.family for t in tasks if t.base is not None and t.base.path):
                base, cache = _open(next(t.base for t in tasks if t.family == family))
                targets = [target for t, found in zip(items, probes) if found.family == family
                           for target in found.targets]
                summary.norms_computed[family], norms = _base_norms(base, cache, targets, kinds, settings.device)
                if getattr(runner, "shares_norms", False):
                    shared[family] = runner.put(norms)
        bar = tqdm(total=len(tasks), desc="resize", unit="file", disable=quiet, file=sys.stderr)
        if getattr(runner, "shares_norms", False):  # Ray: the norms come from the object store
            work, calls = runner.task, [(_portable(t), settings, shared.get(t.family)) for t in tasks]
        elif runner.pool:
            work, calls = resize_file, [(_portable(t), settings) for t in tasks]
        else:
            work, calls = resize_file, [(t, settings, progress, engine or core_engine, passthrough) for t in tasks]

        resized = [0]  # tqdm counts nothing when disabled (-q): our own count for on_file

        def finished(index: int, records: list[Record]) -> None:
            resized[0] += 1
            shown = set()
            for record in records:
                append(record)
                line = _line(record)
                if (verbosity >= 1 or record["status"] == "failed") and line not in shown:
                    shown.add(line)  # a file's error once, not once per recipe
                    tqdm.write(line, file=sys.stderr if record["status"] == "failed" else sys.stdout)
            skipped = []
            for stub, recipe, error in later.pop(index, ()):
                stub.sha256 = records[0]["sha256"] if records else _sha256_or_none(stub.item.path)
                skipped.append(_record(stub, recipe, "skipped", settings, error=error))
                append(skipped[-1])
            records = [*records, *skipped]
            bar.update(1)
            if on_file is not None:
                on_file("resize", resized[0], len(tasks), records)

        runner.map(work, calls, finished)
    except BaseException:
        runner.close(interrupted=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    runner.close()
    return summary


def _portable(task: Task) -> Task:
    return Task(task.item, task.sha256, task.family, task.recipes, task.write,
                task.base.portable() if task.base is not None else None)


def _done_records(manifest: Manifest, item: Item, texts: Sequence[str], settings: Settings,
                  bases: Mapping[str, BaseSpec]) -> list[Record]:
    """The done records of this input that still fit this run's settings (the probe checks the bytes)."""
    out = []
    for recipe in texts:
        record = manifest.latest.get((item.path, recipe))
        family = record.get("family") if record else None
        if record and record.get("status") == "done" and \
                record.get("settings") == settings.record(_fingerprint(bases.get(family, bases.get("*")))):
            out.append(record)
    return out


def _no_base(family: Optional[str], recipe: str, fix: str) -> str:
    which = f" for this LoRA's family ({family})" if family else ""
    return (f"recipe {recipe!r} compares with the base checkpoint, and no base was given{which}. "
            f"Fix: {fix.format(family=family or 'FAMILY')}, or use a recipe that needs no base")


def _line(record: Record) -> str:
    if record["status"] == "failed":
        return f"error: {record['error']}"
    return (f"{record['output']}: {record['bytes'] / 2**20:.3f} MiB, total rank {record['ranks_before']} -> "
            f"{record['ranks_after']}, relative error {100 * record['relative_error']:.2f}%")


# --- command line --------------------------------------------------------------------------------------

def cmd_batch(args: argparse.Namespace) -> int:
    from .devices import resolve_device
    from .outputs import check_output_folder
    from .recipe import parse_recipes

    recipes = parse_recipes(args.score_recipes)
    if args.jobs < 1:
        raise UsageError(f"-j {args.jobs}: the number of worker processes is at least 1", fix="e.g. -j 2")
    if args.ray is None and args.gpus_per_task:
        raise UsageError("--gpus-per-task is for Ray tasks", fix="add --ray, or use -d cuda")
    if not (args.gpus_per_task >= 0):
        raise UsageError(f"--gpus-per-task {args.gpus_per_task} is not a number of GPUs", fix="e.g. 1 or 0.5")
    if args.ray is not None and args.gpus_per_task and args.device is None:
        device = "cuda"  # the workers' GPU: this machine (the driver) may have none
    else:
        device = resolve_device(args.device)
    shard = parse_shard(args.shard)
    out = check_output_folder(args.output_folder, "output folder (-o)")
    items = collect_inputs(args.inputs, str(out))
    every = len(items)
    if shard is not None:
        items = [item for item in items if in_shard(item, str(out), shard)]
    bases = parse_bases(args.base)
    settings = Settings(tuple(r.text for r in recipes), args.output_dtype, args.format,
                        None if device is None else str(device), args.arch)
    manifest = Manifest(args.manifest or os.path.join(out, shard_manifest_name(shard)))
    if args.manifest is None:  # the other shards' records of these inputs (a library split another way)
        siblings = sorted(glob.glob(os.path.join(glob.escape(str(out)), MANIFEST_NAME.replace(".jsonl", "*.jsonl"))))
        manifest.adopt([p for p in siblings if os.path.abspath(p) != os.path.abspath(manifest.path)],
                       {item.path for item in items})
    runner = None
    if args.ray is not None:
        from .batch_ray import RayRunner

        runner = RayRunner(args.ray or None, args.gpus_per_task)
    summary = run_batch(items, settings, bases, manifest, jobs=args.jobs, verbosity=args.verbose,
                        quiet=args.quiet, runner=runner)
    norms = "".join(f"; base norms of {family}: {count} computed" for family, count in summary.norms_computed.items())
    which = f" (shard {shard[0]}/{shard[1]} of {every})" if shard is not None else ""
    print(f"{len(items)} files{which} x {len(recipes)} recipes: {summary.line()}{norms}; manifest {manifest.path}",
          file=sys.stderr if summary.failed else sys.stdout)
    return 1 if summary.failed else 0


def add_batch_parser(sub, handlers: dict[str, Callable], add_common: Callable) -> None:
    from .cli import FORMAT_HELP, FORMATS
    from .recipe import DEFAULT_RECIPE
    from .resize_cli import _DTYPES

    p = sub.add_parser("batch", help="resize a whole library: folders, globs, @lists; resumable, -j N workers")
    p.add_argument("inputs", nargs="+", help="LoRA files, folders (recursive), globs or @list.txt")
    p.add_argument("-o", "--output_folder", required=True, help="outputs mirror the input tree here")
    p.add_argument("-r", "--score_recipes", default=DEFAULT_RECIPE, help="recipes separated by ':'")
    p.add_argument("--base", action="append", default=[], metavar="FAMILY=PATH",
                   help="base checkpoint of a model family (sd15, sdxl, flux ...: the names --arch lists); "
                   "repeatable")
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1: this process)")
    p.add_argument("--manifest", default=None, help=f"JSON Lines record of the batch (default OUT/{MANIFEST_NAME}, "
                   "or OUT/lora-resize-batch.shard-K-of-N.jsonl with --shard)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="only the inputs of shard K of N (split by a hash of each file's place in the tree), "
                   "with a manifest of its own: run shards 0/N ... N-1/N one after another or side by side, on "
                   "one machine or several, to keep each manifest small")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the files as tasks on a Ray cluster (no address: a local one, or RAY_ADDRESS); "
                   "paths must be the same on every node. Needs the [ray] extra")
    p.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs Ray gives each task (with --ray)")
    p.add_argument("-t", "--output_dtype", default="16", choices=sorted(_DTYPES), help="output precision")
    p.add_argument("-d", "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("-f", "--format", default="kohya", choices=FORMATS, help=FORMAT_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common(p)
    handlers["batch"] = cmd_batch

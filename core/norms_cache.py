"""A persistent cache of base-layer norms, beside the checkpoint, safe with concurrent writers and bad files.

File: ``.lora_resize_norms.json`` (a dot-file: ComfyUI lists only model extensions, so it never
shows up as a model), holding ``{fingerprint: {"name|start:len": {"spectral": x, "frobenius": y}}}``.
A checkpoint's fingerprint changes whenever the file does (size, mtime, header hash), so stale
entries are simply never read. Saving takes an advisory lock, re-reads and merges, then replaces
the file atomically (``core.atomic``: same temp pattern, same sweep of killed writers' temps): two
processes saving at once both keep their entries.

A cache is an optimisation, so it never fails a run: a file that is not that layout (corrupt JSON,
another program's JSON, non-finite numbers: any part off the layout) is moved aside to
``.lora_resize_norms.json.bad-<time>`` (kept for a look, never trusted, never silently overwritten)
and the norms are recomputed; a file
that cannot be read (permission) is left alone and not written over; a save that fails (full disk,
read-only folder, no lock file) is a warning and leaves the previous file intact. Non-finite norms
are never cached.
"""
from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
from contextlib import contextmanager
from typing import Optional

from .atomic import atomic_write, make_temp, sweep_stale_temps
from .errors import LoraError

log = logging.getLogger("lora_resize")
CACHE_NAME = ".lora_resize_norms.json"
MAX_CACHE_BYTES = 64 * 2**20  # ~800k layers; a bigger file is not one of ours
_RECOMPUTE = "the norms will be computed again"


def user_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "comfyui-lora-resize")


def layer_cache_key(name: str, offset) -> str:
    return name if offset is None else f"{name}|{offset[1]}:{offset[2]}"


def _writable_dir(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = make_temp(folder, ".lora_resize_probe")  # the temp pattern: a kill here is swept later
        os.close(fd)
        os.unlink(probe)
        return True
    except OSError:
        return False


@contextmanager
def _locked(path: str):
    lock_path = path + ".lock"
    with open(lock_path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: msvcrt locks a byte range instead
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
        yield


def _finite(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _json_number(value) -> bool:
    return isinstance(value, (int, float)) and _finite(value) is not None


def _layout_ok(data) -> bool:
    """Whether ``data`` is {fingerprint: {key: {name: finite float}}}: anything else is not trusted at all."""
    return isinstance(data, dict) and all(
        isinstance(entries, dict) and all(
            isinstance(values, dict) and values and all(_json_number(v) for v in values.values())
            for values in entries.values())
        for entries in data.values())


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(MAX_CACHE_BYTES + 1)


class NormCache:
    def __init__(self, path: str):
        self.path = path
        self._dirty: dict[str, dict[str, dict]] = {}
        self._data, state, reason = self._load()
        if state == "corrupt":
            self._data = self._set_aside(reason)
        elif state == "unreadable":
            log.warning("%s: norms cache unreadable (%s); it is left as it is and not updated, and %s. "
                        "Fix: make it readable, or remove it", path, reason, _RECOMPUTE)
        sweep_stale_temps(os.path.dirname(path) or ".")

    @classmethod
    def in_folder(cls, folder: str) -> "NormCache":
        """The cache of a model folder, or of the user cache folder if that one is read-only (or a folder
        sits at the cache's path)."""
        path = os.path.join(folder, CACHE_NAME)
        if os.path.isdir(path):
            log.warning("%s is a folder, not a norms cache: norms are cached in %s instead. Fix: remove that "
                        "folder to cache them beside the models", path, user_cache_dir())
            folder = user_cache_dir()
        elif not _writable_dir(folder):
            log.info("%s is read-only: norms cached in %s", folder, user_cache_dir())
            folder = user_cache_dir()
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            log.warning("%s: cannot create the norms cache folder (%s); %s each run", folder, exc, _RECOMPUTE)
        return cls(os.path.join(folder, CACHE_NAME))

    @classmethod
    def for_checkpoint(cls, checkpoint: str) -> "NormCache":
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
        return cls.in_folder(folder)

    def _load(self) -> tuple[dict, str, str]:
        """(entries, state, reason); state: "ok", "missing", "corrupt" (to move aside) or
        "unreadable" (not ours to touch: a folder, no permission)."""
        try:
            info = os.stat(self.path)
            if stat.S_ISDIR(info.st_mode):
                return {}, "unreadable", "a folder is at its path"
            if info.st_size > MAX_CACHE_BYTES:
                return {}, "corrupt", f"{info.st_size} bytes, more than a norms cache holds"
            raw = _read_bytes(self.path)
        except FileNotFoundError:
            return {}, "missing", ""
        except OSError as exc:
            return {}, "unreadable", exc.strerror or str(exc)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, absurd nesting
            return {}, "corrupt", f"not JSON: {str(exc)[:80]}"
        if not _layout_ok(data):
            return {}, "corrupt", "not the layout {fingerprint: {layer: {norm: finite number}}}"
        return {fp: {key: {n: float(v) for n, v in values.items()} for key, values in entries.items()}
                for fp, entries in data.items()}, "ok", ""

    def _set_aside(self, reason: str) -> dict:
        """Under the lock (another process may have just replaced it), move a corrupt file aside; returns
        the entries of the file now there (a good one that replaced it meanwhile, or none)."""
        try:
            with _locked(self.path):
                entries, state, reason = self._load()
                if state != "corrupt":
                    return entries
                aside = self._aside_name()
                os.rename(self.path, aside)
        except OSError as exc:
            log.warning("%s: norms cache unreadable (%s) and cannot be moved aside (%s); it is ignored and %s",
                        self.path, reason, exc, _RECOMPUTE)
            return {}
        log.warning("%s: norms cache unreadable (%s); moved aside to %s, and %s", self.path, reason, aside,
                    _RECOMPUTE)
        return entries

    def _aside_name(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = f"{self.path}.bad-{stamp}", 1
        while os.path.lexists(aside):
            aside, n = f"{self.path}.bad-{stamp}-{n}", n + 1
        return aside

    def get(self, fingerprint: str, key: str) -> Optional[dict]:
        return self._data.get(fingerprint, {}).get(key)

    def put(self, fingerprint: str, key: str, values: dict) -> None:
        """Remember finite norms; a NaN or an infinity (a broken base layer) is never cached."""
        good = {}
        for name, value in values.items():
            number = _finite(value)
            if number is None:
                log.warning("layer %s: its %s norm is %r, not a finite number: not cached", key, name, value)
            else:
                good[name] = number
        if not good:
            return
        self._data.setdefault(fingerprint, {}).setdefault(key, {}).update(good)
        self._dirty.setdefault(fingerprint, {}).setdefault(key, {}).update(good)

    def save(self) -> bool:
        """Merge this process's new entries into the file under a lock; atomic replace. Returns whether
        it saved; a failure is a warning (the run goes on, the previous file stays as it was)."""
        if not self._dirty:
            return True
        try:
            with _locked(self.path):
                current, state, reason = self._load()
                if state == "unreadable":
                    log.warning("%s: norms cache unreadable (%s): not updated, and %s next run",
                                self.path, reason, _RECOMPUTE)
                    return False
                if state == "corrupt":
                    os.rename(self.path, self._aside_name())
                    log.warning("%s: norms cache unreadable (%s); moved aside", self.path, reason)
                for fingerprint, entries in self._dirty.items():
                    bucket = current.setdefault(fingerprint, {})
                    for key, values in entries.items():
                        bucket.setdefault(key, {}).update(values)
                payload = json.dumps(current, allow_nan=False).encode("utf-8")
                atomic_write(lambda fh: fh.write(payload), self.path, overwrite=True)
        except (OSError, LoraError, ValueError) as exc:
            reason = exc.problem if isinstance(exc, LoraError) else exc
            log.warning("%s: norms cache not saved (%s); %s next run", self.path, reason, _RECOMPUTE)
            return False
        self._data = current
        self._dirty = {}
        return True

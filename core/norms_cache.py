"""A persistent cache of base-layer norms, beside the checkpoint, safe with concurrent writers.

File: ``.lora_resize_norms.json`` (a dot-file: ComfyUI lists only model extensions, so it never
shows up as a model), holding ``{fingerprint: {"name|start:len": {"spectral": x, "frobenius": y}}}``.
A checkpoint's fingerprint changes whenever the file does (size, mtime, header hash), so stale
entries are simply never read. Saving takes an advisory lock, re-reads and merges, then replaces
the file atomically: two processes saving at once both keep their entries. A corrupt file is
ignored with a warning and rewritten.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Optional

log = logging.getLogger("lora_resize")
CACHE_NAME = ".lora_resize_norms.json"


def user_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "comfyui-lora-resize")


def layer_cache_key(name: str, offset) -> str:
    return name if offset is None else f"{name}|{offset[1]}:{offset[2]}"


def _writable_dir(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".lora_resize_probe", delete=True)
        probe.close()
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


class NormCache:
    def __init__(self, path: str):
        self.path = path
        self._data: dict[str, dict[str, dict]] = self._read()
        self._dirty: dict[str, dict[str, dict]] = {}

    @classmethod
    def in_folder(cls, folder: str) -> "NormCache":
        """The cache of a model folder, or of the user cache folder if that one is read-only."""
        if not _writable_dir(folder):
            log.info("%s is read-only: norms cached in %s", folder, user_cache_dir())
            folder = user_cache_dir()
            os.makedirs(folder, exist_ok=True)
        return cls(os.path.join(folder, CACHE_NAME))

    @classmethod
    def for_checkpoint(cls, checkpoint: str) -> "NormCache":
        folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
        return cls.in_folder(folder)

    def _read(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except (OSError, ValueError) as exc:
            log.warning("%s: norms cache unreadable (%s); it will be rebuilt", self.path, exc)
            return {}

    def get(self, fingerprint: str, key: str) -> Optional[dict]:
        return self._data.get(fingerprint, {}).get(key)

    def put(self, fingerprint: str, key: str, values: dict) -> None:
        self._data.setdefault(fingerprint, {}).setdefault(key, {}).update(values)
        self._dirty.setdefault(fingerprint, {}).setdefault(key, {}).update(values)

    def save(self) -> None:
        """Merge this process's new entries into the file under a lock; atomic replace."""
        if not self._dirty:
            return
        with _locked(self.path):
            current = self._read()
            for fingerprint, entries in self._dirty.items():
                bucket = current.setdefault(fingerprint, {})
                for key, values in entries.items():
                    bucket.setdefault(key, {}).update(values)
            folder = os.path.dirname(self.path)
            fd, tmp = tempfile.mkstemp(prefix=".lora_resize_norms.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(current, fh)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # shared by every user of the model folder
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._data = current
            self._dirty = {}

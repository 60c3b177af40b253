"""Atomic file replacement: a crash or an exception never leaves a partial output file."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import LoraError


def atomic_write(fill: Callable[[BinaryIO], object], path: str | os.PathLike, overwrite: bool = False) -> None:
    """Let ``fill`` write a temporary file beside ``path``, then rename: a crash (or an exception in
    ``fill``) never leaves a partial file.

    Refuses to replace an existing file unless ``overwrite``; the refusal is decided atomically
    (a hard link), so two writers racing for one name cannot both win.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise LoraError("output file already exists", file=str(target),
                        fix="choose another name or ask to overwrite (--overwrite)")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved LoRA is an ordinary file
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError as exc:
                raise LoraError("output file already exists", file=str(target),
                                fix="choose another name or ask to overwrite (--overwrite)") from exc
            except OSError:  # file systems without hard links: best effort
                if target.exists():
                    raise LoraError("output file already exists", file=str(target),
                                    fix="choose another name or ask to overwrite (--overwrite)")
                os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

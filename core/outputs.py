"""Output folders and files checked before any work, so a run never decomposes for an hour and then
fails to write. What is wrong with the path itself (a file in the way, a symbolic link loop, a name
too long) is a UsageError; a folder that exists but cannot be written now is a LoraError (a run error).
Nothing is created here: a folder that does not exist yet is made by the writer, on the first write.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import LoraError, UsageError

_NAME_MAX = 255  # bytes per path component on Linux, macOS and Windows file systems
_PATH_MAX = 4096


def name_limits(folder: str) -> tuple[int, int]:
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (AttributeError, OSError, ValueError):
        return _NAME_MAX, _PATH_MAX


def nearest_existing(path: Path, what: str) -> Path:
    """The path itself or its nearest existing ancestor (the one the writer's mkdir starts from)."""
    for candidate in (path, *path.parents):
        try:
            os.stat(candidate)
            return candidate
        except FileNotFoundError:
            if os.path.lexists(candidate):
                raise UsageError(f"{what} {candidate} is a broken symbolic link",
                                 fix="fix the link or choose another folder") from None
        except NotADirectoryError:
            continue  # the file in the way is found further up and named there
        except OSError as exc:
            raise _path_error(exc, path, what) from None
    return Path(".")


def _path_error(exc: OSError, path: Path, what: str) -> LoraError:
    if exc.errno == errno.ENAMETOOLONG:
        return UsageError(f"{what} {str(path)[:80]}... is too long for the file system",
                          fix="choose a shorter folder path (255 bytes per name at most)")
    if exc.errno == errno.ELOOP:
        return UsageError(f"{what} {path} is a symbolic link loop", fix="fix or remove the link")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return LoraError(f"{what} {path} cannot be reached ({exc.strerror})",
                         fix="choose a folder you can read and write, or change its permissions")
    return LoraError(f"{what} {path} cannot be used ({exc.strerror or exc})", fix="choose another folder")


def check_output_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """``folder`` is, or can be made as, a writable folder; returns it as a Path.

    Checked: an empty path, a NUL byte, a name or path too long, a symbolic link loop or a broken link,
    a file at the path or above it, and write permission where the folder (or its first existing
    ancestor) is: ``os.access`` reports a read-only mount (EROFS) and an immutable folder even to root."""
    text = os.fspath(folder)
    if not text:
        raise UsageError(f"the {what} is empty", fix="give a folder, e.g. -o out")
    if "\0" in text:
        raise UsageError(f"the {what} {text!r} contains a NUL byte", fix="remove it")
    path = Path(text)
    name_max, path_max = name_limits(str(_parent_guess(path)))
    long_part = next((p for p in path.parts if len(os.fsencode(p)) > name_max), None)
    if long_part is not None:
        raise UsageError(f"the {what} has a name of {len(os.fsencode(long_part))} bytes ({long_part[:40]}...)",
                         fix=f"use names of at most {name_max} bytes")
    if len(os.fsencode(os.path.abspath(text))) >= path_max:
        raise UsageError(f"the {what} path is longer than the file system allows ({path_max} bytes)",
                         fix="choose a shorter folder path")
    existing = nearest_existing(path, f"the {what}")
    if not existing.is_dir():
        if existing == path:
            raise UsageError(f"the {what} {path} is a file, not a folder",
                             fix="give a folder (the output names are made from the LoRA and the recipe)")
        raise UsageError(f"the {what} {path} lies below the file {existing}", fix="choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (it would be made inside {existing})"
        raise LoraError(f"the {what} {path} is not writable{where}",
                        fix="choose a folder you can write to, or change its permissions (a read-only mount "
                        "cannot be written even by root)")
    return path


def _parent_guess(path: Path) -> Path:
    for candidate in (path, *path.parents):
        try:
            if candidate.is_dir():
                return candidate
        except OSError:
            continue
    return Path(".")


def check_output_file(path: str | os.PathLike, *, overwrite: bool, what: str = "output file") -> Path:
    """``path`` can be written: its folder passes check_output_folder, its name fits the file system,
    it is not a folder, and it does not exist unless ``overwrite``."""
    text = os.fspath(path)
    if not text:
        raise UsageError(f"the {what} is empty", fix="give a file name, e.g. -o out.safetensors")
    target = Path(text)
    folder = check_output_folder(target.parent if str(target.parent) else ".", f"folder of the {what}")
    name_max, path_max = name_limits(str(_parent_guess(folder)))
    if len(os.fsencode(target.name)) > name_max:
        raise UsageError(f"the {what} name is {len(os.fsencode(target.name))} bytes long ({target.name[:40]}...)",
                         file=None, fix=f"use a name of at most {name_max} bytes")
    if len(os.fsencode(os.path.abspath(text))) >= path_max:
        raise UsageError(f"the {what} path is longer than the file system allows ({path_max} bytes)",
                         fix="choose a shorter path")
    if target.is_dir():
        raise UsageError(f"the {what} {target} is a folder", fix="give a file name, e.g. -o out.safetensors")
    if os.path.lexists(target) and not overwrite:
        raise LoraError("output file already exists", file=str(target),
                        fix="choose another name or ask to overwrite (--overwrite)")
    return target

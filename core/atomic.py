"""Atomic file replacement, and the one temp-file pattern that lets a later run clean up after a killed one.

A write goes to ``.<target name>.lora-resize-<host>-<pid>-<random>.tmp`` beside the target, then is
renamed (or hard-linked) into place, so a crash never leaves a partial file at the target name. A
SIGKILL (or a power cut) cannot run any cleanup, so every later write into the folder first sweeps
the temps of this pattern whose writer is gone: same host tag (a PID means nothing on another machine
sharing the folder, or in another container) and ``os.kill(pid, 0)`` says no such process.
Nothing else is ever removed: a live writer's temp, other programs' files and temps of other hosts
stay. A stale temp whose PID was since reused by an unrelated process is kept until that process
ends (a missed cleanup, never a wrong one).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import LoraError

log = logging.getLogger("lora_resize")
TEMP_MARK = ".lora-resize-"
_TEMP_RE = re.compile(r"^\..+\.lora-resize-(?P<host>[0-9a-f]{8})-(?P<pid>[1-9][0-9]*)-[0-9a-f]+\.tmp$", re.DOTALL)
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_EXISTS_FIX = "choose another name or ask to overwrite (--overwrite)"


def temp_name(target_name: str) -> str:
    """The temp file name for a write to ``target_name`` by this process (hidden: a dot-file). A long
    name is cut so the temp fits wherever the target does (255 bytes per name)."""
    short = target_name.encode("utf-8", "surrogateescape")[:150].decode("utf-8", "ignore")
    return f".{short}{TEMP_MARK}{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def make_temp(folder: str | os.PathLike, target_name: str) -> tuple[int, str]:
    """Create (exclusively) a temp file for ``target_name`` in ``folder``; returns (fd, path).

    Mode 0o666 less the umask, like any file the user makes (mkstemp's 0600 would hide a saved LoRA
    from the other users of a shared model folder)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        path = os.path.join(os.fspath(folder), temp_name(target_name))
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:  # 32 random bits collided: draw again
            continue


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine. When unsure, say yes (never delete a live temp)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process on Windows
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # another user's process, or a PID we cannot test
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def sweep_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove this pattern's temps in ``folder`` whose writer (same host) is gone; returns their paths.

    Best effort: an unreadable folder or a file that vanished meanwhile is not an error."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or match["host"] != HOST_TAG or pid_alive(int(match["pid"])):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            continue
    if removed:
        log.info("removed %d temp file(s) left by killed runs in %s", len(removed), os.fspath(folder))
    return removed


def write_error(exc: OSError, target: Path) -> LoraError:
    """The project's error for an OS failure while writing ``target``: what happened, where, and the fix."""
    folder = str(target.parent)
    code = exc.errno
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", None):
        return LoraError(f"no space left in {folder}", file=str(target),
                         fix="free some space there or choose another output folder")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return LoraError(f"{folder} is not writable ({exc.strerror})", file=str(target),
                         fix="choose a folder you can write to, or change its permissions")
    if code == errno.ENAMETOOLONG:
        return LoraError("the output path is too long for the file system", file=str(target),
                         fix="choose a shorter name or folder")
    if code in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
        return LoraError(f"cannot create the folder {folder}: a file is in the way ({exc.strerror})",
                         file=str(target), fix="choose another output folder, or move that file")
    if code == errno.ELOOP:
        return LoraError(f"{folder} is a symbolic link loop", file=str(target), fix="fix or remove the link")
    return LoraError(f"cannot write to {folder} ({exc.strerror or exc})", file=str(target),
                     fix="check the output folder, or choose another one")


def atomic_write(fill: Callable[[BinaryIO], object], path: str | os.PathLike, overwrite: bool = False,
                 verify: Callable[[str], object] | None = None) -> None:
    """Let ``fill`` write a temporary file beside ``path``, then rename: a crash (or an exception in
    ``fill``) never leaves a partial file, and the next write into the folder removes a killed run's temp.
    ``verify`` gets the finished temp's path before it is moved into place: if it raises, the temp is
    removed and the target never appears (the written file is read back before anyone can load it).

    Refuses to replace an existing file unless ``overwrite``; the refusal is decided atomically
    (a hard link), so two writers racing for one name cannot both win. OS failures (full disk,
    read-only folder, a file in the way) become a :class:`LoraError` naming the folder and the fix.
    """
    target = Path(path)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise LoraError("the output path is a folder", file=str(target), fix="give a file name, not a folder")
        if target.exists() and not overwrite:
            raise LoraError("output file already exists", file=str(target), fix=_EXISTS_FIX)
        sweep_stale_temps(target.parent)
        fd, tmp = make_temp(target.parent, target.name)
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if verify is not None:
            verify(tmp)
        _publish(tmp, target, overwrite)
    except OSError as exc:
        raise write_error(exc, target) from exc
    finally:
        if tmp is not None and os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass  # the folder turned read-only meanwhile: a later write sweeps it


def _publish(tmp: str, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError as exc:
        raise LoraError("output file already exists", file=str(target), fix=_EXISTS_FIX) from exc
    except OSError as exc:  # file systems without hard links (FAT, some shares): best effort
        if target.exists():
            raise LoraError("output file already exists", file=str(target), fix=_EXISTS_FIX) from exc
        os.replace(tmp, target)

"""Save prefixes: the rules that keep a saved LoRA inside the loras folder, checked before anything is written.

Pure path logic (no ComfyUI import), so the rules are tested without a host. A prefix is
``subfolder/.../name``: ``/`` or ``\\`` separate folders, ``.`` and empty parts are dropped. Refused:
an empty prefix or one that names no file (``.``, ``./``), control characters (NUL included), an
absolute path or a drive letter, any ``..`` part, a part longer than ``MAX_NAME_BYTES`` and a
whole path longer than the OS allows. Containment is checked on the normalised, *unresolved*
path: a subfolder that is a symlink the user made inside the loras folder is followed on purpose
(models on another disk), while no text in the prefix can climb out of the folder.
"""
from __future__ import annotations

import errno
import os
import re

from ..core.errors import LoraError

MAX_NAME_BYTES = 200  # leaves room for "_00001_.safetensors" and the writer's temp-file affixes under 255
# what SaveLoRA appends to the stem, plus the longest temp-file affixes beside it
_SUFFIX_BYTES = len("_00000_.safetensors") + 48
_FIX = "use a relative name like 'resized/my_lora' inside the loras folder"
RULE = ("The file always lands inside the loras folder: a relative 'subfolder/name' (no absolute path, "
        "no '..', no control characters, each part at most 200 bytes); a subfolder that is a symlink you "
        "made inside the loras folder is followed.")


def _refuse(prefix: object, rule: str, fix: str = _FIX) -> LoraError:
    shown = prefix if not isinstance(prefix, str) or len(prefix) <= 60 else prefix[:40] + "…" + prefix[-8:]
    return LoraError(f"save prefix {shown!r} {rule}", fix=fix)


def path_limit(folder: str) -> int:
    """Longest path, in bytes, the OS takes below ``folder`` (4096 on Linux; 260 on Windows without long paths)."""
    if os.name == "nt":
        return 260
    probe = folder
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        return int(os.pathconf(probe or "/", "PC_PATH_MAX"))
    except (OSError, ValueError):
        return 4096


def prefix_parts(prefix: object) -> list[str]:
    """The prefix's folder and name parts, or LoraError naming the rule it breaks."""
    if not isinstance(prefix, str):
        raise _refuse(prefix, "is not text", "type a name like 'resized/my_lora'")
    if not prefix.strip():
        raise _refuse(prefix, "is empty", "type a name like 'resized/my_lora'")
    control = next((c for c in prefix if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise _refuse(prefix, f"contains the control character {control!r} (file names cannot hold it)",
                      "remove it; use letters, digits, '_', '-', and '/' for subfolders")
    text = prefix.replace("\\", "/")
    if text.startswith("/") or re.match(r"[A-Za-z]:", text) or os.path.isabs(prefix):
        raise _refuse(prefix, "is an absolute path and leaves the loras folder", _FIX)
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refuse(prefix, "leaves the loras folder ('..' is not allowed)", _FIX)
    if not parts:
        raise _refuse(prefix, "names no file", "type a name like 'resized/my_lora'")
    for part in parts:
        if not part.strip():
            raise _refuse(prefix, "has a folder or name made only of spaces", "remove it or give it a name")
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise _refuse(prefix, f"has a name of {size} bytes; at most {MAX_NAME_BYTES} bytes per folder or "
                          "file name", "shorten it")
    return parts


def resolve_prefix(root: str, prefix: object) -> tuple[str, str]:
    """(folder, file stem) for ``prefix`` below ``root``, checked against every rule above."""
    parts = prefix_parts(prefix)
    root = os.path.abspath(root)
    full = os.path.normpath(os.path.join(root, *parts))
    if os.path.commonpath([root, full]) != root:  # defence in depth: the parts already rule this out
        raise _refuse(prefix, "leaves the loras folder", _FIX)
    length, limit = len(os.fsencode(full)) + _SUFFIX_BYTES, path_limit(root)
    if length > limit:
        raise _refuse(prefix, f"makes a path of {length} bytes below {root}; the OS allows {limit}",
                      "use fewer or shorter subfolders")
    return os.path.dirname(full), os.path.basename(full)


def folder_error(folder: str, exc: OSError) -> LoraError:
    """An OS failure while saving, as the pack's error naming the folder and what to do."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", -1):
        return LoraError("the disk holding the loras folder is full", file=folder,
                         fix="free some space (or save as fp16/bf16, or a smaller size=) and run again")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LoraError("the loras folder is read-only (cannot write there)", file=folder,
                         fix="make the folder writable, or pick a filename_prefix in a writable subfolder")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return LoraError("a file is in the way of the save folder", file=folder,
                         fix="rename that file or pick another filename_prefix")
    if code == errno.ENAMETOOLONG:
        return LoraError("the file name is too long for this file system", file=folder,
                         fix="use a shorter filename_prefix")
    if code == errno.ELOOP:
        return LoraError("the save folder goes through a symlink loop", file=folder,
                         fix="fix or remove that symlink in the loras folder")
    return LoraError(f"could not write there: {exc.strerror or exc}", file=folder,
                     fix="check the folder's permissions and free space, then run again")

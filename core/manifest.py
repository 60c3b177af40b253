"""The batch manifest: JSON Lines, one record per input and recipe, appended as each file finishes.

A rerun resumes from it: an input and recipe whose latest record says ``done`` is skipped when the
input still has the recorded sha256, the run the same settings, and the output file the recorded
size and sha256 (a deleted or changed output is made again). Each record is one ``os.write`` of a
whole line on an O_APPEND descriptor, then fsync: a kill (even SIGKILL) leaves at most one cut line,
which a later load ignores (with a warning) and the next append starts on a fresh line after.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Optional

from .errors import LoraError
from .metadata import file_sha256

log = logging.getLogger("lora_resize")
MANIFEST_NAME = "lora-resize-batch.jsonl"
STATUSES = ("done", "skipped", "failed")

Record = dict[str, Any]
Key = tuple[str, str]  # (absolute input path, recipe text)


def record_key(record: Record) -> Key:
    return record["input"], record["recipe"]


class Manifest:
    """Append-only records on disk, and the latest record per (input, recipe) in memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.latest: dict[Key, Record] = {}
        self.ignored = 0  # lines that were not records (a line cut by a kill)
        for record in self._read():
            self.latest[record_key(record)] = record

    def adopt(self, others: Iterable[str], inputs: set[str]) -> int:
        """The records of these inputs from other manifests (other shards' of the same output folder), where
        this one has none: a run split another way resumes from them. Read only; returns how many."""
        adopted = 0
        for other in others:
            for record in self._read(other):
                key = record_key(record)
                if record["input"] in inputs and key not in self.latest:
                    self.latest[key] = record
                    adopted += 1
        return adopted

    def _read(self, path: Optional[str] = None) -> Iterable[Record]:
        path = path or self.path
        try:
            with open(path, "rb") as fh:
                lines = fh.read().split(b"\n")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise LoraError(f"the manifest cannot be read ({exc.strerror or exc})", file=path,
                            fix="make it readable, or give another --manifest") from None
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not (isinstance(record, dict) and isinstance(record.get("input"), str)
                        and isinstance(record.get("recipe"), str) and record.get("status") in STATUSES):
                    raise ValueError("not a batch record")
            except (ValueError, RecursionError):
                self.ignored += 1
                log.warning("%s: line %d is not a batch record (a run killed while writing it?): ignored",
                            path, number)
                continue
            records.append(record)
        return records

    def append(self, record: Record) -> None:
        """Write one record durably (flush + fsync) before the batch goes on."""
        line = json.dumps(record, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o666)
            try:
                if _ends_mid_line(self.path):
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise LoraError(f"cannot append to the manifest ({exc.strerror or exc})", file=self.path,
                            fix="free some space or make its folder writable, or give another --manifest") from exc
        self.latest[record_key(record)] = record


def output_holds(record: Record) -> bool:
    output = record.get("output")
    if not isinstance(output, str):
        return False
    try:
        if os.path.getsize(output) != record.get("bytes"):
            return False
        return file_sha256(output) == record.get("output_sha256")
    except OSError:
        return False


def _ends_mid_line(path: str) -> bool:
    """Whether the file's last byte is not a newline (a record cut by a kill)."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"

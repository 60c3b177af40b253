"""The one error type for a user's mistake: it names the file, the layer and the fix."""
from __future__ import annotations


class LoraError(Exception):
    """Bad input the user can act on. Never raised for a bug in this package.

    The message always reads ``<file>: <layer>: <problem>. <fix>`` with the parts that are known,
    so a ComfyUI execution_error or a CLI line tells the user what to do.
    """

    def __init__(self, problem: str, *, file: str | None = None, layer: str | None = None,
                 fix: str | None = None):
        self.problem = problem
        self.file = file
        self.layer = layer
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [p for p in (self.file, f"layer {self.layer}" if self.layer else None) if p]
        text = ": ".join(parts + [self.problem])
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    def with_file(self, file: str) -> "LoraError":
        """Return the same error naming ``file`` (for errors raised before the file was known)."""
        if self.file:
            return self
        return LoraError(self.problem, file=file, layer=self.layer, fix=self.fix)


class UnsupportedFormat(LoraError):
    """A recognised but unsupported adapter family (IA3, OFT, ...)."""


class UsageError(LoraError):
    """Something wrong with the command line itself (a recipe, a device, a weight, a flag): the CLI exits 2."""

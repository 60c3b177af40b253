"""What a LoRA key prefix changes: a canonical weight name, and for a layer of a fused weight its row slice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

Part = Optional[tuple[int, int]]
Parts = list[tuple[str, tuple[int, int]]]  # (key prefix, (start, length) in units of the part's own height)


@dataclass(frozen=True)
class Target:
    """A canonical weight name and, for a layer of a fused weight, its row slice in height units."""

    name: str
    part: Part = None
    swap_halves: bool = False  # the file's output rows are the canonical ones with their halves swapped
    swap_if_rows: Optional[int] = None  # swap only when out rows == this x in columns (SD3's last context block)
    # a slice whose first row is a x in columns + b x its own rows (grouped-query k/v after a q as wide as the model)
    rows_after: Optional[tuple[int, int]] = None

    def offset(self, shape: tuple[int, ...]) -> Optional[tuple[int, int, int]]:
        """ComfyUI's (dim, start, length) of a slice target for a layer of ``shape``; None for a whole weight."""
        if self.rows_after is None:
            return None
        columns = 1
        for size in shape[1:]:
            columns *= size
        return (0, self.rows_after[0] * columns + self.rows_after[1] * shape[0], shape[0])

    def swaps(self, shape: tuple[int, ...]) -> bool:
        """Whether a layer of this ``shape`` read under this target has its output halves swapped."""
        columns = 1
        for size in shape[1:]:
            columns *= size
        return self.swap_halves or (self.swap_if_rows is not None and shape[0] == self.swap_if_rows * columns)

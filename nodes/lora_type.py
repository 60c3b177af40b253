"""What flows between the pack's nodes: a LoRA plus its decomposition, computed once and lazily."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.decompose import Decomposed, decompose
from ..core.model import LoraFile

LORA_TYPE = "RESIZABLE_LORA"  # our own socket type: it cannot be wired into other packs' LORA inputs
RECIPE_TYPE = "RESIZE_RECIPE"
CATEGORY = "loaders/lora resize"


class ResizableLora:
    """A LoRA in the pack's model; several ResizeLoRA nodes on one input share its decomposition."""

    def __init__(self, lora: LoraFile, sources: list[dict], label: str, operation: str = "resize"):
        self.lora = lora
        self.sources = sources
        self.label = label
        self.operation = operation
        self._decomposed: dict[tuple, list[Decomposed]] = {}

    def decomposition(self, device: Optional[torch.device] = None,
                      progress: Optional[Callable[[int, int], None]] = None, *, dense_rank: Optional[int] = None,
                      niter: int = 2) -> list[Decomposed]:
        """Exact by default; ``dense_rank`` asks for a randomized SVD (``niter`` power iterations) of dense
        layers, as ``method=rsvd`` does. Kept per (dense_rank, niter): each variant is computed once."""
        key = (dense_rank, niter if dense_rank is not None else None)
        if key not in self._decomposed:
            self._decomposed[key] = decompose(self.lora, device=device, dense_rank=dense_rank, niter=niter,
                                              progress=progress)
        return self._decomposed[key]

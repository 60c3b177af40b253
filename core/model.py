"""The in-memory model of a LoRA file, independent of the naming convention it was stored in.

Every reader produces a :class:`LoraFile` of :class:`Layer` objects and every writer consumes one.
A layer's ``name`` is canonical: the ComfyUI model key of the weight it changes, without ``.weight``
(``diffusion_model.input_blocks.4.1.proj_in``, ``clip_l.transformer.text_model.encoder.layers.0.mlp.fc1``),
so the same layer read from kohya, PEFT or ComfyUI files gets the same name, and the name indexes
ComfyUI's MODEL/CLIP state dicts and (through ``core.base``) base checkpoints directly.

Names are open: a LoRA-shaped group whose prefix no naming table knows is still a layer, named by its
key prefix verbatim (``Layer.verbatim``), and entries that are not low-rank (norm diffs, lone bias
diffs, ``set_weight``) ride along byte-exact in ``LoraFile.passthrough``: the tables add knowledge,
they never gate reading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

# The roles a stored tensor plays, per family. Readers translate their suffixes to these roles.
ROLES_BY_KIND: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required roles, optional roles)
    "lora": (("up", "down"), ("mid",)),
    "loha": (("w1a", "w1b", "w2a", "w2b"), ("t1", "t2")),
    "lokr": ((), ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")),
    "full": (("diff",), ()),
}


@dataclass
class Layer:
    """One adapted weight: its factors as stored, the scale, and the weight shape it changes.

    ``offset`` is ComfyUI's ``(dim, start, length)``: the layer changes only that slice of the target
    weight (diffusers Flux ``to_q`` inside the fused ``qkv``). ``shape`` is the shape of that slice.
    ``alpha`` follows ComfyUI's rule: scale = alpha / rank, and no alpha means scale 1.
    """

    name: str
    kind: str
    factors: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    alpha: Optional[float] = None
    offset: Optional[tuple[int, int, int]] = None
    dora_scale: Optional[torch.Tensor] = None
    bias_diff: Optional[torch.Tensor] = None
    source_key: str = ""
    verbatim: bool = False  # no naming table knows source_key: ``name`` is that prefix, as read
    suffixes: Optional[dict[str, str]] = None  # role -> the key suffix it was read under (``-f keep``)

    @property
    def rank(self) -> int:
        """The rank the alpha divides by (ComfyUI's rule); 0 for dense kinds."""
        f = self.factors
        if self.kind == "lora":
            return int(f["down"].shape[0])
        if self.kind == "loha":
            return int(f["w1b"].shape[0])
        if self.kind == "lokr":
            if "w2b" in f:
                return int(f["w2b"].shape[0])
            if "w1b" in f:
                return int(f["w1b"].shape[0])
            return 0
        return 0

    @property
    def scale(self) -> float:
        """Multiplier of the factor product. LoKr with both halves full ignores alpha (scale 1)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return len(self.shape) > 2

    @property
    def tucker(self) -> bool:
        return "mid" in self.factors or "t1" in self.factors or "t2" in self.factors

    @property
    def kind_label(self) -> str:
        """Human label: lora / locon, with +tucker and +dora when present."""
        label = "locon" if self.kind == "lora" and self.is_conv else self.kind
        if self.tucker:
            label += "+tucker"
        if self.dora_scale is not None:
            label += "+dora"
        return label

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_features(self) -> int:
        """Columns of ΔW flattened to a matrix: in_channels × kernel size for convs."""
        return int(math.prod(self.shape[1:]))

    def nbytes(self) -> int:
        tensors = list(self.factors.values())
        tensors += [t for t in (self.dora_scale, self.bias_diff) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self.factors.values()}

    def with_factors(self, factors: dict[str, torch.Tensor], **changes) -> "Layer":
        return replace(self, factors=factors, **changes)


@dataclass
class LoraFile:
    """A whole LoRA: layers keyed by canonical name, plus what was around them in the file."""

    layers: dict[str, Layer]
    architecture: str = "unknown"  # "sd15" | "sdxl" | "flux" | "unknown"
    family: str = "unknown"  # the convention it was read from: "kohya" | "peft" | "comfy" | ...
    metadata: dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None
    unknown_keys: list[str] = field(default_factory=list)
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> tensor, written back unchanged

    def patched_targets(self) -> int:
        """How many model tensors ComfyUI patches with this file: one per layer, one per bias diff, one per
        applied pass-through entry (``.diff``, ``.diff_b``, ``.set_weight``; ComfyUI ignores ``.diff_m``)."""
        applied = sum(1 for key in self.passthrough if key.endswith((".diff", ".diff_b", ".set_weight")))
        return sum(1 + (layer.bias_diff is not None) for layer in self.layers.values()) + applied

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        extras = sum(t.numel() * t.element_size() for t in self.passthrough.values())
        return sum(layer.nbytes() for layer in self.layers.values()) + extras

    @property
    def label(self) -> str:
        """How errors and reports name this LoRA."""
        return self.path or "<in-memory LoRA>"

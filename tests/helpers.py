"""Small synthetic layers and LoRAs for engine tests (no files, no naming conventions needed)."""
from __future__ import annotations

import torch

from core.model import Layer, LoraFile


def lora_layer(name: str, out: int, inp: int, rank: int, *, alpha: float | None = None, seed: int = 0,
               decay: float = 0.7, conv: tuple[int, int] | None = None, dtype=torch.float32) -> Layer:
    """A LoRA layer whose ΔW has a geometrically decaying spectrum (like trained LoRAs)."""
    g = torch.Generator().manual_seed(seed)
    kernel = conv or ()
    up = torch.randn(out, rank, generator=g) * torch.tensor([decay ** i for i in range(rank)])
    down = torch.randn(rank, inp * (conv[0] * conv[1] if conv else 1), generator=g) / inp ** 0.5
    if conv:
        up = up.reshape(out, rank, 1, 1)
        down = down.reshape(rank, inp, *conv)
    return Layer(name=name, kind="lora", factors={"up": up.to(dtype), "down": down.to(dtype)},
                 shape=(out, inp, *kernel), alpha=alpha, source_key=name)


def synthetic_lora(count: int = 6, rank: int = 16, seed: int = 0, arch: str = "sdxl") -> LoraFile:
    shapes = [(64, 64), (64, 96), (128, 64), (64, 64), (96, 32), (32, 32)]
    layers = {}
    for i in range(count):
        out, inp = shapes[i % len(shapes)]
        name = f"diffusion_model.input_blocks.{i}.1.proj_in"
        layers[name] = lora_layer(name, out, inp, rank, alpha=rank / 2, seed=seed + i)
    return LoraFile(layers, architecture=arch, family="kohya")


def dense_delta(layer: Layer) -> torch.Tensor:
    from core.delta import delta_weight

    return delta_weight(layer).flatten(1).double()


def skip_or_fail(reason: str) -> None:
    """Skip a test whose prerequisite (host, browser, seed tool) is missing, unless CI requires it:
    under ``.ci/run`` with CI=true a missing prerequisite is a failure, never a silent skip."""
    import os

    import pytest

    if os.environ.get("LORA_RESIZE_REQUIRE_HOST") == "1":
        pytest.fail(f"required by CI but missing: {reason}")
    pytest.skip(reason)

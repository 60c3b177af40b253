"""Write the small demo base checkpoint the README's main command uses (SD1.5 single-file layout).

    python tools/make_demo_base.py tests/fixtures/base/sd15_tiny_base.safetensors

It holds, at the shapes of the tiny SD1.5 fixtures, every weight `sd15_kohya_locon_r4a2_c2a1`
changes, seeded and with a few dominant directions like trained weights: enough for base-aware
recipes (`fro_ckpt`, `spn_ckpt`, `subspace`) to run on data shipped in the repo.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core.formats import read_lora  # noqa: E402

LORA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "lora",
                    "sd15_kohya_locon_r4a2_c2a1.safetensors")


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in read_lora(LORA):
        n, m = layer.shape[0], layer.in_features
        weight = torch.randn(n, m, generator=g) * 0.02
        spectrum = torch.tensor([1.0, 0.5, 0.25, 0.12])
        weight += (torch.randn(n, 4, generator=g) * spectrum) @ torch.randn(4, m, generator=g) / m ** 0.5
        key = ("model." + layer.name if layer.name.startswith("diffusion_model.")
               else "cond_stage_model." + layer.name[len("clip_l."):])
        tensors[key + ".weight"] = weight.reshape(layer.shape).half()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata={"demo": "synthetic SD1.5-layout base for the README"})


if __name__ == "__main__":
    main(sys.argv[1])

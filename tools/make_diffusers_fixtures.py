"""Write fixtures with diffusers' and PEFT's own saving code (not run by CI; outputs are committed).

    # diffusers 0.32.1 + peft 0.17.1 (+ transformers 4.54.1, accelerate) on torch, no downloads
    python tools/make_diffusers_fixtures.py flux_norm_out tests/fixtures/lora

flux_norm_out: a tiny FluxTransformer2DModel built from config (hidden 64, one double and one
single block) gets a PEFT LoRA on attention, the single blocks' proj_out and ``norm_out.linear``
(whose rows diffusers orders (scale, shift) against BFL's (shift, scale)); the B factors are
randomised (PEFT starts them at zero) and the file is written by FluxPipeline.save_lora_weights.
The ΔW PEFT's own layers add (``get_delta_weight``, per adapted module, diffusers names) is saved
as ``../lora_expected/<name>.safetensors``.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
from safetensors.torch import save_file


def flux_norm_out(out_dir: str) -> str:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[8, 12, 12])
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=True,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out", "norm_out.linear"])
    model.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    lora_state = get_peft_model_state_dict(model)
    name = "flux_peft_norm_out_r4"
    with tempfile.TemporaryDirectory() as tmp:
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=lora_state, safe_serialization=True)
        data = open(os.path.join(tmp, "pytorch_lora_weights.safetensors"), "rb").read()
    with open(os.path.join(out_dir, f"{name}.safetensors"), "wb") as fh:
        fh.write(data)
    # the ΔW PEFT's own layers add to every adapted module (B·A·scaling), under diffusers names
    merged = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            merged[module_name] = module.get_delta_weight("default").detach().contiguous()
    expected_dir = os.path.join(os.path.dirname(out_dir.rstrip("/")), "lora_expected")
    os.makedirs(expected_dir, exist_ok=True)
    save_file(merged, os.path.join(expected_dir, f"{name}.safetensors"))
    return name


PRODUCERS = {"flux_norm_out": flux_norm_out}

if __name__ == "__main__":
    which, out = sys.argv[1], sys.argv[2]
    print(PRODUCERS[which](out))

"""Write fixtures with diffusers' and PEFT's own saving code (not run by CI; outputs are committed).

    # diffusers 0.32.1 + peft 0.17.1 (+ transformers 4.54.1, accelerate) on torch, no downloads
    python tools/make_diffusers_fixtures.py flux_norm_out tests/fixtures/lora
    # diffusers 0.14.0 + huggingface_hub 0.20.3 on torch 2.13.0 (a venv of their own)
    python tools/make_diffusers_fixtures.py sd15_attn_procs tests/fixtures/lora

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


def sd15_attn_procs(out_dir: str) -> str:
    """diffusers 0.14's LoRA attention processors (``to_q_lora.up/down``), as its
    train_dreambooth_lora.py made them, on a tiny SD1.5-layout UNet (4 levels, 2 res blocks)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.cross_attention import LoRACrossAttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    channels = unet.config.block_out_channels
    processors = {}
    for name in unet.attn_processors:  # the loop of diffusers' train_dreambooth_lora.py
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        processors[name] = LoRACrossAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, rank=4)
    unet.set_attn_processor(processors)
    g = torch.Generator().manual_seed(1)
    expected = {}
    with torch.no_grad():
        for name, processor in unet.attn_processors.items():
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                layer = getattr(processor, f"{proj}_lora")
                layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * 0.05)
                module = name[: -len("processor")] + (proj if proj != "to_out" else "to_out.0")
                expected[module] = (layer.up.weight @ layer.down.weight).contiguous()  # scale 1 (the default)
    fixture = "sd15_diffusers_attnprocs_r4"
    with tempfile.TemporaryDirectory() as tmp:
        # 0.14 pickles by default; its save_function hook writes the same state dict as safetensors
        unet.save_attn_procs(tmp, weights_name="lora.safetensors",
                             save_function=lambda weights, path: save_file(weights, path))
        data = open(os.path.join(tmp, "lora.safetensors"), "rb").read()
    with open(os.path.join(out_dir, f"{fixture}.safetensors"), "wb") as fh:
        fh.write(data)
    expected_dir = os.path.join(os.path.dirname(out_dir.rstrip("/")), "lora_expected")
    save_file(expected, os.path.join(expected_dir, f"{fixture}.safetensors"))
    return fixture


PRODUCERS = {"flux_norm_out": flux_norm_out, "sd15_attn_procs": sd15_attn_procs}

if __name__ == "__main__":
    which, out = sys.argv[1], sys.argv[2]
    print(PRODUCERS[which](out))

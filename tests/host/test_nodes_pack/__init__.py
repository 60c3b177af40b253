"""Test-only ComfyUI nodes, loaded by the server tests beside the pack (never shipped with it).

A checkpoint small enough for CI cannot go through CheckpointLoaderSimple (ComfyUI recognises SDXL
by its real layer widths), so the server tests swap the example workflows' loaders for these:
the same tiny, seeded, structurally real SDXL the in-process tests build (tests/host/comfy_models.py),
and a conditioning of the shapes that model takes (its CLIP has no tokenizer).
"""
import importlib.util
import os
import sys

import torch

# by file: ComfyUI's own `tests` package shadows ours on the server's import path
_SPEC = importlib.util.spec_from_file_location(
    "lora_resize_test_comfy_models",
    os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "comfy_models.py"))
_MODELS = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(_MODELS)
tiny_sdxl = _MODELS.tiny_sdxl


class TinySDXL:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"ckpt_name": ("STRING", {"default": ""})}}

    def load(self, ckpt_name=""):
        host = tiny_sdxl()
        return host.model, host.clip, None


class TinyConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True})}}

    def encode(self, clip, text):
        g = torch.Generator().manual_seed(len(text))
        cond = torch.randn(1, 77, 64, generator=g)  # the tiny UNet's context_dim
        pooled = torch.randn(1, 1280, generator=g)  # SDXL's adm takes a 1280-wide pooled output
        return ([[cond, {"pooled_output": pooled}]],)


class LatentToImage:
    """VAEDecode's stand-in (the tiny SDXL has no VAE): a fixed, deterministic map of the latent's first three
    channels to RGB, 8x upsampled as a VAE would, so images differ exactly where the samples do."""
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}, "optional": {"vae": ("VAE",)}}

    def decode(self, samples, vae=None):
        latent = samples["samples"].float()[:, :3]
        image = torch.sigmoid(latent).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return (image.permute(0, 2, 3, 1).contiguous(),)


NODE_CLASS_MAPPINGS = {"LoraResizeTest_TinySDXL": TinySDXL, "LoraResizeTest_TinyConditioning": TinyConditioning,
                       "LoraResizeTest_LatentToImage": LatentToImage}

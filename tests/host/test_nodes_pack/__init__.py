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


NODE_CLASS_MAPPINGS = {"LoraResizeTest_TinySDXL": TinySDXL, "LoraResizeTest_TinyConditioning": TinyConditioning}

"""Full-size synthetic DiT benchmark data: Flux.1-dev with a kohya r64 LoRA, Wan 2.1 14B with a musubi r128 LoRA.

    python bench/make_dit_data.py OUT_DIR [--family flux wan14b]

Each base holds every LoRA-targeted weight at its real shape in fp8 (e4m3fn), as a bare diffusion-model file
(the layout ComfyUI's UNETLoader takes: ``double_blocks.0.img_attn.qkv.weight``, ``blocks.0.self_attn.q.weight``),
since that is how most users keep these models (Flux.1-dev fp8 11.9 GB, Wan 2.1 14B fp8 14 GB). LoRAs are bf16
with the trainers' real key names: kohya sd-scripts / ai-toolkit ``lora_unet_double_blocks_0_img_attn_qkv`` for
Flux, musubi-tuner ``lora_unet_blocks_0_self_attn_q`` for Wan. Weights and factors are made as bench/make_data.py
makes them (seeded by name, a few dominant directions, decaying LoRA spectra), streamed tensor by tensor.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.make_data import base_weight, lora_factors  # noqa: E402

DTYPES = {"F8_E4M3": (torch.float8_e4m3fn, 1), "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4)}

# Flux.1-dev: hidden 3072, MLP 12288, 19 double and 38 single blocks (BFL names; comfy/ldm/flux/model.py)
FLUX_HIDDEN, FLUX_MLP, FLUX_DOUBLE, FLUX_SINGLE = 3072, 12288, 19, 38
# Wan 2.1 14B: dim 5120, FFN 13824, 40 blocks (comfy/ldm/wan/model.py; musubi-tuner's LoRA targets attn + ffn)
WAN_DIM, WAN_FFN, WAN_BLOCKS = 5120, 13824, 40


def flux_layers() -> dict[str, tuple[int, int]]:
    h, mlp = FLUX_HIDDEN, FLUX_MLP
    layers = {}
    for i in range(FLUX_DOUBLE):
        for stream in ("img", "txt"):
            root = f"double_blocks.{i}.{stream}_"
            layers[root + "attn.qkv"] = (3 * h, h)
            layers[root + "attn.proj"] = (h, h)
            layers[root + "mlp.0"] = (mlp, h)
            layers[root + "mlp.2"] = (h, mlp)
            layers[root + "mod.lin"] = (6 * h, h)
    for i in range(FLUX_SINGLE):
        layers[f"single_blocks.{i}.linear1"] = (3 * h + mlp, h)
        layers[f"single_blocks.{i}.linear2"] = (h, h + mlp)
        layers[f"single_blocks.{i}.modulation.lin"] = (3 * h, h)
    return layers


def wan_layers() -> dict[str, tuple[int, int]]:
    d, ffn = WAN_DIM, WAN_FFN
    layers = {}
    for i in range(WAN_BLOCKS):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                layers[f"blocks.{i}.{attn}.{proj}"] = (d, d)
        layers[f"blocks.{i}.ffn.0"] = (ffn, d)
        layers[f"blocks.{i}.ffn.2"] = (d, ffn)
    return layers


FAMILIES = {
    "flux": {"layers": flux_layers, "rank": 64, "base": "flux1_dev_synthetic_fp8.safetensors",
             "lora": "flux_lora_r64.safetensors",
             "metadata": {"ss_network_dim": "64", "ss_network_alpha": "32", "ss_network_module": "networks.lora_flux",
                          "ss_base_model_version": "flux1"}},
    "wan14b": {"layers": wan_layers, "rank": 128, "base": "wan21_14b_synthetic_fp8.safetensors",
               "lora": "wan21_14b_lora_r128.safetensors",
               "metadata": {"ss_network_dim": "128", "ss_network_alpha": "64",
                            "ss_network_module": "networks.lora_wan", "ss_base_model_version": "wan2.1_t2v_14B"}},
}


class StreamWriter:
    """A safetensors file written tensor by tensor, in header order (never all in memory)."""

    def __init__(self, path: str, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        import json
        import math

        self.order = sorted(specs)
        header: dict = {"__metadata__": metadata}
        offset = 0
        for key in self.order:
            dtype, shape = specs[key]
            nbytes = math.prod(shape) * DTYPES[dtype][1]
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.specs = specs
        self.path = path
        self.fh = open(path + ".tmp", "wb")
        self.fh.write(len(text).to_bytes(8, "little") + text)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[key]
        tensor = tensor.to(DTYPES[dtype][0]).contiguous()
        assert tuple(tensor.shape) == tuple(shape), (key, tensor.shape, shape)
        self.fh.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.fh.close()
        os.replace(self.path + ".tmp", self.path)


def write_base(path: str, layers: dict[str, tuple[int, int]]) -> None:
    specs = {f"{name}.weight": ("F8_E4M3", shape) for name, shape in layers.items()}
    writer = StreamWriter(path, specs, {"bench": "synthetic fp8 diffusion model"})
    for key in writer.order:
        writer.write(key, base_weight(key, specs[key][1]).float())
    writer.close()


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def write_lora(path: str, layers: dict[str, tuple[int, int]], rank: int, metadata: dict[str, str]) -> None:
    specs = {}
    for name, shape in layers.items():
        prefix = kohya_name(name)
        specs[prefix + ".lora_up.weight"] = ("BF16", (shape[0], rank))
        specs[prefix + ".lora_down.weight"] = ("BF16", (rank, shape[1]))
        specs[prefix + ".alpha"] = ("F32", ())
    writer = StreamWriter(path, specs, metadata)
    by_prefix = {kohya_name(name): shape for name, shape in layers.items()}
    made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in writer.order:
        prefix, _, suffix = key.partition(".")
        if suffix == "alpha":
            writer.write(key, torch.tensor(rank / 2))
            continue
        if prefix not in made:
            made.clear()
            made[prefix] = lora_factors(prefix, by_prefix[prefix], rank)
        writer.write(key, made[prefix][0] if suffix.startswith("lora_up") else made[prefix][1])
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--lora-only", action="store_true", help="write the LoRAs, not the bases")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for family in args.family:
        spec = FAMILIES[family]
        layers = spec["layers"]()
        base = os.path.join(args.out_dir, spec["base"])
        if not args.lora_only and not os.path.exists(base):
            start = time.time()
            write_base(base, layers)
            print(f"{base}: {os.path.getsize(base) / 1e9:.2f} GB in {time.time() - start:.0f} s", flush=True)
        lora = os.path.join(args.out_dir, spec["lora"])
        if not os.path.exists(lora):
            start = time.time()
            write_lora(lora, layers, spec["rank"], spec["metadata"])
            print(f"{lora}: {os.path.getsize(lora) / 2**20:.0f} MiB in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Deterministic full-scale SDXL benchmark data: a base checkpoint and kohya LoRAs at rank 64 / 128.

    python bench/make_data.py OUT_DIR [--layout PATH] [--ranks 64 128] [--variants N]

The base holds every LoRA-targeted SDXL weight at its real shape, fp16, in the SGM single-file
layout (UNet ``model.diffusion_model.*``, CLIP-L ``conditioner.embedders.0``, OpenCLIP bigG
``conditioner.embedders.1`` with fused ``in_proj_weight``): about 5.8 GB. The UNet layer list and
shapes come from a real sd-scripts SDXL LoRA (``--layout``, default the shared rank-1 fixture);
text encoders are generated at their real sizes. Weights are 0.02·N(0,1) plus a rank-16 part with
decaying singular values (trained weights have a few dominant directions); LoRA factors decay like
trained ones. Every tensor is seeded by its name, and files are streamed tensor by tensor.
``--variants N`` also writes ``sdxl_lora_r<rank>_v1 ... _v<N-1>``: the same layers and statistics
under other seeds (variant 0 is the plain file), for batches of distinct full-size LoRAs; the base
is written only when it is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core.naming.kohya import dotted  # noqa: E402
from core.safetensors_io import read_header  # noqa: E402

DEFAULT_LAYOUT = os.path.join(ROOT, "..", "shared", "fixtures", "lora", "sdxl_kohya_r1a1_fp16.safetensors")
CLIP_L = (12, 768, 3072)
CLIP_G = (32, 1280, 5120)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % (2**63)


def unet_layers(layout: str) -> dict[str, tuple[int, ...]]:
    """kohya UNet layer name -> weight shape, read off a real SDXL LoRA's factor shapes."""
    header, _ = read_header(layout)
    layers = {}
    for key, info in header.items():
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            prefix = key[: -len(".lora_down.weight")]
            down = info["shape"]
            up = header[prefix + ".lora_up.weight"]["shape"]
            layers[prefix] = (up[0], *down[1:])
    return layers


def text_layers() -> dict[str, tuple[int, ...]]:
    layers = {}
    for te, (count, hidden, mlp) in (("lora_te1_", CLIP_L), ("lora_te2_", CLIP_G)):
        for i in range(count):
            root = f"{te}text_model_encoder_layers_{i}_"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                layers[root + "self_attn_" + proj] = (hidden, hidden)
            layers[root + "mlp_fc1"] = (mlp, hidden)
            layers[root + "mlp_fc2"] = (hidden, mlp)
    return layers


def base_weight(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(name))
    n, m = shape[0], math.prod(shape[1:])
    k = 16
    w = torch.randn(n, m, generator=g).mul_(0.02)
    u = torch.randn(n, k, generator=g) / math.sqrt(n)
    v = torch.randn(k, m, generator=g) / math.sqrt(m)
    w.addmm_(u * torch.tensor([2.0 * 0.7 ** i for i in range(k)]), v)
    return w.reshape(shape).half()


def lora_factors(name: str, shape: tuple[int, ...], rank: int, variant: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(_seed(name + f"|lora{rank}" + (f"|v{variant}" if variant else "")))
    n, m = shape[0], math.prod(shape[1:])
    rank = min(rank, n, m)
    decay = torch.tensor([0.93 ** i for i in range(rank)])
    up = torch.randn(n, rank, generator=g) * decay * 0.01
    down = torch.randn(rank, m, generator=g) / math.sqrt(m)
    up = up.reshape(n, rank, *([1, 1] if len(shape) == 4 else [])).half()
    return up, down.reshape(rank, *shape[1:]).half()


class StreamWriter:
    """Writes a safetensors file whose tensors are produced one at a time (never all in memory)."""

    def __init__(self, path: str, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        sizes = {"F16": 2, "F32": 4}
        self.order = sorted(specs, key=lambda k: (-{"F32": 1, "F16": 0}[specs[k][0]], k))
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key in self.order:
            dtype, shape = specs[key]
            nbytes = math.prod(shape) * sizes[dtype]
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.fh = open(path + ".tmp", "wb")
        self.path = path
        self.fh.write(len(text).to_bytes(8, "little") + text)

    def write(self, tensor: torch.Tensor) -> None:
        self.fh.write(tensor.contiguous().numpy().tobytes())

    def close(self) -> None:
        self.fh.close()
        os.replace(self.path + ".tmp", self.path)


def write_base(path: str, unet: dict, te: dict) -> None:
    entries: dict[str, tuple[str, tuple[int, ...], callable]] = {}
    for prefix, shape in unet.items():
        key = "model.diffusion_model." + dotted(prefix[len("lora_unet_"):]) + ".weight"
        entries[key] = ("F16", shape, (lambda k=key, s=shape: base_weight(k, s)))
    for prefix, shape in te.items():
        path_ = dotted(prefix[len("lora_te1_"):])
        if prefix.startswith("lora_te1_"):
            key = "conditioner.embedders.0.transformer." + path_ + ".weight"
            entries[key] = ("F16", shape, (lambda k=key, s=shape: base_weight(k, s)))
            continue
        layer = int(path_.split(".")[3])
        root = f"conditioner.embedders.1.model.transformer.resblocks.{layer}."
        if path_.endswith(("q_proj", "k_proj")):
            continue
        if path_.endswith("v_proj"):
            key = root + "attn.in_proj_weight"
            fused = (3 * shape[0], shape[1])
            entries[key] = ("F16", fused, (lambda k=key, s=fused: base_weight(k, s)))
        else:
            name = {"out_proj": "attn.out_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}[path_.rsplit(".", 1)[1]]
            key = root + name + ".weight"
            entries[key] = ("F16", shape, (lambda k=key, s=shape: base_weight(k, s)))
    writer = StreamWriter(path, {k: (d, s) for k, (d, s, _) in entries.items()}, {"bench": "sdxl-synthetic"})
    for key in writer.order:
        writer.write(entries[key][2]())
    writer.close()


def lora_name(rank: int, variant: int = 0) -> str:
    """``sdxl_lora_r64.safetensors`` (variant 0), ``sdxl_lora_r64_v3.safetensors`` ..."""
    return f"sdxl_lora_r{rank}" + (f"_v{variant}" if variant else "") + ".safetensors"


def write_lora(path: str, layers: dict, rank: int, variant: int = 0) -> None:
    specs, makers = {}, {}
    for prefix, shape in layers.items():
        layer_rank = rank // 2 if len(shape) == 4 and shape[2] > 1 else rank
        layer_rank = min(layer_rank, shape[0], math.prod(shape[1:]))
        up_shape = (shape[0], layer_rank, *([1, 1] if len(shape) == 4 else []))
        specs[prefix + ".lora_up.weight"] = ("F16", up_shape)
        specs[prefix + ".lora_down.weight"] = ("F16", (layer_rank, *shape[1:]))
        specs[prefix + ".alpha"] = ("F16", ())
        makers[prefix] = (shape, layer_rank)
    metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2), "ss_network_module": "networks.lora",
                "ss_base_model_version": "sdxl_base_v1-0"}
    writer = StreamWriter(path, specs, metadata)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in writer.order:
        prefix, _, suffix = key.partition(".")
        shape, layer_rank = makers[prefix]
        if suffix == "alpha":
            writer.write(torch.tensor(layer_rank / 2, dtype=torch.float16))
            continue
        if prefix not in cache:
            cache.clear()
            cache[prefix] = lora_factors(prefix, shape, layer_rank, variant)
        writer.write(cache[prefix][0] if suffix.startswith("lora_up") else cache[prefix][1])
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layout", default=DEFAULT_LAYOUT)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", type=int, default=1, help="LoRAs per rank under distinct seeds (default 1)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    unet, te = unet_layers(args.layout), text_layers()
    start = time.time()
    base = os.path.join(args.out_dir, "sdxl_base_synthetic.safetensors")
    if not os.path.exists(base):
        write_base(base, unet, te)
        print(f"{base}: {os.path.getsize(base) / 1e9:.2f} GB in {time.time() - start:.0f} s")
    for rank in args.ranks:
        for variant in range(args.variants):
            path = os.path.join(args.out_dir, lora_name(rank, variant))
            if not os.path.exists(path):
                start = time.time()
                write_lora(path, {**unet, **te}, rank, variant)
                print(f"{path}: {os.path.getsize(path) / 2**20:.0f} MiB in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

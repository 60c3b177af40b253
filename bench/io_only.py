"""The floor a resize cannot beat: the same imports, load a LoRA, save it; optionally read base tensors.

    python bench/io_only.py LORA OUT [--base CHECKPOINT]

With ``--base`` it also reads, once, every base tensor the LoRA's layers change (the floor of a
cold ``fro_ckpt`` run, which must read them).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402,F401
from safetensors.torch import load_file, save_file  # noqa: E402

import core.cli  # noqa: E402,F401  (the same imports as the CLI)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lora")
    parser.add_argument("out")
    parser.add_argument("--base")
    args = parser.parse_args()
    tensors = load_file(args.lora)
    if args.base:
        from core.base import open_base
        from core.formats import read_lora

        base = open_base(args.base)
        lora = read_lora(args.lora)
        for name in {layer.name for layer in lora}:
            base.weight(name)
    save_file(tensors, args.out)


if __name__ == "__main__":
    main()

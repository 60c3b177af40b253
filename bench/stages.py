"""Where one warm resize of the SDXL r64 benchmark LoRA spends its time, stage by stage, in one process.

    python bench/stages.py DATA [--count 3]      # DATA as made by bench/make_data.py --variants 8

Each stage runs alone (no pipelining, unlike the resize command): read (+ its sha256 on the hash thread, and
the wait for it), decomposition, base references (warm norms cache), selection + rebuild, write + read-back.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--recipe", default="fro_ckpt=1,thr=-3.5")
    args = parser.parse_args()
    import torch

    from core.base import open_base
    from core.decompose import decompose
    from core.formats import read_lora, write_lora
    from core.norms_cache import NormCache
    from core.recipe import parse_recipes
    from core.resize import apply_recipe, provenance_extra, reference_table
    from core.safetensors_io import StreamDigest

    (recipe,) = parse_recipes(args.recipe)
    checkpoint = os.path.join(args.data, "sdxl_base_synthetic.safetensors")
    base, cache = open_base(checkpoint), NormCache.for_checkpoint(checkpoint)
    names = ["sdxl_lora_r64.safetensors"] + [f"sdxl_lora_r64_v{i}.safetensors" for i in range(1, args.count)]
    with tempfile.TemporaryDirectory() as out:
        for name in names[: args.count]:
            path = os.path.join(args.data, name)
            marks = [("start", time.perf_counter())]
            digest = StreamDigest()
            lora = read_lora(path, digest=digest)
            marks.append(("read", time.perf_counter()))
            sha = digest.hexdigest()
            marks.append(("hash wait", time.perf_counter()))
            items = decompose(lora)
            marks.append(("decompose", time.perf_counter()))
            refs = reference_table(items, [recipe], base, cache=cache, architecture=lora.architecture, label=path)
            marks.append(("references", time.perf_counter()))
            result = apply_recipe(items, recipe, refs, template=lora, dtype=torch.float16, base=base,
                                  sources=[{"file": name, "sha256": sha, "weight": 1.0}])
            marks.append(("select + rebuild", time.perf_counter()))
            del items, refs
            write_lora(result.lora, os.path.join(out, name), dtype=torch.float16, operation="resize",
                       recipe=recipe.text, sources=[{"file": name, "sha256": sha, "weight": 1.0}],
                       extra_provenance=provenance_extra(result))
            marks.append(("write + read-back", time.perf_counter()))
            os.unlink(os.path.join(out, name))
            steps = ", ".join(f"{label} {t - marks[i][1]:.2f}" for i, (label, t) in enumerate(marks[1:]))
            print(f"{name}: {steps}; total {marks[-1][1] - marks[0][1]:.2f} s", flush=True)


if __name__ == "__main__":
    main()

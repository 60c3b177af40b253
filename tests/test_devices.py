"""The engine on a CUDA device gives what it gives on the CPU: same singular values, same kept ranks,
same base norms, files written from GPU results equal files written from CPU results.

Skipped (with the reason shown) where torch sees no CUDA device; CI has none, the lent GPU machine
runs these (see BENCHMARKS.md)."""
import os
import shutil

import pytest
import torch

from core.base import open_base
from core.cli import main
from core.decompose import decompose
from core.formats import read_lora
from core.norms import frobenius_norm, spectral_norm
from core.recipe import parse_recipe
from core.resize import rebuild_layer, resize
from tests.conftest import FIXTURES
from tests.helpers import dense_delta, synthetic_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU path not exercised")

CUDA = torch.device("cuda")
BASE = os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors")
LOCON = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
DENSE_KINDS = ["sd15_lycoris_loha_tucker_r4a2.safetensors", "sd15_lycoris_lokr_r4a2.safetensors",
               "sd15_lycoris_full_diff.safetensors", "sd15_lycoris_locon_tucker_r4a2.safetensors"]
RECIPES = ["fro_ckpt=1,thr=-2.6", "spn_ckpt=1,params=0.2,size=0.08", "subspace=1,thr=-1.5", "spn_lora,thr=-1",
           "rank=2", "sv_fro=0.9", "rank=3,method=rsvd,niter=4", "rank=2,method=randproj,seed=7",
           "rank=2,method=randproj,sparse=0.5,seed=7"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", [None, *DENSE_KINDS])
def test_decomposition_on_cuda_equals_cpu(name):
    lora = synthetic_lora(count=12, rank=16) if name is None else read_lora(os.path.join(FIXTURES, "lora", name))
    on_cpu = {item.key: item for item in decompose(lora)}
    on_gpu = decompose(lora, device=CUDA)
    assert len(on_gpu) == len(on_cpu) > 0
    for item in on_gpu:
        reference = on_cpu[item.key]
        assert item.S.device.type == "cpu"  # results come back to the host for scoring and writing
        n = min(item.rank, reference.rank)
        significant = reference.S[:n] > reference.S[0] * 1e-4
        assert _rel(item.S[:n][significant], reference.S[:n][significant]) < 1e-4
        rebuilt = rebuild_layer(item, torch.ones(item.rank, dtype=torch.bool))
        assert _rel(dense_delta(rebuilt), dense_delta(item.layer)) < 1e-5


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_kind_on_cuda_keeps_the_same_ranks(recipe, tmp_path):
    base = open_base(BASE)
    lora = read_lora(LOCON)
    recipes = [parse_recipe(recipe)]
    (cpu,) = resize(lora, recipes, base=base)
    (gpu,) = resize(lora, recipes, base=base, device=CUDA)
    cpu_ranks = {k: l.rank for k, l in cpu.lora.layers.items()}
    gpu_ranks = {k: l.rank for k, l in gpu.lora.layers.items()}
    same = sum(cpu_ranks.get(k) == r for k, r in gpu_ranks.items())
    assert set(gpu_ranks) == set(cpu_ranks)
    # scores within fp32 round-off of a threshold may flip one direction; ranks of all others agree
    assert same >= len(cpu_ranks) - 1, f"{len(cpu_ranks) - same} layers differ"
    assert abs(gpu.total_error - cpu.total_error) < 1e-3 + 0.02 * cpu.total_error
    for key, layer in gpu.lora.layers.items():
        assert all(t.device.type == "cpu" for t in layer.factors.values())
        if cpu_ranks[key] == layer.rank and recipe.startswith("rank=2,method=randproj"):
            # seeded projection: the same matrices on either device
            assert _rel(dense_delta(layer), dense_delta(cpu.lora.layers[key])) < 1e-5


def test_base_norms_on_cuda_equal_cpu():
    g = torch.Generator().manual_seed(0)
    for shape in [(320, 768), (1280, 5120), (640, 640)]:
        weight = torch.randn(*shape, generator=g) * 0.02 + torch.outer(torch.randn(shape[0], generator=g),
                                                                         torch.randn(shape[1], generator=g)) * 1e-3
        exact = float(torch.linalg.matrix_norm(weight.double(), ord=2))
        assert abs(spectral_norm(weight.to(CUDA)) - exact) / exact < 1e-3
        assert abs(frobenius_norm(weight.to(CUDA)) - float(weight.double().norm())) / float(weight.norm()) < 1e-5


def test_cli_on_cuda_writes_the_files_the_cpu_writes(tmp_path):
    base = tmp_path / "base.safetensors"
    shutil.copy(BASE, base)
    recipes = "fro_ckpt=1,thr=-2.6:rank=2:spn_ckpt=1,size=0.08"
    assert main([str(base), LOCON, "-o", str(tmp_path / "cpu"), "-r", recipes, "-q"]) == 0
    (tmp_path / ".lora_resize_norms.json").unlink()  # the GPU run computes its own norms
    assert main([str(base), LOCON, "-o", str(tmp_path / "gpu"), "-r", recipes, "-q", "-d", "cuda"]) == 0
    names = sorted(os.listdir(tmp_path / "cpu"))
    assert names == sorted(os.listdir(tmp_path / "gpu")) and len(names) == 3
    for name in names:
        a, b = read_lora(tmp_path / "cpu" / name), read_lora(tmp_path / "gpu" / name)
        assert sum(l.rank for l in a) == sum(l.rank for l in b)
        for key, layer in a.layers.items():
            assert _rel(dense_delta(b.layers[key]), dense_delta(layer)) < 2e-3  # fp16 storage of both

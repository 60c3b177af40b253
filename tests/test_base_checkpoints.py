"""Base checkpoints by canonical name: SGM, SD1.5, OpenCLIP q/k/v order, Flux, diffusers folders."""
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from core.base import StateDictBase, open_base
from core.errors import LoraError
from core.norms import frobenius_norm, reference_norms, spectral_norm


def _sdxl_file(path, d=8):
    g = torch.Generator().manual_seed(0)
    in_proj = torch.cat([torch.full((d, d), 1.0), torch.full((d, d), 2.0), torch.full((d, d), 3.0)])
    tensors = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight":
            torch.randn(16, 16, generator=g),
        "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": torch.randn(16, 8, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.4.0.in_layers.2.bias": torch.randn(16, generator=g),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
            torch.randn(32, 8, generator=g),
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight": in_proj.half(),
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj.weight": torch.randn(d, d, generator=g),
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight": torch.randn(4 * d, d, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3, generator=g),
    }
    save_file(tensors, str(path))
    return tensors


def test_sdxl_single_file_names_and_openclip_qkv_order(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    tensors = _sdxl_file(path)
    base = open_base(str(path))
    root = "clip_g.transformer.text_model.encoder.layers.3."
    assert {root + "self_attn.q_proj", root + "self_attn.k_proj", root + "self_attn.v_proj",
            root + "self_attn.out_proj", root + "mlp.fc1",
            "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
            "diffusion_model.input_blocks.4.0.in_layers.2",
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"} == base.names()
    # q, k, v are rows 0:d, d:2d, 2d:3d of in_proj (the seed tool pairs them as k, q, v)
    assert float(base.weight(root + "self_attn.q_proj").mean()) == 1.0
    assert float(base.weight(root + "self_attn.k_proj").mean()) == 2.0
    assert float(base.weight(root + "self_attn.v_proj").mean()) == 3.0
    assert base.weight(root + "self_attn.q_proj").dtype == torch.float32
    conv = base.weight("diffusion_model.input_blocks.4.0.in_layers.2")
    assert torch.equal(conv, tensors["model.diffusion_model.input_blocks.4.0.in_layers.2.weight"])
    sliced = base.weight("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", (0, 4, 8))
    q_weight = tensors["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"]
    assert torch.equal(sliced, q_weight[4:12])
    assert base.shape("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", (0, 4, 8)) == (8, 16)


def test_reused_buffers_never_leak_into_kept_weights(tmp_path):
    """Reads go through buffers reused from layer to layer (fp32 and fp16 files alike): a weight read
    without ``reuse`` is its own copy; a ``reuse`` read equals it and is overwritten only by the next."""
    path = tmp_path / "sdxl.safetensors"
    tensors = _sdxl_file(path)
    base = open_base(str(path))
    conv_name, q_name = "diffusion_model.input_blocks.4.0.in_layers.2", "diffusion_model.input_blocks.4.1." \
        "transformer_blocks.0.attn1.to_q"
    kept = {name: base.weight(name) for name in sorted(base.names())}
    shared = base.weight(conv_name, reuse=True)
    assert torch.equal(shared, tensors["model.diffusion_model.input_blocks.4.0.in_layers.2.weight"])
    again = base.weight(q_name, reuse=True)  # fp32 file: reuses the same fp32 storage
    assert again.data_ptr() == shared.data_ptr()
    for name in sorted(base.names()):  # fp16 in_proj pieces and fp32 weights interleaved
        assert torch.equal(base.weight(name, reuse=True), kept[name])
    assert torch.equal(kept[conv_name], tensors["model.diffusion_model.input_blocks.4.0.in_layers.2.weight"])
    assert torch.equal(kept[q_name], tensors["model.diffusion_model.input_blocks.4.1.transformer_blocks.0."
                                             "attn1.to_q.weight"])


def test_sd15_and_flux_files(tmp_path):
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
               "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.ones(4, 4, 1, 1)}, str(sd15))
    assert open_base(str(sd15)).names() == {"clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj",
                                             "diffusion_model.input_blocks.1.1.proj_in"}
    flux = tmp_path / "flux.safetensors"
    qkv = torch.arange(12.0).repeat_interleave(4).reshape(12, 4)
    save_file({"double_blocks.0.img_attn.qkv.weight": qkv, "single_blocks.0.linear1.weight": torch.ones(28, 4)},
              str(flux))
    base = open_base(str(flux))
    assert base.names() == {"diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.single_blocks.0.linear1"}
    k_rows = base.weight("diffusion_model.double_blocks.0.img_attn.qkv", (0, 4, 4))
    assert torch.equal(k_rows, qkv[4:8])


def test_diffusers_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "text_encoder").mkdir()
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.ones(4, 4),
               "up_blocks.1.resnets.0.conv1.weight": torch.ones(4, 4, 3, 3)},
              str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.ones(8, 4)},
              str(tmp_path / "text_encoder" / "model.safetensors"))
    base = open_base(str(tmp_path))
    assert base.names() == {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                            "diffusion_model.output_blocks.3.0.in_layers.2",
                            "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"}


def test_flux_diffusers_folder_assembles_fused_qkv(tmp_path):
    (tmp_path / "transformer").mkdir()
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.full((4, 4), 1.0),
               "transformer_blocks.0.attn.to_k.weight": torch.full((4, 4), 2.0),
               "transformer_blocks.0.attn.to_v.weight": torch.full((4, 4), 3.0)},
              str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = open_base(str(tmp_path))
    qkv = base.weight("diffusion_model.double_blocks.0.img_attn.qkv")
    assert qkv.shape == (12, 4)
    assert [float(qkv[i * 4:(i + 1) * 4].mean()) for i in range(3)] == [1.0, 2.0, 3.0]


def test_wrong_inputs(tmp_path):
    lora = os.path.join(os.path.dirname(__file__), "fixtures", "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
    with pytest.raises(LoraError, match="this is a LoRA, not a base checkpoint"):
        open_base(lora)
    with pytest.raises(LoraError, match="not found"):
        open_base(str(tmp_path / "missing.safetensors"))
    pickled = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(LoraError, match="pickle"):
        open_base(str(pickled))


@pytest.mark.parametrize("shape, decay", [((640, 640), 0.9), ((1280, 5120), 0.97), ((320, 2880), 0.99),
                                          ((300, 200), 1.0)])
def test_spectral_norm_matches_full_svd(shape, decay):
    g = torch.Generator().manual_seed(1)
    n, m = shape
    k = min(n, m)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    s = torch.tensor([decay ** i for i in range(k)])
    s[1] = s[0] * 0.999  # near-degenerate top pair
    w = ((u * s) @ v.T + 0.001 * torch.randn(n, m, generator=g)).half()
    exact = float(torch.linalg.matrix_norm(w.float(), ord=2))
    assert abs(spectral_norm(w) - exact) / exact <= 1e-3
    assert abs(frobenius_norm(w) - float(w.float().norm())) <= 1e-6 * float(w.float().norm())


def test_conv_weights_are_flattened_and_state_dict_base():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 16, 3, 3, generator=g)
    assert abs(spectral_norm(w) - float(torch.linalg.matrix_norm(w.flatten(1), 2))) < 1e-3 * spectral_norm(w)
    base = StateDictBase({"x": w}, fingerprint="f")
    assert base.shape("x", (0, 8, 8)) == (8, 16, 3, 3)
    assert torch.equal(base.weight("x", (0, 8, 8)), w[8:16])


def _many_layer_checkpoint(path, count=24):
    g = torch.Generator().manual_seed(5)
    tensors = {f"model.diffusion_model.input_blocks.{i}.1.proj_in.weight":
               (torch.randn(48 + 8 * (i % 3), 40, generator=g) * (1 + i)).half() for i in range(count)}
    save_file(tensors, str(path))
    return tensors


def test_threaded_reference_norms_equal_one_layer_at_a_time(tmp_path, monkeypatch):
    """The worker threads read into their own buffers: every layer gets its own weight's norms,
    and progress still counts up in order on the calling thread."""
    import threading

    import core.norms as norms

    tensors = _many_layer_checkpoint(tmp_path / "many.safetensors")
    base = open_base(str(tmp_path / "many.safetensors"))
    targets = [(k[len("model."):-len(".weight")], None) for k in tensors]
    calls = []
    caller = threading.get_ident()
    monkeypatch.setattr(norms, "MAX_WORKERS", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    got = reference_norms(base, targets, progress=lambda d, t: calls.append((d, t, threading.get_ident())))
    assert calls == [(d, len(targets), caller) for d in range(1, len(targets) + 1)]
    for (name, _), w in zip(targets, tensors.values()):
        exact = torch.linalg.matrix_norm(w.float(), 2).item()
        assert abs(got[(name, None)]["spectral"] - exact) <= 1e-3 * exact
        assert abs(got[(name, None)]["frobenius"] - w.float().norm().item()) <= 1e-5 * w.float().norm().item()


def test_a_cancel_from_progress_stops_the_queued_layers(tmp_path, monkeypatch):
    import core.norms as norms

    tensors = _many_layer_checkpoint(tmp_path / "many.safetensors", count=40)
    base = open_base(str(tmp_path / "many.safetensors"))
    targets = [(k[len("model."):-len(".weight")], None) for k in tensors]
    measured = []
    real = norms.spectral_norm

    def slow(w, **k):  # 20 ms a layer, so the workers cannot race through all 40 before the cancel
        measured.append(1)
        time.sleep(0.02)
        return real(w, **k)

    monkeypatch.setattr(norms, "spectral_norm", slow)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def cancel(done, total):
        if done == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        reference_norms(base, targets, progress=cancel)
    assert 3 <= len(measured) <= 6  # the running layers finish, the queued ones never start


@pytest.mark.parametrize("size", [32, 600])
def test_spectral_norm_is_the_largest_even_when_the_start_misses_its_direction(size):
    """The residual rule proves a singular value near θ, not the largest: with v₁ orthogonal to the start
    vector (seed 0's, as spectral_norm draws it) Lanczos never sees σ₁ and settles on σ₂ = 0.969·σ₁.
    Small layers are exact; larger ones with a close second Ritz value are rerun from another start."""
    g = torch.Generator().manual_seed(5)
    start = torch.randn(size, generator=torch.Generator().manual_seed(0))
    start = start / start.norm()
    v1 = torch.randn(size, generator=g)
    v1 = v1 - (v1 @ start) * start
    basis = torch.linalg.qr(torch.cat([v1[:, None], torch.randn(size, size - 1, generator=g)], dim=1))[0]
    u = torch.linalg.qr(torch.randn(size, size, generator=g))[0]
    s = torch.tensor([1.0] + [0.969 * 0.995 ** i for i in range(size - 1)])
    w = (u * s) @ basis.T
    assert abs(float(basis[:, 0] @ start)) < 1e-5  # the start holds none of v₁
    assert spectral_norm(w) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 2])
def test_spectral_norm_of_pure_noise_is_not_stopped_short(seed):
    """A Gaussian matrix's top singular values crowd together, so the Ritz value creeps up for many
    steps: rules on how much it still moves stopped 0.24-0.29 % short here; the residual rule may not."""
    w = torch.randn(1280, 1280, generator=torch.Generator().manual_seed(seed))
    exact = float(torch.linalg.matrix_norm(w.double(), ord=2))
    assert abs(spectral_norm(w, seed=seed) - exact) <= 1e-3 * exact


def test_norm_workers_follow_torch_threads_and_stay_at_two_on_a_gpu(monkeypatch):
    from core.norms import MAX_WORKERS, _workers

    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert [_workers(None, 100), _workers("cpu", 100), _workers("cuda", 100), _workers("cpu", 3)] == \
        [MAX_WORKERS, MAX_WORKERS, 2, 3]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # OMP_NUM_THREADS=1: one worker
    assert _workers("cpu", 100) == 1

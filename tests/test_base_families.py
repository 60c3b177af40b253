"""Base checkpoints of the newer families: bare diffusion-model files (as UNETLoader takes them), ComfyUI single
files, and diffusers folders named by their ``_class_name``; and a base-aware resize that really reads them."""
from __future__ import annotations

import glob
import json

import torch
from safetensors.torch import load_file, save_file

from core.base import open_base
from core.cli import main
from core.formats.reader import read_lora


def _wan_weights(scale: float = 1.0, width: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"blocks.{b}.{m}.weight": torch.randn(width, width, generator=g) * scale
            for b in range(2) for m in ("self_attn.q", "self_attn.k", "cross_attn.k_img", "ffn.2")}


def test_bare_wan_file_and_comfyui_single_file(tmp_path):
    bare = tmp_path / "wan_bare.safetensors"
    save_file({**_wan_weights(), "blocks.0.norm3.weight": torch.ones(32)}, str(bare))
    names = open_base(str(bare)).names()
    assert "diffusion_model.blocks.1.cross_attn.k_img" in names and len(names) == 8
    single = tmp_path / "qwen_single.safetensors"
    save_file({"model.diffusion_model.transformer_blocks.0.img_mlp.net.0.proj.weight": torch.ones(16, 4),
               "model.diffusion_model.txt_in.weight": torch.ones(4, 4)}, str(single))
    assert open_base(str(single)).names() == {"diffusion_model.transformer_blocks.0.img_mlp.net.0.proj",
                                               "diffusion_model.txt_in"}


def _transformer_folder(path, class_name, tensors):
    (path / "transformer").mkdir(parents=True)
    if class_name:
        (path / "transformer" / "config.json").write_text(json.dumps({"_class_name": class_name}))
    save_file(tensors, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_diffusers_folders_are_read_by_their_class(tmp_path):
    qkv = {"transformer_blocks.0.attn.to_q.weight": torch.full((4, 4), 1.0),
           "transformer_blocks.0.attn.to_k.weight": torch.full((4, 4), 2.0),
           "transformer_blocks.0.attn.to_v.weight": torch.full((4, 4), 3.0)}
    _transformer_folder(tmp_path / "sd3", "SD3Transformer2DModel", qkv)
    sd3 = open_base(str(tmp_path / "sd3"))
    assert sd3.names() == {"diffusion_model.joint_blocks.0.x_block.attn.qkv"}
    fused = sd3.weight("diffusion_model.joint_blocks.0.x_block.attn.qkv")
    assert [float(fused[i * 4:(i + 1) * 4].mean()) for i in range(3)] == [1.0, 2.0, 3.0]
    # Qwen-Image's diffusers names are ComfyUI's own: the same keys, not Flux's fused double blocks
    _transformer_folder(tmp_path / "qwen", "QwenImageTransformer2DModel", qkv)
    assert open_base(str(tmp_path / "qwen")).names() == {f"diffusion_model.transformer_blocks.0.attn.to_{x}"
                                                          for x in "qkv"}
    _transformer_folder(tmp_path / "unnamed", None, qkv)  # no class name: a transformer folder is Flux, as before
    assert open_base(str(tmp_path / "unnamed")).names() == {"diffusion_model.double_blocks.0.img_attn.qkv"}


def _wan_musubi_lora(path, rank: int = 8) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for b in range(2):
        for module in ("self_attn_q", "self_attn_k", "cross_attn_k_img", "ffn_2"):
            prefix = f"lora_unet_blocks_{b}_{module}"
            decay = torch.tensor([0.5 ** i for i in range(rank)])
            tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, 32, generator=g).to(torch.bfloat16)
            tensors[f"{prefix}.lora_up.weight"] = (torch.randn(32, rank, generator=g) * decay).to(torch.bfloat16)
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))


def _kept_rank(out_dir) -> int:
    (out,) = glob.glob(str(out_dir / "*.safetensors"))
    return sum(layer.rank for layer in read_lora(out))


def test_base_aware_resize_of_a_wan_musubi_lora_reads_the_bare_base(tmp_path):
    """The same LoRA resized against a base 1000x larger keeps less rank by fro_ckpt: the base is really matched."""
    lora = tmp_path / "wan_musubi.safetensors"
    _wan_musubi_lora(lora)
    ranks = []
    for scale in (1.0, 1000.0):
        base = tmp_path / f"wan_base_{scale:g}.safetensors"
        save_file(_wan_weights(scale), str(base))
        out = tmp_path / f"out_{scale:g}"
        assert main(["resize", str(base), str(lora), "-o", str(out), "-r", "fro_ckpt=1,thr=-4"]) == 0
        ranks.append(_kept_rank(out))
        (written,) = glob.glob(str(out / "*.safetensors"))
        assert all(k.startswith("lora_unet_blocks_") for k in load_file(written))
    assert 0 < ranks[1] < ranks[0] <= 8 * 8


def test_lumina_diffusers_folder_assembles_grouped_query_qkv(tmp_path):
    """Lumina 2's diffusers to_q/to_k/to_v (32, 16, 16 rows) stack as ComfyUI's attention.qkv in q, k, v order
    (not the file's alphabetical k, q, v), and a LoRA's k slice reads the k rows."""
    _transformer_folder(tmp_path, "Lumina2Transformer2DModel",
                        {"layers.0.attn.to_k.weight": torch.full((16, 32), 2.0),
                         "layers.0.attn.to_q.weight": torch.full((32, 32), 1.0),
                         "layers.0.attn.to_v.weight": torch.full((16, 32), 3.0)})
    base = open_base(str(tmp_path))
    qkv = base.weight("diffusion_model.layers.0.attention.qkv")
    assert qkv.shape == (64, 32)
    assert [float(qkv[a:b].mean()) for a, b in ((0, 32), (32, 48), (48, 64))] == [1.0, 2.0, 3.0]
    from core import naming

    target = naming.to_canonical("transformer.layers.0.attn.to_k", "lumina2")
    assert float(base.weight(target.name, target.offset((16, 32))).mean()) == 2.0


def test_sdxl_refiner_single_file_reads_its_clip_g(tmp_path):
    """The Refiner's only encoder is OpenCLIP bigG at conditioner.embedders.0 (SDXL base has it at 1): its fused
    in_proj gives CLIP-G's q/k/v, which a Refiner LoRA's lora_te_ layers change."""
    path = tmp_path / "refiner.safetensors"
    in_proj = torch.cat([torch.full((8, 8), float(i + 1)) for i in range(3)])
    save_file({"conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": in_proj,
               "model.diffusion_model.output_blocks.2.1.conv.weight": torch.ones(8, 8, 3, 3)}, str(path))
    base = open_base(str(path))
    root = "clip_g.transformer.text_model.encoder.layers.0.self_attn"
    assert base.names() == {f"{root}.{p}" for p in ("q_proj", "k_proj", "v_proj")} | {
        "diffusion_model.output_blocks.2.1.conv"}
    assert float(base.weight(f"{root}.k_proj").mean()) == 2.0
    from core import naming

    assert naming.to_canonical("lora_te_text_model_encoder_layers_0_self_attn_k_proj", "sdxl_refiner").name == \
        f"{root}.k_proj"

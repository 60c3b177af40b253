"""The naming registry without a host: every family's real trainer key names, round trips and detection.

Key names are the ones each trainer writes (sources in tests/host/family_loras.py); the host tests check the same
tables against ComfyUI's own key maps (tests/host/test_naming_families_host.py, test_family_baseline.py).
"""
from __future__ import annotations

import importlib
import math
import pkgutil

import pytest
import torch

from core import naming
from core.cli import build_parser
from core.delta import delta_weight
from core.errors import LoraError
from core.formats.reader import lora_from_state_dict, read_lora
from core.formats.writer import write_lora
from core.naming import families

# (family, trainer style) -> [(LoRA key prefix, canonical name, part)]
STYLES: dict[tuple[str, str], list[tuple[str, str, tuple[int, int] | None]]] = {
    ("wan", "musubi"): [
        ("lora_unet_blocks_0_self_attn_q", "diffusion_model.blocks.0.self_attn.q", None),
        ("lora_unet_blocks_3_cross_attn_k_img", "diffusion_model.blocks.3.cross_attn.k_img", None),
        ("lora_unet_blocks_3_cross_attn_v_img", "diffusion_model.blocks.3.cross_attn.v_img", None),
        ("lora_unet_blocks_1_ffn_2", "diffusion_model.blocks.1.ffn.2", None)],
    ("wan", "comfy"): [
        ("diffusion_model.blocks.0.cross_attn.o", "diffusion_model.blocks.0.cross_attn.o", None),
        ("diffusion_model.head.head", "diffusion_model.head.head", None),
        ("diffusion_model.vace_blocks.0.after_proj", "diffusion_model.vace_blocks.0.after_proj", None)],
    ("wan", "vace_musubi"): [
        ("lora_unet_vace_blocks_0_self_attn_k", "diffusion_model.vace_blocks.0.self_attn.k", None),
        ("lora_unet_vace_blocks_0_before_proj", "diffusion_model.vace_blocks.0.before_proj", None),
        ("lora_unet_blocks_0_self_attn_k", "diffusion_model.blocks.0.self_attn.k", None)],
    ("wan", "wan_fun"): [("lora_unet__blocks_0_cross_attn_k", "diffusion_model.blocks.0.cross_attn.k", None)],
    ("wan", "diffusers"): [  # ComfyUI 0.3.64 maps none of these; read so that a converted file loads
        ("transformer.blocks.0.attn1.to_q", "diffusion_model.blocks.0.self_attn.q", None),
        ("transformer.blocks.1.attn2.add_k_proj", "diffusion_model.blocks.1.cross_attn.k_img", None),
        ("transformer.blocks.1.attn2.to_out.0", "diffusion_model.blocks.1.cross_attn.o", None),
        ("transformer.blocks.0.ffn.net.0.proj", "diffusion_model.blocks.0.ffn.0", None)],
    ("qwen_image", "musubi"): [
        ("lora_unet_transformer_blocks_0_attn_add_k_proj", "diffusion_model.transformer_blocks.0.attn.add_k_proj",
         None),
        ("lora_unet_transformer_blocks_5_img_mlp_net_0_proj",
         "diffusion_model.transformer_blocks.5.img_mlp.net.0.proj", None),
        ("lora_unet_transformer_blocks_5_attn_to_out_0", "diffusion_model.transformer_blocks.5.attn.to_out.0", None)],
    ("qwen_image", "diffusers"): [
        ("transformer.transformer_blocks.0.attn.to_q", "diffusion_model.transformer_blocks.0.attn.to_q", None),
        ("transformer.transformer_blocks.0.img_mod.1", "diffusion_model.transformer_blocks.0.img_mod.1", None),
        ("transformer.transformer_blocks.0.txt_mlp.net.2", "diffusion_model.transformer_blocks.0.txt_mlp.net.2",
         None)],
    ("qwen_image", "lightning"): [
        ("transformer_blocks.0.attn.to_add_out", "diffusion_model.transformer_blocks.0.attn.to_add_out", None),
        ("transformer_blocks.1.txt_mod.1", "diffusion_model.transformer_blocks.1.txt_mod.1", None)],
    ("sd3", "kohya"): [
        ("lora_unet_joint_blocks_0_x_block_attn_qkv", "diffusion_model.joint_blocks.0.x_block.attn.qkv", None),
        ("lora_unet_joint_blocks_0_x_block_attn2_proj", "diffusion_model.joint_blocks.0.x_block.attn2.proj", None),
        ("lora_unet_joint_blocks_1_context_block_mlp_fc2", "diffusion_model.joint_blocks.1.context_block.mlp.fc2",
         None),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", None),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1",
         None),
        ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0",
         "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0", None)],
    ("sd3", "diffusers"): [
        ("transformer.transformer_blocks.0.attn.to_k", "diffusion_model.joint_blocks.0.x_block.attn.qkv", (1, 1)),
        ("transformer.transformer_blocks.0.attn.add_v_proj", "diffusion_model.joint_blocks.0.context_block.attn.qkv",
         (2, 1)),
        ("transformer.transformer_blocks.0.attn2.to_q", "diffusion_model.joint_blocks.0.x_block.attn2.qkv", (0, 1)),
        ("transformer.transformer_blocks.0.ff_context.net.0.proj",
         "diffusion_model.joint_blocks.0.context_block.mlp.fc1", None),
        ("transformer.transformer_blocks.0.attn.to_out.0", "diffusion_model.joint_blocks.0.x_block.attn.proj", None)],
    ("sd3", "onetrainer"): [
        ("lora_transformer_transformer_blocks_0_attn_add_q_proj",
         "diffusion_model.joint_blocks.0.context_block.attn.qkv", (0, 1)),
        ("lora_transformer_transformer_blocks_0_norm1_context_linear",
         "diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1", None)],
    ("hunyuan_video", "diffusion_pipe"): [
        ("transformer.double_blocks.0.img_mod.linear", "diffusion_model.double_blocks.0.img_mod.lin", None),
        ("transformer.double_blocks.0.txt_attn_qkv", "diffusion_model.double_blocks.0.txt_attn.qkv", None),
        ("transformer.double_blocks.1.img_mlp.fc2", "diffusion_model.double_blocks.1.img_mlp.2", None),
        ("transformer.single_blocks.0.modulation.linear", "diffusion_model.single_blocks.0.modulation.lin", None),
        ("transformer.single_blocks.0.linear1", "diffusion_model.single_blocks.0.linear1", None)],
    ("hunyuan_video", "musubi_converted"): [
        ("diffusion_model.double_blocks.0.img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv", None),
        ("diffusion_model.double_blocks.0.img_attn_proj", "diffusion_model.double_blocks.0.img_attn.proj", None)],
    ("hunyuan_video", "musubi"): [  # ComfyUI 0.3.64 itself leaves the fc1/fc2 names unloaded; we rename them
        ("lora_unet_double_blocks_0_img_mlp_fc1", "diffusion_model.double_blocks.0.img_mlp.0", None),
        ("lora_unet_double_blocks_0_txt_attn_qkv", "diffusion_model.double_blocks.0.txt_attn.qkv", None)],
    ("ltxv", "comfy"): [
        ("diffusion_model.transformer_blocks.0.attn1.to_q", "diffusion_model.transformer_blocks.0.attn1.to_q", None),
        ("diffusion_model.transformer_blocks.0.attn2.to_out.0",
         "diffusion_model.transformer_blocks.0.attn2.to_out.0", None),
        ("diffusion_model.transformer_blocks.1.ff.net.0.proj", "diffusion_model.transformer_blocks.1.ff.net.0.proj",
         None)],
    ("ltxv", "kohya"): [
        ("lora_unet_transformer_blocks_0_attn1_to_out_0", "diffusion_model.transformer_blocks.0.attn1.to_out.0",
         None)],
    ("hidream", "simpletuner"): [
        ("transformer.double_stream_blocks.0.block.ff_i.experts.0.w1",
         "diffusion_model.double_stream_blocks.0.block.ff_i.experts.0.w1", None),
        ("transformer.single_stream_blocks.1.block.attn1.to_out",
         "diffusion_model.single_stream_blocks.1.block.attn1.to_out", None)],
    ("hidream", "lycoris"): [
        ("lycoris_double_stream_blocks_0_block_attn1_to_q_t",
         "diffusion_model.double_stream_blocks.0.block.attn1.to_q_t", None),
        ("lycoris_double_stream_blocks_0_block_ff_i_shared_experts_w3",
         "diffusion_model.double_stream_blocks.0.block.ff_i.shared_experts.w3", None),
        ("lycoris_double_stream_blocks_1_block_ff_t_w2", "diffusion_model.double_stream_blocks.1.block.ff_t.w2",
         None)],
    ("lumina2", "kohya"): [
        ("lora_unet_layers_0_attention_qkv", "diffusion_model.layers.0.attention.qkv", None),
        ("lora_unet_noise_refiner_0_feed_forward_w3", "diffusion_model.noise_refiner.0.feed_forward.w3", None),
        ("lora_unet_context_refiner_0_attention_out", "diffusion_model.context_refiner.0.attention.out", None)],
    ("lumina2", "z_image_diffusers"): [
        ("transformer.layers.0.attention.to_out.0", "diffusion_model.layers.0.attention.out", None),
        ("diffusion_model.noise_refiner.1.feed_forward.w2", "diffusion_model.noise_refiner.1.feed_forward.w2", None)],
    ("lumina2", "comfy"): [
        ("diffusion_model.layers.1.feed_forward.w1", "diffusion_model.layers.1.feed_forward.w1", None)],
    ("chroma", "kohya"): [
        ("lora_unet_distilled_guidance_layer_layers_0_in_layer",
         "diffusion_model.distilled_guidance_layer.layers.0.in_layer", None),
        ("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv", None),
        ("lora_unet_single_blocks_0_linear1", "diffusion_model.single_blocks.0.linear1", None)],
    ("chroma", "kohya_t5"): [  # no distilled_guidance_layer: the T5 under lora_te1_ says Chroma (host: no CLIP-L)
        ("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv", None),
        ("lora_te1_encoder_block_0_layer_0_SelfAttention_q",
         "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", None)],
    ("flux", "kohya_t5"): [  # sd-scripts lora_flux.py: CLIP-L as lora_te1_, T5 as lora_te3_
        ("lora_unet_single_blocks_0_linear1", "diffusion_model.single_blocks.0.linear1", None),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", None),
        ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0",
         "t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0", None)],
    ("sdxl_refiner", "kohya"): [
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
         "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q", None),
        ("lora_unet_up_blocks_2_attentions_1_proj_in", "diffusion_model.output_blocks.7.1.proj_in", None),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model.output_blocks.2.1.conv", None),  # no attention
        ("lora_unet_up_blocks_1_upsamplers_0_conv", "diffusion_model.output_blocks.5.2.conv", None),
        ("lora_unet_down_blocks_3_resnets_1_conv2", "diffusion_model.input_blocks.11.0.out_layers.3", None),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
         "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj", None)],
    ("sdxl", "kohya"): [
        ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
         "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k", None),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc2", "clip_g.transformer.text_model.encoder.layers.0.mlp.fc2",
         None)],
    ("sd15", "kohya"): [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "diffusion_model.input_blocks.1.1.proj_in", None),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
         "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", None)],
    ("flux", "diffusers"): [
        ("transformer.transformer_blocks.0.attn.to_q", "diffusion_model.double_blocks.0.img_attn.qkv", (0, 1)),
        ("transformer.single_transformer_blocks.0.proj_mlp", "diffusion_model.single_blocks.0.linear1", (3, 4))],
}
# Widths a style's layers have in the real model, where detection needs them (names shared between families).
WIDTHS = {("sd3", "diffusers"): 1536, ("sd3", "onetrainer"): 1536, ("flux", "diffusers"): 3072}


def _cases():
    return [pytest.param(family, style, id=f"{family}-{style}") for family, style in STYLES]


def test_registry_is_one_list_and_arch_names_every_family():
    modules = {m.name for m in pkgutil.iter_modules(families.__path__)} - {"base", "_classic", "generic"}
    exported = [importlib.import_module(f"core.naming.families.{m}").FAMILY for m in sorted(modules)]
    assert sorted(f.name for f in exported) == sorted(f.name for f in families.FAMILIES)  # one file, one line
    assert naming.ARCHITECTURES == tuple(f.name for f in families.FAMILIES)
    assert len(set(naming.ARCHITECTURES)) == len(naming.ARCHITECTURES) == 12
    parser, _ = build_parser()
    commands = {"inspect": ["inspect", "a.safetensors"], "convert": ["convert", "a.safetensors", "-o", "b"],
                "resize": ["resize", "-", "a.safetensors", "-o", "out"]}
    for command, argv in commands.items():
        sub = parser._subparsers._group_actions[0].choices[command]
        arch = next(a for a in sub._actions if "--arch" in a.option_strings)
        assert tuple(arch.choices) == naming.ARCHITECTURES
        assert all(name in arch.help for name in naming.ARCHITECTURES)
        for name in naming.ARCHITECTURES:
            assert parser.parse_args([*argv, "--arch", name]).arch == name


@pytest.mark.parametrize("family, style", _cases())
def test_reads_real_trainer_names(family, style):
    for prefix, name, part in STYLES[(family, style)]:
        target = naming.to_canonical(prefix, family)
        assert target is not None, prefix
        assert (target.name, target.part) == (name, part), prefix


@pytest.mark.parametrize("family, style", _cases())
def test_round_trip_through_every_output_the_host_loads(family, style):
    fam = naming.family(family)
    for _, name, part in STYLES[(family, style)]:
        for convention in fam.outputs:
            parts = naming.split_parts(name, family, convention)
            if parts:  # a fused weight this convention names by its row slices
                back = [naming.to_canonical(prefix, family) for prefix, _ in parts]
                assert [(t.name, t.part) for t in back] == [(name, p) for _, p in parts]
                continue
            try:
                prefix = naming.from_canonical(name, family, convention)
            except LoraError as exc:
                assert convention == "peft" and "has no peft name" in str(exc), (name, exc)
                continue
            target = naming.to_canonical(prefix, family)
            assert target is not None and target.name == name, (convention, prefix)


@pytest.mark.parametrize("family, style", _cases())
def test_detection_picks_the_family(family, style):
    prefixes = [prefix for prefix, _, _ in STYLES[(family, style)]]
    width = WIDTHS.get((family, style), 64)
    shapes = {prefix: (width, width) for prefix in prefixes}
    assert naming.detect_architecture(prefixes, {}, shapes) == family


def test_detection_by_metadata_and_width():
    # diffusers double-block names alone: Flux at Flux's width, SD3 otherwise, Qwen-Image when its metadata says so
    names = ["transformer.transformer_blocks.0.attn.add_q_proj", "transformer.transformer_blocks.0.ff_context.net.2"]
    assert naming.detect_architecture(names, {}, {n: (3072, 3072) for n in names}) == "flux"
    assert naming.detect_architecture(names, {}, {n: (1536, 1536) for n in names}) == "sd3"
    assert naming.detect_architecture(names, {"modelspec.architecture": "qwen-image/lora"},
                                      {n: (3072, 3072) for n in names}) == "qwen_image"
    # attention-only diffusers names at Flux's width: a block past Flux's 19 double blocks is Qwen-Image's
    deep = names + ["transformer.transformer_blocks.40.attn.to_add_out"]
    assert naming.detect_architecture(deep, {}, {n: (3072, 3072) for n in deep}) == "qwen_image"
    assert naming.detect_architecture(deep, {}, {n: (2432, 2432) for n in deep}) == "sd3"  # SD3.5 Large: 38 blocks
    # an SDXL base file (two encoders) is never the Refiner, an SD1.5 one (level-0 attention) neither
    assert naming.detect_architecture(["lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                       "lora_unet_up_blocks_2_attentions_0_proj_in"], {}) != "sdxl_refiner"
    assert naming.detect_architecture(["lora_unet_down_blocks_0_attentions_0_proj_in",
                                       "lora_unet_up_blocks_2_attentions_0_proj_in"], {}) == "sd15"


def test_t5_names_under_a_clip_prefix_are_no_clip_weight():
    """T5's encoder.block.N under Flux's CLIP-L prefix was once read as clip_l...text_model.encoder.block.N (a
    weight CLIP has not), and a convert renamed it; it is unknown to Flux (kept verbatim), T5 to Chroma."""
    key = "lora_te1_encoder_block_0_layer_0_SelfAttention_q"
    assert naming.to_canonical(key, "flux") is None
    assert naming.to_canonical(key, "sd3") is None
    assert naming.to_canonical(key, "chroma").name == "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    # PEFT/transformers-5 CLIP names without the text_model wrapper still read
    assert naming.to_canonical("text_encoder.encoder.layers.0.mlp.fc1", "flux").name == \
        "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"
    # Flux's layout without T5 under lora_te1_ stays Flux; LTX-Video's T5 under lora_te1_ does not become Chroma
    flux_only = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    assert naming.detect_architecture(flux_only, {}, {n: (3072, 3072) for n in flux_only}) == "flux"
    ltx = ["diffusion_model.transformer_blocks.0.attn1.to_q", "lora_te1_encoder_block_0_layer_0_SelfAttention_q"]
    assert naming.detect_architecture(ltx, {}, {n: (2048, 2048) for n in ltx}) != "chroma"


def _pair(prefix: str, out: int, inp: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_down.weight": torch.randn(4, inp, generator=g),
            f"{prefix}.lora_up.weight": torch.randn(out, 4, generator=g), f"{prefix}.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("family, prefix", [
    ("wan", "lora_unet_blocks_0_self_attn_q"), ("ltxv", "diffusion_model.transformer_blocks.0.attn1.to_q"),
    ("lumina2", "lora_unet_layers_0_attention_out"),
    ("sdxl_refiner", "lora_unet_down_blocks_1_attentions_0_proj_in")])
def test_peft_refused_where_comfyui_cannot_load_it(tmp_path, family, prefix):
    lora = lora_from_state_dict(_pair(prefix, 8, 8, 0), {}, arch=family)
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraError) as info:
        write_lora(lora, out, convention="peft")
    assert naming.family(family).title in str(info.value) and "0.3.64" in str(info.value)
    assert "-f kohya" in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sd3_last_context_block_is_swapped_by_its_shape(tmp_path):
    """diffusers stores the pre-only last block's context adaLN (2 x width rows) with scale and shift swapped, as
    ComfyUI's mmdit_to_diffusers says (swap_scale_shift); a full block's (6 x width) is not swapped."""
    width = 16
    tensors = {**_pair("transformer.transformer_blocks.0.norm1_context.linear", 6 * width, width, 1),
               **_pair("transformer.transformer_blocks.1.norm1_context.linear", 2 * width, width, 2),
               **_pair("transformer.transformer_blocks.1.attn.to_q", width, width, 3)}
    lora = lora_from_state_dict(tensors, {}, arch="sd3")
    for block, rows, swapped in ((0, 6 * width, False), (1, 2 * width, True)):
        layer = lora.layers[f"diffusion_model.joint_blocks.{block}.context_block.adaLN_modulation.1"]
        prefix = f"transformer.transformer_blocks.{block}.norm1_context.linear"
        source = tensors[f"{prefix}.lora_up.weight"] @ tensors[f"{prefix}.lora_down.weight"] * 0.5
        expected = torch.roll(source, rows // 2, dims=0) if swapped else source
        assert torch.allclose(delta_weight(layer).float(), expected, atol=1e-6)
    out = tmp_path / "sd3_peft.safetensors"
    write_lora(lora, out, convention="peft")
    back = read_lora(out, arch="sd3")  # at width 16 these diffusers names are Flux's as much as SD3's
    for name, layer in lora.layers.items():
        assert torch.allclose(delta_weight(back.layers[name]).float(), delta_weight(layer).float(), atol=1e-6)
    from safetensors.torch import load_file

    written = load_file(str(out))
    prefix = "transformer.transformer_blocks.1.norm1_context.linear"
    assert torch.allclose(written[f"{prefix}.lora_B.weight"] @ written[f"{prefix}.lora_A.weight"],
                          tensors[f"{prefix}.lora_up.weight"] @ tensors[f"{prefix}.lora_down.weight"] * 0.5,
                          atol=1e-5)


def test_hunyuan_musubi_names_become_names_comfyui_loads(tmp_path):
    """musubi's native img_mlp_fc1 (which ComfyUI 0.3.64 leaves unloaded) is written as ComfyUI's img_mlp_0."""
    tensors = {**_pair("lora_unet_double_blocks_0_img_mlp_fc1", 32, 8, 0),
               **_pair("lora_unet_double_blocks_0_img_mod_linear", 48, 8, 1)}
    lora = lora_from_state_dict(tensors, {})
    assert lora.architecture == "hunyuan_video"
    out = tmp_path / "hv.safetensors"
    write_lora(lora, out, convention="kohya")
    from safetensors.torch import load_file

    keys = set(load_file(str(out)))
    assert {"lora_unet_double_blocks_0_img_mlp_0.lora_up.weight",
            "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"} <= keys
    assert torch.equal(load_file(str(out))["lora_unet_double_blocks_0_img_mlp_0.lora_up.weight"],
                       tensors["lora_unet_double_blocks_0_img_mlp_fc1.lora_up.weight"])
    write_lora(lora, tmp_path / "hv_peft.safetensors", convention="peft")  # diffusion-pipe names, which load
    peft = set(load_file(str(tmp_path / "hv_peft.safetensors")))
    assert "transformer.double_blocks.0.img_mlp.fc1.lora_A.weight" in peft
    assert "transformer.double_blocks.0.img_mod.linear.lora_B.weight" in peft


def test_generic_text_encoder_names_pass_through(tmp_path):
    """Wan's UMT5 in ComfyUI's generic form has no table: kept verbatim in kohya output, the DiT re-named."""
    te = "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    tensors = {**_pair("lora_unet_blocks_0_self_attn_q", 16, 16, 0), **_pair(te, 16, 16, 1)}
    lora = lora_from_state_dict(tensors, {})
    assert lora.architecture == "wan" and lora.layers[te].verbatim
    out = tmp_path / "wan_comfy.safetensors"
    write_lora(lora, out, convention="comfy")
    from safetensors.torch import load_file

    keys = set(load_file(str(out)))
    assert f"{te}.lora_up.weight" in keys and "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in keys
    write_lora(lora, tmp_path / "wan_kohya.safetensors", convention="kohya")
    keys = set(load_file(str(tmp_path / "wan_kohya.safetensors")))
    assert f"{te}.lora_up.weight" in keys and "lora_unet_blocks_0_self_attn_q.lora_up.weight" in keys
    assert math.isclose(float(load_file(str(tmp_path / "wan_kohya.safetensors"))[f"{te}.alpha"]), 2.0)


def test_lumina_split_qkv_is_fused_with_grouped_query_heights(tmp_path):
    """diffusers' Lumina 2 to_q (model width rows) and to_k/to_v (kv heads' rows) are slices of ComfyUI's
    attention.qkv at rows 0, width and width + kv: written as one fused layer whose ΔW stacks the three."""
    width, kv = 32, 16
    tensors = {}
    for i, (name, rows) in enumerate((("to_q", width), ("to_k", kv), ("to_v", kv))):
        g = torch.Generator().manual_seed(i)
        prefix = f"transformer.layers.0.attn.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, width, generator=g)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, 4, generator=g)
    lora = lora_from_state_dict(tensors, {})
    assert lora.architecture == "lumina2"
    offsets = sorted(layer.offset for layer in lora)
    assert offsets == [(0, 0, width), (0, width, kv), (0, width + kv, kv)]
    z_image = naming.to_canonical("diffusion_model.layers.0.attention.to_v", "lumina2")  # Z-Image: kv = width
    assert (z_image.name, z_image.offset((width, width))) == ("diffusion_model.layers.0.attention.qkv",
                                                             (0, 2 * width, width))
    out = tmp_path / "lumina_comfy.safetensors"
    write_lora(lora, out, convention="comfy")
    (fused,) = read_lora(out).layers.values()
    assert fused.name == "diffusion_model.layers.0.attention.qkv" and fused.shape == (width + 2 * kv, width)
    expected = torch.cat([tensors[f"transformer.layers.0.attn.{n}.lora_B.weight"]
                          @ tensors[f"transformer.layers.0.attn.{n}.lora_A.weight"] for n in ("to_q", "to_k", "to_v")])
    assert torch.allclose(delta_weight(fused).float(), expected, atol=1e-5)
    del tensors["transformer.layers.0.attn.to_k.lora_A.weight"], tensors["transformer.layers.0.attn.to_k.lora_B.weight"]
    del tensors["transformer.layers.0.attn.to_v.lora_A.weight"], tensors["transformer.layers.0.attn.to_v.lora_B.weight"]
    with pytest.raises(LoraError, match="no known parts"):  # q alone: the kv heads' height is unknown
        write_lora(lora_from_state_dict(tensors, {}), tmp_path / "q_only.safetensors", convention="comfy")
    assert not (tmp_path / "q_only.safetensors").exists()

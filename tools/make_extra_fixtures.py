"""Write the Tucker fixtures with LyCORIS' own code (not run by CI; outputs are committed).

    python3 -m venv /root/.cache/fixture-venv
    /root/.cache/fixture-venv/bin/pip install torch==2.13.0 lycoris-lora==4.1.3 safetensors
    /root/.cache/fixture-venv/bin/python tools/make_extra_fixtures.py tests/fixtures/lora

For each algorithm (LoCon, LoHa, LoKr) with Tucker/CP on 3x3 convs, a tiny module tree named like
a diffusers UNet is adapted, its factors randomised (so ΔW != 0), saved with LyCORIS'
``save_weights`` under the kohya prefix, and the ΔW LyCORIS' own forward applies for every layer
is saved as ``../lora_expected/<name>.safetensors`` for the tests. (LyCORIS falls back to
full-matrix LoKr for these 32-channel convs, so LoKr's Tucker half is covered by
tests/test_formats_synthetic.py instead.)
"""
import os
import sys
import tempfile

import torch
from lycoris import create_lycoris
from safetensors.torch import save_file


class Resnet(torch.nn.Module):
    def __init__(self, inp, out):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inp, out, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(out, out, 3, padding=1)
        self.time_emb_proj = torch.nn.Linear(64, out)


class Block(torch.nn.Module):
    def __init__(self, inp, out):
        super().__init__()
        self.resnets = torch.nn.ModuleList([Resnet(inp, out)])


class TinyUNet(torch.nn.Module):
    def __init__(self, channels=(16, 32, 32)):
        super().__init__()
        self.down_blocks = torch.nn.ModuleList([Block(a, b) for a, b in zip(channels, channels[1:])])


CASES = {
    "sd15_lycoris_locon_tucker_r4a2": dict(algo="locon", use_tucker=True),
    "sd15_lycoris_loha_tucker_r4a2": dict(algo="loha", use_tucker=True),
    "sd15_lycoris_lokr_tucker_r4a2": dict(algo="lokr", use_tucker=True, decompose_both=True, factor=4),
    # 64 channels: LoKr's second half is small enough next to 64 to be factored, with its Tucker core
    "sd15_lycoris_lokr_t2_r4a2": dict(algo="lokr", use_tucker=True, decompose_both=True, factor=4,
                                      channels=(64, 64)),
}


def forward_delta(module, algo: str) -> torch.Tensor:
    """The ΔW LyCORIS' forward adds (multiplier 1). For LoHa/LoKr, get_weight already applies the
    scale and forward uses it as is; their get_diff_weight multiplies the scale a second time, so it
    is not the reference. LoCon's get_weight is unscaled and get_diff_weight scales it once."""
    if algo == "locon":
        return module.get_diff_weight(1.0, shape=tuple(module.shape))[0]
    return module.get_weight(tuple(module.shape)) * module.scalar


def main(out_dir: str) -> None:
    for name, options in CASES.items():
        torch.manual_seed(0)
        options = dict(options)
        model = TinyUNet(options.pop("channels", (16, 32, 32)))
        preset = os.path.join(tempfile.mkdtemp(), "preset.toml")  # LyCORIS reads custom presets from TOML
        with open(preset, "w") as fh:
            fh.write('enable_conv = true\ntarget_name = ["*conv1", "*conv2", "*time_emb_proj"]\n'
                     'use_fnmatch = true\nlora_prefix = "lora_unet"\n')
        network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2,
                                 preset=preset, **options)
        network.apply_to()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in network.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        expected = {}
        with torch.no_grad():
            for module in network.loras:
                expected[module.lora_name] = forward_delta(module, options["algo"]).float().contiguous()
        network.save_weights(f"{out_dir}/{name}.safetensors", torch.float32,
                             {"ss_network_module": "lycoris.kohya", "ss_network_args": str(options),
                              "ss_base_model_version": "sd_v1"})
        os.makedirs(f"{out_dir}/../lora_expected", exist_ok=True)
        save_file(expected, f"{out_dir}/../lora_expected/{name}.safetensors")
        print(name, len(expected), "layers")


if __name__ == "__main__":
    main(sys.argv[1])

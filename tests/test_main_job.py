"""The README's main command, on the data shipped in the repo (the base copied so no cache lands in the repo)."""
import os
import shutil

from core.cli import main
from core.formats import read_lora
from tests.conftest import FIXTURES

RECIPES = "fro_ckpt=1,thr=-2.6:spn_ckpt=1,params=0.2,size=0.08:rank=2"


def test_readme_main_job(tmp_path, caplog):
    base = tmp_path / "sd15_tiny_base.safetensors"
    shutil.copy(os.path.join(FIXTURES, "base", "sd15_tiny_base.safetensors"), base)
    lora = os.path.join(FIXTURES, "lora", "sd15_kohya_locon_r4a2_c2a1.safetensors")
    assert main([str(base), lora, "-o", str(tmp_path / "out"), "-r", RECIPES, "-v"]) == 0
    names = sorted(os.listdir(tmp_path / "out"))
    assert names == ["sd15_kohya_locon_r4a2_c2a1_frockpt1_th-2.6.safetensors",
                     "sd15_kohya_locon_r4a2_c2a1_params0.17_spnckpt0.83_size0.08_th-2.42.safetensors",
                     "sd15_kohya_locon_r4a2_c2a1_rank2.safetensors"]
    assert os.path.getsize(tmp_path / "out" / names[1]) <= 0.08 * 2**20
    assert sum(l.rank for l in read_lora(tmp_path / "out" / names[0])) == 325
    assert (tmp_path / ".lora_resize_norms.json").exists()
    assert "Score quantiles" in caplog.text  # -v

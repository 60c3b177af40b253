"""Recipe grammar: the seed tool's, plus rank/sv_*/reducers; errors name the bad token."""
import pytest

from core.errors import LoraError
from core.recipe import parse_recipe, parse_recipes


def test_seed_grammar_and_normalised_weights():
    recipes = parse_recipes("fro_ckpt=1,thr=-3.5:spn_lora=1,thr=-0.7:spn_ckpt=1,size=32")
    assert [r.threshold for r in recipes] == [-3.5, -0.7, None]
    assert recipes[2].size_mib == 32
    r = parse_recipe("fro_ckpt=3,spn_lora,rescale=0.8,thr=-2")
    assert r.weights == {"fro_ckpt": 0.75, "spn_lora": 0.25}
    assert r.rescale == 0.8 and r.needs_base


def test_slug_matches_seed_file_names():
    r = parse_recipe("spn_ckpt=1,size=32")
    assert r.slug(-2.8712) == "spnckpt1_size32_th-2.87"
    assert parse_recipe("fro_ckpt=0.8,params=0.2,thr=-3").slug(-3.0) == "frockpt0.8_params0.2_th-3"


def test_extensions():
    r = parse_recipe("rank=16,conv_rank=8,method=randproj,sparse=0.3,seed=4")
    assert (r.rank, r.conv_rank, r.method, r.sparse, r.seed) == (16, 8, "randproj", 0.3, 4)
    assert r.rank_cap(True) == 8 and r.rank_cap(False) == 16
    assert parse_recipe("sv_fro=0.9,rank=32").kohya_rule == ("sv_fro", 0.9)
    assert not parse_recipe("rank=4").needs_base


@pytest.mark.parametrize("text, token", [
    ("fro_ckpt=1,thr=abc", "thr=abc"),
    ("fro_ckpt=1,tresh=-3", "tresh=-3"),
    ("fro_ckpt=x,thr=-3", "fro_ckpt=x"),
    ("method=qr,rank=4", "method=qr"),
    ("rank=four", "rank=four"),
    ("fro_ckpt,thr", "thr"),
])
def test_bad_token_is_named(text, token):
    with pytest.raises(LoraError) as info:
        parse_recipe(text)
    assert repr(token) in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("fro_ckpt=1", "no selection"),
    ("thr=-3", "scoring method"),
    ("fro_ckpt,thr=-3,size=4", "choose one selection"),
    ("sv_fro=1.5", "sv_fro"),
    ("method=randproj,thr=-3,fro_ckpt", "randproj"),
    ("rank=0", "rank"),
])
def test_invalid_combinations(text, words):
    with pytest.raises(LoraError, match=words):
        parse_recipe(text)

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


@pytest.mark.parametrize("text, token, words", [
    ("fro_ckpt,thr=nan", "thr=nan", "not a finite number"),
    ("fro_ckpt,thr=-inf", "thr=-inf", "not a finite number"),
    ("fro_ckpt,thr=1e400", "thr=1e400", "beyond the range of a float"),
    ("fro_ckpt,thr=1000", "thr=1000", "log10 score threshold"),
    ("fro_ckpt,size=1e300", "size=1e300", "≤ 1000000"),
    ("fro_ckpt,size=0", "size=0", "> 0"),
    ("rank=4,rescale=1e30", "rescale=1e30", "overflows fp16"),
    ("rank=4,rescale=0", "rescale=0", "≥ 0.0001"),
    ("spn_lora=-0.5,thr=-1", "spn_lora=-0.5", "the weight of spn_lora must be ≥ 0"),
    ("spn_lora=nan,thr=-1", "spn_lora=nan", "not a finite number"),
    ("sv_ratio=0.5", "sv_ratio=0.5", "≥ 1"),
    ("sv_fro=nan", "sv_fro=nan", "not a finite number"),
    ("sv_cumulative=0", "sv_cumulative=0", "> 0"),
    ("rank=2,method=rsvd,niter=101", "niter=101", "≤ 100"),
    ("rank=65537", "rank=65537", "≤ 65536"),
    ("rank=16.0", "rank=16.0", "whole number"),
    ("rank=+1_6", "rank=+1_6", "not a whole number"),
    ("rank=١٦", "rank=١٦", "not a whole number"),  # int() accepts Arabic-Indic digits
    ("rank=2,method=randproj,seed=18446744073709551616", "seed=18446744073709551616", "≤ 18446744073709551615"),
])
def test_numbers_are_finite_and_in_range(text, token, words):
    """float()/int() accept nan, inf, 1e400→inf, 1_6 and non-ASCII digits; the grammar does not."""
    from core.errors import UsageError

    with pytest.raises(UsageError) as info:
        parse_recipe(text)
    assert repr(token) in str(info.value) and words in str(info.value)


def test_duplicate_outputs_are_refused_when_the_recipes_are_parsed():
    from core.errors import UsageError

    with pytest.raises(UsageError, match="'fro_ckpt=1,thr=-3' and 'fro_ckpt=1.0,thr=-3.00' give the same output"):
        parse_recipes("fro_ckpt=1,thr=-3:fro_ckpt=1.0,thr=-3.00")
    with pytest.raises(UsageError, match="give the same output"):
        parse_recipes("spn_lora,size=2:spn_lora,size=2")
    assert len(parse_recipes("spn_lora,size=2:spn_lora,size=2.5:rank=2:rank=3")) == 4


def test_ordinary_spellings_still_parse():
    r = parse_recipe(" fro_ckpt = 1e+06 , spn_lora=.5 , thr = -3.  ")
    assert r.threshold == -3.0 and r.weights == {"fro_ckpt": 1e6 / (1e6 + 0.5), "spn_lora": 0.5 / (1e6 + 0.5)}
    r = parse_recipe("rank=65536,method=randproj,seed=18446744073709551615,sparse=1")
    assert (r.rank, r.seed, r.sparse) == (65536, 2**64 - 1, 1.0)
    assert parse_recipe("rank=2,rescale=1e4").rescale == 1e4

import pytest

from mlclt_utils.presets import PRESETS, load_preset, mixture_name, model_names


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid(name):
    preset = load_preset(name)
    assert preset["name"] == name
    # papers B and C compare sizes; a preset of loaded models has the sizes that were released
    assert len(preset["models"]["sizes"]) >= 2 or preset["source"]["models"] is not None
    assert model_names(preset)


def test_overrides_are_applied_to_a_copy():
    preset = load_preset("tiny", {"training.tokens": 1234, "mixtures.english_shares": [0.0, 0.5, 1.0]})
    assert preset["training"]["tokens"] == 1234
    assert load_preset("tiny")["training"]["tokens"] != 1234
    with pytest.raises(ValueError, match="size_comparison_share"):
        load_preset("tiny", {"mixtures.english_shares": [0.2]})


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "huge"}, "unknown preset 'huge'.*tiny"),
    ({"overrides": {"training.tokns": 1}}, "unknown parameter 'training.tokns'.*training.tokens"),
    ({"overrides": {"corpus.languages": ["en", "xx"]}}, "unknown language code 'xx'"),
    ({"overrides": {"mixtures.english_shares": [0.5, 1.5]}}, "1.5 is outside"),
    ({"overrides": {"mixtures.english_shares": [-0.1, 0.5]}}, "-0.1 is outside"),
    ({"overrides": {"clt.activation": "relu"}}, "'relu'.*jumprelu"),
    ({"overrides": {"training.lr": "fast"}}, "must be a number"),
    ({"overrides": {"source.clts": "someone/clts"}}, "'source.clts' is set but 'source.models' is not"),
    ({"overrides": {"source.models": "a/b", "source.clt_dtype": "int8"}}, "'int8'.*bfloat16"),
    ({"overrides": {"source.models": 3}}, "'source.models' must be a hub name"),
    ({"overrides": {"corpus.source": "web"}}, "'web'.*bible"),
    ({"overrides": {"corpus.languages": ["fr", "de"]}}, "'en' is not in the languages"),
])
def test_bad_parameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_preset(**kwargs)


def test_names():
    assert mixture_name(0.0) == "en0" and mixture_name(0.5) == "en50" and mixture_name(0.9) == "en90"
    assert model_names(load_preset("tiny")) == ["s-en50", "s-en90", "m-en50"]


def test_bilingual_preset_cuts_the_run_to_its_pair():
    from mlclt_utils.presets import bilingual_preset, model_names, size_models

    p = bilingual_preset(load_preset("small"))
    assert p["corpus"]["languages"] == ["en", "ja"] and p["mixtures"]["english_shares"] == [0.5]
    assert model_names(p) == size_models(p) == ["s-en50", "m-en50"]
    assert p["models"]["sizes"]["s"]["d_model"] == 96 and p["training"]["tokens"] == 4_800_000
    other = bilingual_preset(load_preset("tiny", {"bilingual.languages": ["fr", "ar"]}))
    assert other["mixtures"]["english_shares"] == [0.0] and model_names(other) == ["s-en0", "m-en0"]
    with pytest.raises(ValueError, match="two languages"):
        bilingual_preset(load_preset("tiny", {"bilingual.languages": ["en", "fr", "de"]}))
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        bilingual_preset(load_preset("tiny", {"bilingual.languages": ["en", "xx"]}))
    with pytest.raises(ValueError, match="at least two model sizes"):
        bilingual_preset(load_preset("tiny", {"bilingual.sizes": {"s": {"n_layers": 2, "d_model": 32,
                                                                        "n_heads": 2, "d_mlp": 64}}}))

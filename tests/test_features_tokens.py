"""Token-level activations for the language probe against a direct run_with_cache
computation, the late-layer rule, top tokens, the feature/probe correlation and the
language_stats stage of the micro chain."""

import numpy as np
import pandas as pd
import pytest
import torch

from mlclt_utils.clt.evaluate import encode_layer
from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder
from mlclt_utils.features.activations import CLTFeatures, ResidualStream
from mlclt_utils.features.tokens import (feature_probe_correlation, late_layers, token_activations,
                                         top_tokens)


def _model_and_clt():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=12,
                                  d_vocab=50, act_fn="relu", seed=0)
    model = HookedTransformer(cfg).eval()
    clt = CrossLayerTranscoder(CLTConfig(2, 16, 24, threshold_init=1e-3),
                               generator=torch.Generator().manual_seed(0)).eval()
    return model, clt


def _rows(seed, n):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, 50, (n, 12), generator=g)
    rows[:, 0] = 3                       # BOS
    return rows


def test_token_activations_equal_a_direct_computation():
    model, clt = _model_and_clt()
    en, fr = _rows(0, 5), _rows(1, 4)
    fr[1, 7:] = 0                        # padding
    cap = 30                             # en: 5 rows x 11 tokens = 55 -> capped; fr: 4 x 11 - 5 = 39 -> capped
    got = token_activations({"resid": ResidualStream(model), "clt": CLTFeatures(model, clt)},
                            {"en": en, "fr": fr}, cap, batch_size=2)
    assert got.n_tokens == 2 * cap and list(got.y) == ["en"] * cap + ["fr"] * cap
    start = 0
    for lang, rows in (("en", en), ("fr", fr)):
        _, cache = model.run_with_cache(rows)
        keep = (rows != 3) & (rows != 0)
        r, p = keep.nonzero(as_tuple=True)
        r, p = r[:cap], p[:cap]
        part = slice(start, start + cap)
        assert torch.equal(got.token_ids[part], rows[r, p])
        assert torch.equal(got.rows[part], r) and torch.equal(got.positions[part], p)
        for layer in range(2):
            resid = cache[f"blocks.{layer}.hook_resid_post"][r, p]
            assert torch.allclose(got.X["resid"][layer][part], resid, atol=1e-5)
            feats = encode_layer(clt, cache[f"blocks.{layer}.ln2.hook_normalized"][r, p], layer)
            assert torch.allclose(got.X["clt"][layer][part], feats, atol=1e-5)
        start += cap
    assert (got.X["clt"][0] > 0).any()   # the check above is not about all-zero features


def test_token_activations_without_cap_keep_every_token_and_refuse_bad_input():
    model, clt = _model_and_clt()
    rows = _rows(2, 3)
    got = token_activations(ResidualStream(model), {"de": rows}, 10_000)
    assert got.n_tokens == 3 * 11 and set(got.X) == {"resid"} and got.X["resid"][1].shape == (33, 16)
    with pytest.raises(ValueError, match="max_tokens_per_language"):
        token_activations(ResidualStream(model), {"de": rows}, 0)
    with pytest.raises(ValueError, match="no token besides BOS"):
        token_activations(ResidualStream(model), {"de": torch.tensor([[3, 0, 0]])}, 5)
    with pytest.raises(ValueError, match="same model"):
        other, _ = _model_and_clt()
        token_activations({"a": ResidualStream(model), "b": ResidualStream(other)}, {"de": rows}, 5)


def test_late_layers_are_the_last_third():
    assert late_layers(1) == [0] and late_layers(2) == [1] and late_layers(4) == [3]
    assert late_layers(12) == [8, 9, 10, 11]
    with pytest.raises(ValueError):
        late_layers(0)


def test_top_tokens_rank_ids_by_mean_activation():
    ids = torch.tensor([7, 7, 8, 8, 9, 9, 10])
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 0.0], [0.0, 0.0],
                         [9.0, 0.0]])
    top = top_tokens(acts, ids, k=3)
    assert top[0] == [8, 7]              # id 10 is seen once, id 9 never fires
    assert top[1] == []


def test_feature_probe_correlation_sees_a_planted_link():
    rng = np.random.default_rng(0)
    p = rng.random(200)
    tokens = pd.DataFrame({"p0_en": p, "late_en": 2 * p + 0.01 * rng.random(200),
                           "p0_fr": 1 - p, "late_fr": np.zeros(200)})
    got = feature_probe_correlation(tokens, ["en", "fr"]).set_index("language")
    assert got.loc["en", "pearson"] > 0.99 and got.loc["en", "spearman"] > 0.99
    assert np.isnan(got.loc["fr", "pearson"]) and got.loc["fr", "tokens firing"] == 0


def test_language_stats_stage_of_the_micro_chain(chain_copy, micro):
    from conftest import RUN
    from mlclt_utils.stages import build, load

    build("unit_stats", micro, RUN, "s-en50", chain_copy, progress=False)
    build("language_stats", micro, RUN, "s-en50", chain_copy, progress=False)
    got = load("language_stats", micro, RUN, "s-en50", chain_copy)
    probe = got["probe"]
    assert set(probe["unit"]) == {"resid", "clt", "embed"}
    assert sorted(set(probe.loc[probe["unit"] != "embed", "layer"])) == [0, 1]
    assert probe.loc[probe["unit"] == "embed", "layer"].tolist() == [-1]          # the token-embedding baseline
    assert probe["accuracy"].between(0, 1).all() and probe["chance"].between(0.3, 0.7).all()
    tokens = got["tokens"]
    assert set(tokens["language"]) == {"en", "fr"} and len(tokens) == got["score_tokens"]
    assert np.allclose(tokens[["p0_en", "p0_fr"]].sum(axis=1), 1)
    assert tokens[["hit_embed", "hit_first", "hit_last"]].dtypes.eq(bool).all()
    assert set(tokens["owner"]) <= {"en", "fr", "shared", "unknown", "special"}
    # the embedding baseline scores what the stored hits say
    embed = probe.set_index("unit").loc["embed", "accuracy"]
    assert tokens["hit_embed"].mean() == pytest.approx(embed)
    assert len(got["live_features"]) == 2 and got["lift_null"]["layer"].isin([1]).all()
    assert got["late_layers"] == [1]
    counts = got["feature_counts"]
    assert len(counts) == 2 * 2 and set(counts["language"]) == {"en", "fr"}
    feats = got["language_features"]
    assert len(feats) == counts["language features"].sum()
    if len(feats):
        assert {"own_lift", "top_tokens", "frequency", "concentration"} <= set(feats.columns)
    assert len(got["token_languages"].labels()) == micro["tokenizer"]["vocab_size"]

"""Translation retrieval against a loop over verses with SciPy's cosine distance, and on
planted spaces: shared meaning is found, a language offset alone is not."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist

from mlclt_utils.features.activations import UnitStats
from mlclt_utils.features.retrieval import (pair_table, retrieval_by_layer, retrieval_summary,
                                            translation_ranks)

LANGS = ["en", "fr", "de"]


def _planted(n=60, d=24, meaning=1.0, offset=5.0, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, d))
    return {lang: meaning * shared + offset * rng.normal(size=d) + noise * rng.normal(size=(n, d))
            for lang in LANGS}


def test_ranks_match_a_loop_with_scipy_cosine():
    vectors = _planted(n=20, meaning=0.5, seed=1)
    ranks = translation_ranks(vectors).set_index(["source", "target", "verse"])["rank"]
    for a in LANGS:
        for b in LANGS:
            if a == b:
                continue
            sim = 1 - cdist(vectors[a] - vectors[a].mean(0), vectors[b] - vectors[b].mean(0), "cosine")
            for i in range(20):
                others = np.delete(sim[i], i)
                assert ranks[(a, b, i)] == int((others >= sim[i, i]).sum())


def test_shared_meaning_is_retrieved_and_a_language_offset_alone_is_not():
    found = retrieval_summary(translation_ranks(_planted(meaning=1.0, noise=0.5)), n_boot=300)
    top1 = found.set_index("k").loc[1]
    assert top1["share"] > 0.9 and top1["low"] > 10 * top1["chance"]
    assert top1["chance"] == pytest.approx(1 / 60)
    # no shared meaning: over many draws the rate is chance, k / N (the language offset is centred away)
    ranks = [translation_ranks(_planted(meaning=0.0, noise=1.0, seed=s))["rank"] for s in range(20)]
    for k in (1, 5):
        assert np.mean([(r < k).mean() for r in ranks]) == pytest.approx(k / 60, abs=0.006)


def test_zero_vectors_retrieve_nothing_and_bad_input_is_refused():
    zeros = {lang: np.zeros((10, 4)) for lang in LANGS}
    assert (translation_ranks(zeros)["rank"] == 9).all()
    with pytest.raises(ValueError, match="two languages"):
        translation_ranks({"en": np.zeros((5, 3))})
    with pytest.raises(ValueError, match="same number of verses"):
        translation_ranks({"en": np.zeros((5, 3)), "fr": np.zeros((4, 3))})


def test_by_layer_reads_each_layers_means_and_pairs_are_tabled():
    planted = _planted(n=40, meaning=1.0, noise=0.3, seed=4)
    noise = _planted(n=40, meaning=0.0, seed=5)
    stats = {lang: UnitStats(fired=[], counts=[], n_tokens=0, lengths=torch.ones(40),
                             means=[torch.tensor(noise[lang], dtype=torch.float32),
                                    torch.tensor(planted[lang], dtype=torch.float32)])
             for lang in LANGS}
    got = retrieval_by_layer(stats, n_boot=200).set_index(["layer", "k"])
    assert got.loc[(1, 1), "share"] > 0.9 > got.loc[(0, 1), "share"]
    assert list(retrieval_by_layer(stats, max_rows=10, n_boot=50)["verses"].unique()) == [10]
    with pytest.raises(ValueError, match="no statistics"):
        retrieval_by_layer(stats, languages=["en", "ja"])
    table = pair_table(translation_ranks(planted))
    assert table.shape == (3, 3) and np.isnan(table.loc["en", "en"]) and (table.fillna(1) > 0.9).all().all()


def test_over_training_sentence_follows_the_curve():
    from mlclt_utils.features.retrieval import over_training_sentence

    def curve(shares):
        return pd.DataFrame([{"step": s, "layer": l, "k": 1, "share": v, "low": v / 2, "high": v * 1.5, "chance": 0.01}
                             for s, v in zip((1, 10, 100), shares) for l in (0, 1, 2)])

    rising = over_training_sentence("m", curve([0.01, 0.02, 0.05]))
    assert "layer (1)" in rising and "5.0% of verses" in rising and "5.0× chance" in rising and "still rising" in rising
    peaked = over_training_sentence("m", curve([0.01, 0.06, 0.05]))
    assert "peaked at step 10 (6.0%)" in peaked and "rising" not in peaked

"""Language probe: separable data, shuffled labels, confusion matrix, row-wise split."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from mlclt_utils.features.probe import fit_language_probe, probe_by_layer, probe_split

LANGS = ["en", "fr", "de"]


def separable(n_per_lang=60, d=8, seed=0):
    """Each language a tight cluster around its own far-apart mean."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for i, lang in enumerate(LANGS):
        mean = np.zeros(d)
        mean[i] = 10.0
        X.append(mean + rng.normal(0, 0.5, (n_per_lang, d)))
        y += [lang] * n_per_lang
    return np.concatenate(X), np.array(y)


def test_separable_data_gives_accuracy_one():
    Xtr, ytr = separable(seed=0)
    Xte, yte = separable(n_per_lang=30, seed=1)
    r = fit_language_probe(torch.tensor(Xtr), ytr, Xte, yte)
    assert r.accuracy == 1.0 and r.balanced_accuracy == 1.0
    assert r.chance == pytest.approx(1 / 3)
    assert r.converged
    assert np.array_equal(r.confusion.to_numpy(), np.diag([30, 30, 30]))
    assert list(r.confusion.index) == sorted(LANGS) and r.confusion.index.name == "true"


def test_shuffled_labels_score_near_chance():
    """Labels independent of the features: the probe can do no better than answering the
    most frequent language (chance = its share of the test labels)."""
    rng = np.random.default_rng(0)
    p = [0.6, 0.25, 0.15]
    Xtr, Xte = rng.normal(size=(3000, 10)), rng.normal(size=(2000, 10))
    ytr = rng.choice(LANGS, size=3000, p=p)
    yte = rng.choice(LANGS, size=2000, p=p)
    r = fit_language_probe(Xtr, ytr, Xte, yte, seed=0)
    majority = Counter(ytr.tolist()).most_common(1)[0][0]
    reference_chance = sum(1 for label in yte if label == majority) / len(yte)
    assert r.chance == pytest.approx(reference_chance)
    assert abs(r.accuracy - reference_chance) < 0.03
    assert r.balanced_accuracy < 1 / 3 + 0.05


def test_confusion_matrix_matches_an_independent_count():
    Xtr, ytr = separable(seed=0)
    Xte, yte = separable(n_per_lang=20, seed=2)
    Xte[:5] = Xtr[np.flatnonzero(ytr == "fr")[:5]]   # five English rows that look French
    r = fit_language_probe(Xtr, ytr, Xte, yte, labels=["fr", "en", "de"])
    pred = r.model.predict(Xte)
    reference = pd.crosstab(pd.Series(yte, name="true"), pd.Series(pred, name="predicted"))
    reference = reference.reindex(index=["fr", "en", "de"], columns=["fr", "en", "de"], fill_value=0)
    assert r.confusion.to_numpy().sum() == len(yte) == r.n_test
    assert np.array_equal(r.confusion.to_numpy(), reference.to_numpy())
    assert r.confusion.loc["en", "fr"] == 5
    recalls = [np.mean(pred[yte == lang] == lang) for lang in LANGS]
    assert r.balanced_accuracy == pytest.approx(np.mean(recalls))
    assert r.accuracy == pytest.approx(np.mean(pred == yte)) and r.accuracy == pytest.approx(55 / 60)


def test_sparse_features_are_scaled_not_centred():
    import scipy.sparse as sp

    Xtr, ytr = separable(seed=0)
    Xte, yte = separable(n_per_lang=10, seed=3)
    r = fit_language_probe(sp.csr_matrix(np.maximum(Xtr, 0)), ytr, sp.csr_matrix(np.maximum(Xte, 0)), yte)
    assert r.accuracy == 1.0


def test_probe_by_layer():
    sep = (*separable(seed=0), *separable(n_per_lang=20, seed=1))
    rng = np.random.default_rng(0)
    noise = (rng.normal(size=(600, 4)), rng.choice(LANGS, 600), rng.normal(size=(300, 4)),
             rng.choice(LANGS, 300))
    df = probe_by_layer({2: noise, 0: sep})
    assert df["layer"].tolist() == [0, 2]
    assert df.loc[0, "accuracy"] == 1.0 and df.loc[1, "accuracy"] < 0.6
    assert {"balanced_accuracy", "chance", "n_train", "n_test"} <= set(df.columns)
    with pytest.raises(ValueError, match="layer 1: expected"):
        probe_by_layer({1: sep[:2]})


def test_probe_refuses_bad_input():
    Xtr, ytr = separable()
    with pytest.raises(ValueError, match="X_train has 8 columns and X_test 5"):
        fit_language_probe(Xtr, ytr, Xtr[:, :5], ytr)
    with pytest.raises(ValueError, match="y_train has 10 labels for 180 rows"):
        fit_language_probe(Xtr, ytr[:10], Xtr, ytr)
    with pytest.raises(ValueError, match="at least two"):
        fit_language_probe(Xtr, np.array(["en"] * len(Xtr)), Xtr, ytr)
    with pytest.raises(ValueError, match=r"test labels \['ar'\] never occur"):
        fit_language_probe(Xtr, ytr, Xtr[:1], np.array(["ar"]))
    bad = Xtr.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_language_probe(bad, ytr, Xtr, ytr)
    with pytest.raises(ValueError, match="max_iter is 0"):
        fit_language_probe(Xtr, ytr, Xtr, ytr, max_iter=0)


def test_probe_split_keeps_rows_together():
    # activations encode (row, position) so every token can be traced back to its row
    rows, pos = 12, 4
    acts = {}
    for i, lang in enumerate(["en", "fr"]):
        a = torch.zeros(rows, pos, 3)
        a[..., 0] = torch.arange(rows)[:, None].float()
        a[..., 1] = torch.arange(pos)[None, :].float()
        a[..., 2] = i
        acts[lang] = a
    keep = {lang: torch.ones(rows, pos, dtype=torch.bool) for lang in acts}
    for k in keep.values():
        k[:, 0] = False                                   # BOS left out
    Xtr, ytr, Xte, yte = probe_split(acts, keep, test_fraction=0.25, seed=0)
    assert len(Xte) == 2 * 3 * 3 and len(Xtr) == 2 * 9 * 3    # 3 test rows, 3 kept positions
    assert not (Xtr[:, 1] == 0).any() and not (Xte[:, 1] == 0).any()
    train_rows = {(lang, r) for lang, r in zip(ytr, Xtr[:, 0])}
    test_rows = {(lang, r) for lang, r in zip(yte, Xte[:, 0])}
    assert not train_rows & test_rows
    assert {r for _, r in test_rows if _ == "en"} == {r for _, r in test_rows if _ == "fr"}
    assert set(ytr[Xtr[:, 2] == 1]) == {"fr"}
    capped = probe_split(acts, keep, seed=0, max_tokens_per_language=5)
    assert Counter(capped[1].tolist()) == {"en": 5, "fr": 5}
    with pytest.raises(ValueError, match="test_fraction is 1.0"):
        probe_split(acts, keep, test_fraction=1.0)
    with pytest.raises(ValueError, match="keep mask of 'en' has shape"):
        probe_split(acts, {"en": torch.ones(2, 2, dtype=torch.bool), "fr": keep["fr"]})

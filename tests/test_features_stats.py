"""Firing sets, overlap and language specificity on constructed cases with known answers,
and the streamed statistics against a direct computation."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mlclt_utils.features.activations import MLPNeurons, UnitStats, collect_unit_stats
from mlclt_utils.features.overlap import (bootstrap_mean, control_partner, dense_units, gap_verdicts,
                                          row_gaps,
                                          jaccard, overlap_by_layer)
from mlclt_utils.features.specificity import count_language_features, language_features, specificity


def _stats(fired_rows, counts, n_tokens, lengths=None):
    fired = [torch.tensor(f, dtype=torch.bool) for f in fired_rows]
    rows = fired[0].shape[0]
    return UnitStats(fired=fired, counts=[torch.tensor(c) for c in counts],
                     means=[f.float() for f in fired], n_tokens=n_tokens,
                     lengths=torch.tensor(lengths if lengths is not None else list(range(1, rows + 1))))


def test_jaccard_known_values():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    j = jaccard(a, b)
    assert j[0] == 1 and j[1] == 0 and math.isnan(j[2])
    half = jaccard(torch.tensor([[1, 1, 0]], dtype=torch.bool), torch.tensor([[1, 0, 1]], dtype=torch.bool))
    assert half.item() == pytest.approx(1 / 3)


def test_dense_rule_drops_exactly_the_planted_dense_units():
    # unit 0 fires on 90 % of tokens in both languages; unit 1 in one language only; unit 2 rarely
    en = _stats([[[1, 1, 0]] * 4], [[90, 95, 1]], 100)
    fr = _stats([[[1, 0, 1]] * 4], [[92, 3, 2]], 100)
    dense = dense_units({"en": en, "fr": fr}, 0, 0.5)
    assert dense.tolist() == [True, False, False]
    summary, _ = overlap_by_layer({"en": en, "fr": fr}, max_dense_fraction=0.5, n_boot=50)
    assert (summary["dense_removed"] == 1).all()
    par = summary[summary["kind"] == "parallel"].iloc[0]
    assert par["jaccard"] == 0.0        # without the dense unit the sets {1} and {2} are disjoint


def test_parallel_overlap_beats_the_length_matched_control():
    g = torch.Generator().manual_seed(0)
    rows, units = 60, 40
    meaning = torch.rand(rows, units, generator=g) < 0.15
    noise = lambda: torch.rand(rows, units, generator=g) < 0.03  # noqa: E731
    lengths = torch.randint(5, 30, (rows,), generator=g)
    stats = {lang: UnitStats([meaning | noise()], [torch.full((units,), 10)], [meaning.float()],
                             1000, lengths) for lang in ("en", "fr", "de")}
    summary, pairs = overlap_by_layer(stats, n_boot=200)
    par = summary.set_index("kind").loc["parallel"]
    ctl = summary.set_index("kind").loc["control"]
    assert par["jaccard"] > 0.6 and ctl["jaccard"] < 0.3 and par["low"] > ctl["high"]
    assert set(pairs["pair"]) == {"en-fr", "en-de", "fr-de"}


def test_control_partner_is_another_row_of_near_length():
    lengths = torch.tensor([5, 30, 6, 29, 7])
    p = control_partner(lengths)
    assert all(p[i] != i for i in range(5))
    assert sorted(p.tolist()) == list(range(5))            # a permutation
    assert abs(lengths[p[0]] - lengths[0]) <= 1            # 5 -> 6


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_rows():
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 20), 500)
    large = bootstrap_mean(rng.normal(1.0, 1.0, 2000), 500)
    assert small[1] < small[0] < small[2] and large[1] < 1.0 < large[2]
    assert large[2] - large[1] < (small[2] - small[1]) / 4


def test_control_draws_pair_each_row_with_different_partners():
    lengths = torch.tensor([5, 30, 6, 29, 7, 8])
    first, second = control_partner(lengths, 0), control_partner(lengths, 1)
    assert all(first[i] != i and second[i] != i and first[i] != second[i] for i in range(6))


def _fired(rows):
    """UnitStats of one layer per entry of ``rows`` ([rows, units] bool lists)."""
    fired = [torch.tensor(r, dtype=torch.bool) for r in rows]
    n = fired[0].shape[0]
    return UnitStats(fired, [f.sum(0) for f in fired], [f.float() for f in fired], 1000,
                     torch.arange(n) + 5)


def _planted(overlap_by_layer_share, rows=60, units=400, seed=0):
    """Two languages; at each layer a verse's translation shares ``share`` of its 40 features,
    a different verse shares none beyond chance."""
    g = torch.Generator().manual_seed(seed)
    en, fr = [], []
    for share in overlap_by_layer_share:
        a = torch.zeros(rows, units, dtype=torch.bool)
        b = torch.zeros(rows, units, dtype=torch.bool)
        for r in range(rows):
            units_a = torch.randperm(units, generator=g)[:40]
            keep = int(share * 40)
            units_b = torch.cat([units_a[:keep], torch.randperm(units, generator=g)[:40 - keep]])
            a[r, units_a] = True
            b[r, units_b] = True
        en.append(a.tolist())
        fr.append(b.tolist())
    return {"en": _fired(en), "fr": _fired(fr)}


def test_a_planted_inverted_u_of_the_gap_holds_and_a_flat_one_does_not():
    bump = row_gaps(_planted([0.1, 0.6, 0.1]))
    shared, shape = gap_verdicts(bump, "A1", "m")
    assert shared["verdict"] == "holds" and shape["verdict"] == "holds"
    flat = gap_verdicts(row_gaps(_planted([0.4, 0.4, 0.4], seed=1)), "A1", "m")
    assert flat[0]["verdict"] == "holds" and flat[1]["verdict"] != "holds"
    valley = gap_verdicts(row_gaps(_planted([0.6, 0.1, 0.6], seed=2)), "A1", "m")
    assert valley[1]["verdict"] == "fails"


def test_a_profile_made_by_set_sizes_alone_is_not_an_inverted_u():
    # raw overlap peaks in the middle for translations and different verses alike (the middle
    # layer fires more units, so chance overlap is higher there); the gap is zero everywhere
    g = torch.Generator().manual_seed(3)
    def layer(p):
        return (torch.rand(60, 200, generator=g) < p).tolist()
    stats = {"en": _fired([layer(0.2), layer(0.8), layer(0.2)]),
             "fr": _fired([layer(0.2), layer(0.8), layer(0.2)])}
    summary, _ = overlap_by_layer(stats, max_dense_fraction=1.0, n_boot=200)
    par = summary[summary["kind"] == "parallel"].set_index("layer")["jaccard"]
    assert par[1] > 2 * max(par[0], par[2])                  # the raw curve is an inverted U
    _, shape = gap_verdicts(row_gaps(stats, max_dense_fraction=1.0), "A1", "m")
    assert shape["verdict"] == "inconclusive"


def test_a_planted_language_feature_is_found_and_an_even_one_is_not():
    # unit 0: fires on 20 % of en tokens, never elsewhere; unit 1: 20 % everywhere; unit 2: never
    stats = {lang: _stats([[[0, 0, 0]]], [[c0, 20, 0]], 100)
             for lang, c0 in (("en", 20), ("fr", 0), ("de", 0))}
    spec = specificity(stats, 0)
    assert spec.loc[0, "top_language"] == "en" and spec.loc[0, "concentration"] == 1.0
    assert spec.loc[0, "entropy_bits"] == 0.0
    assert spec.loc[1, "concentration"] == pytest.approx(1 / 3)
    assert spec.loc[1, "entropy_bits"] == pytest.approx(math.log2(3))
    assert pd.isna(spec.loc[2, "top_language"])
    chosen = language_features(spec)
    assert list(chosen.index) == [0]
    counts = count_language_features(stats).set_index("language")["language features"]
    assert counts.to_dict() == {"en": 1, "fr": 0, "de": 0}


def test_streamed_statistics_equal_a_direct_computation():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=12,
                                  d_vocab=50, act_fn="relu", seed=0)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(5, 50, (7, 12), generator=g)
    rows[:, 0] = 3
    rows[2, 8:] = 0                      # padding
    stats = collect_unit_stats(MLPNeurons(model), rows, batch_size=3)
    _, cache = model.run_with_cache(rows)
    keep = (rows != 3) & (rows != 0)
    for layer in range(2):
        acts = cache[f"blocks.{layer}.mlp.hook_post"] * keep[..., None]
        assert torch.equal(stats.fired[layer], (acts > 0).any(1))
        assert torch.equal(stats.counts[layer], (acts > 0).sum((0, 1)))
        assert torch.allclose(stats.means[layer], acts.sum(1) / keep.sum(1, keepdim=True), atol=1e-6)
    assert stats.n_tokens == int(keep.sum()) and stats.lengths.tolist() == keep.sum(1).tolist()
    back = UnitStats.from_tensors(stats.to_tensors("x."), "x.")
    assert all(torch.equal(a, b) for a, b in zip(back.fired, stats.fired))


def test_unit_stats_stage_of_the_micro_chain(chain_copy, micro):
    from conftest import RUN
    from mlclt_utils.stages import build, load

    build("unit_stats", micro, RUN, "s-en50", chain_copy, progress=False)
    got = load("unit_stats", micro, RUN, "s-en50", chain_copy)
    n_rows = len(got["keys"])
    assert 0 < n_rows <= micro["features"]["max_rows"] and set(got["clt"]) == {"en", "fr"}
    clt_stats = got["clt"]["en"]
    assert clt_stats.fired[0].shape == (n_rows, micro["clt"]["features_per_layer"])
    assert got["resid"]["fr"].means[1].shape == (n_rows, micro["models"]["sizes"]["s"]["d_model"])
    summary, pairs = overlap_by_layer(got["clt"], n_boot=100)
    assert set(summary["kind"]) == {"parallel", "control"} and len(summary) == 4
    assert summary["jaccard"].between(0, 1).all() and set(pairs["pair"]) == {"en-fr"}

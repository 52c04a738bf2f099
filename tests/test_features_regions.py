"""Language regions, semantic alignment, key units and LAPE on constructed activations, and
the neuron ablations of chapter 10 checked against editing the weights."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from mlclt_utils.features import regions
from mlclt_utils.features.activations import MLPNeurons, UnitStats, collect_unit_stats, kept_positions
from mlclt_utils.models.config import build_model, model_config
from mlclt_utils.neurons import ablation_summary, ablation_table, language_losses, random_units
from mlclt_utils.tokenizer import BOS_ID, PAD_ID

LANGS = ["en", "fr", "de"]


def _stats(blocks: dict[str, list[np.ndarray]], counts=None, n_tokens=100) -> dict[str, UnitStats]:
    """UnitStats per language from per-layer pattern arrays [rows, units]."""
    out = {}
    for i, (lang, layers) in enumerate(blocks.items()):
        means = [torch.tensor(m, dtype=torch.float32) for m in layers]
        c = counts[i] if counts is not None else [torch.zeros(m.shape[1], dtype=torch.long) for m in layers]
        out[lang] = UnitStats(fired=[m > 0 for m in means], counts=c, means=means, n_tokens=n_tokens,
                              lengths=torch.full((means[0].shape[0],), 10))
    return out


def _reference_scores(x, lang, meaning):
    """Region scores by explicit loops over pairs, on sklearn's cosine similarity."""
    s = cosine_similarity(x)
    same_l, diff_l, same_m, diff_m = [], [], [], []
    for i in range(len(x)):
        for j in range(len(x)):
            if i == j:
                continue
            if lang[i] == lang[j]:
                same_l.append(s[i, j])
            else:
                diff_l.append(s[i, j])
                (same_m if meaning[i] == meaning[j] else diff_m).append(s[i, j])
    return np.mean(same_l) - np.mean(diff_l), np.mean(same_m) - np.mean(diff_m)


def _language_blocks(rng, n_rows=12, width=40, meaning_strength=0.0, language_strength=3.0):
    """Patterns = noise + a direction per language + a direction per meaning."""
    lang_dir = {l: rng.normal(size=width) for l in LANGS}
    meaning_dir = rng.normal(size=(n_rows, width))
    return _stats({l: [np.abs(rng.normal(size=(n_rows, width)) + language_strength * lang_dir[l]
                              + meaning_strength * meaning_dir)] for l in LANGS})


def test_language_blocks_give_positive_lrds_and_no_sads():
    stats = _language_blocks(np.random.default_rng(0))
    x, lang, meaning = regions.patterns(stats)
    s = regions.region_scores(x, lang, meaning)
    assert s["lrds"] > 0.2
    assert abs(s["sads"]) < 0.02
    lrds, sads = _reference_scores(x, lang, meaning)
    assert s["lrds"] == pytest.approx(lrds, abs=1e-9) and s["sads"] == pytest.approx(sads, abs=1e-9)


def test_meaning_blocks_give_positive_sads():
    stats = _language_blocks(np.random.default_rng(1), meaning_strength=3.0, language_strength=0.0)
    x, lang, meaning = regions.patterns(stats)
    s = regions.region_scores(x, lang, meaning)
    assert s["sads"] > 0.2
    assert abs(s["lrds"]) < 0.05
    assert s["sads"] == pytest.approx(_reference_scores(x, lang, meaning)[1], abs=1e-9)


def test_scores_follow_the_parallel_index_not_the_row_order():
    stats = _language_blocks(np.random.default_rng(2), meaning_strength=3.0, language_strength=1.0)
    x, lang, meaning = regions.patterns(stats)
    perm = np.random.default_rng(3).permutation(len(x))
    a = regions.region_scores(x, lang, meaning)
    b = regions.region_scores(x[perm], lang[perm], meaning[perm])
    assert a["lrds"] == pytest.approx(b["lrds"], abs=1e-12)
    assert a["sads"] == pytest.approx(b["sads"], abs=1e-12)
    # a wrong meaning index (rows of one language shifted by one) loses the alignment
    wrong = meaning.copy()
    wrong[lang == "fr"] = np.roll(wrong[lang == "fr"], 1)
    assert a["sads"] > 0.1 and regions.region_scores(x, lang, wrong)["sads"] < a["sads"] / 2


def test_scores_by_layer_has_all_layers_and_the_concatenation():
    rng = np.random.default_rng(4)
    stats = _stats({l: [np.abs(rng.normal(size=(6, 5))), np.abs(rng.normal(size=(6, 7)))] for l in LANGS})
    table = regions.scores_by_layer(stats)
    assert table["layer"].tolist() == ["all", "0", "1"]
    x, lang, meaning = regions.patterns(stats, [1])
    assert table.loc[2, "lrds"] == pytest.approx(_reference_scores(x, lang, meaning)[0], abs=1e-9)


def test_contributions_add_up_to_the_same_language_similarity():
    stats = _language_blocks(np.random.default_rng(5))
    c = regions.same_language_contributions(stats)
    x, lang, _ = regions.patterns(stats)
    s = cosine_similarity(x)
    for i, l in enumerate(LANGS):
        block = s[np.ix_(lang == l, lang == l)]
        n = len(block)
        assert c[i].sum() == pytest.approx((block.sum() - np.trace(block)) / (n * (n - 1)), rel=1e-9)


def test_key_units_finds_the_planted_units_and_only_them():
    rng = np.random.default_rng(6)
    n_rows, width = 20, 60
    base = np.abs(rng.normal(size=(n_rows, width)))       # the same patterns in every language
    planted = {"en": [3, 17], "fr": [40], "de": [8, 9, 55]}
    blocks = {}
    for lang in LANGS:
        x = base.copy()
        x[:, planted[lang]] += 4.0                          # units that fire strongly only here
        blocks[lang] = [x[:, :30], x[:, 30:]]               # two layers of 30 units
    found = regions.key_units(_stats(blocks), z_threshold=2.0)
    got = {(r.language, r.layer * 30 + r.unit) for r in found.itertuples()}
    assert got == {(l, u) for l, us in planted.items() for u in us}
    counts = regions.unit_counts(found, LANGS, 2)
    assert counts.set_index(["layer", "language"]).loc[(1, "de"), "units"] == 1
    assert counts["units"].sum() == 6 and len(counts) == 6


def test_key_units_refuses_a_bad_threshold():
    with pytest.raises(ValueError, match="z_threshold"):
        regions.key_units(_language_blocks(np.random.default_rng(0)), z_threshold=0)


def test_lape_returns_the_language_specific_units():
    rng = np.random.default_rng(7)
    prob = np.full((3, 200), 0.3) + rng.uniform(-0.01, 0.01, size=(3, 200))   # shared units
    prob[:, 150:] = rng.uniform(0, 0.02, size=(3, 50))                          # rarely firing units
    prob[:, 150] = [0.0005, 0.0, 0.0]                     # specific but too rare to count
    prob[:, 10] = [0.9, 0.01, 0.01]                       # English
    prob[:, 20] = [0.02, 0.95, 0.0]                       # French
    found = regions.lape_units(prob, LANGS, share=0.01, quantile=0.95)
    assert sorted(zip(found["unit"], found["language"])) == [(10, "en"), (20, "fr")]
    assert (found["entropy"] < 0.3).all()
    # a unit shared by two languages belongs to both
    prob[:, 30] = [0.8, 0.85, 0.0]
    found = regions.lape_units(prob, LANGS, share=0.015, quantile=0.95)
    assert {(u, l) for u, l in zip(found["unit"], found["language"])} >= {(30, "en"), (30, "fr")}
    with pytest.raises(ValueError, match="languages"):
        regions.lape_units(prob, ["en"], share=0.01)


def test_lape_by_layer_maps_units_back_to_layers():
    counts = [[torch.tensor([0, 0, 50, 0]), torch.tensor([0, 0, 0])],
              [torch.tensor([0, 0, 0, 0]), torch.tensor([0, 45, 0])],
              [torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0])]]
    stats = _stats({l: [np.ones((3, 4)), np.ones((3, 3))] for l in LANGS}, counts=counts, n_tokens=100)
    found = regions.lape_by_layer(stats, share=2 / 7, quantile=0.9)
    assert sorted(zip(found["language"], found["layer"], found["unit"])) == [("en", 0, 2), ("fr", 1, 1)]


def test_set_overlap_counts_pairs():
    a = pd.DataFrame({"language": ["en", "en", "fr"], "layer": [0, 1, 0], "unit": [1, 2, 3]})
    b = pd.DataFrame({"language": ["en", "fr"], "layer": [1, 0], "unit": [2, 4]})
    o = regions.set_overlap(a, b, ["en", "fr", "de"]).set_index("language")
    assert o.loc["en", "both"] == 1 and o.loc["en", "jaccard"] == pytest.approx(0.5)
    assert o.loc["fr", "jaccard"] == 0 and np.isnan(o.loc["de", "jaccard"])


# ----------------------------------------------------------------- on a real model -----

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = model_config({"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64}, 12, 50, seed=0)
    return build_model(cfg).eval()


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, 50, (n, 12), generator=g)
    rows[:, 0] = BOS_ID
    rows[1, 8:] = PAD_ID
    rows[3, 5:] = PAD_ID
    return rows


def test_streamed_patterns_equal_the_whole_set(tiny_model):
    rows = _rows(10, 0)
    stats = collect_unit_stats(MLPNeurons(tiny_model), rows, batch_size=3)
    _, cache = tiny_model.run_with_cache(rows)
    keep = kept_positions(rows).float()
    for layer in range(2):
        acts = cache[f"blocks.{layer}.mlp.hook_post"]
        want = (acts * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        torch.testing.assert_close(stats.means[layer], want, atol=1e-5, rtol=1e-5)


def test_zeroing_neurons_equals_zeroing_their_output_weights(tiny_model):
    sets = {"en": _rows(6, 1), "fr": _rows(6, 2)}
    base = language_losses(tiny_model, sets)
    assert language_losses(tiny_model, sets, {0: [], 1: []}) == base
    units = {0: [1, 5, 9], 1: [0, 63]}
    hooked = language_losses(tiny_model, sets, units)
    edited = build_model(tiny_model.cfg).eval()
    edited.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for layer, idx in units.items():
            edited.blocks[layer].mlp.W_out[idx] = 0.0
    want = language_losses(edited, sets)
    assert hooked == pytest.approx(want, rel=1e-5)
    assert hooked != base


def test_random_units_match_counts_and_avoid_the_excluded():
    rng = np.random.default_rng(0)
    got = random_units({0: 3, 2: 5}, [10, 10, 6], rng, exclude={2: [0]})
    assert len(got[0]) == 3 and len(got[2]) == 5 and 0 not in got[2]
    with pytest.raises(ValueError, match="layer 2"):
        random_units({2: 6}, [10, 10, 6], rng, exclude={2: [0]})


def test_ablation_table_has_key_and_random_rows(tiny_model):
    sets = {"en": _rows(4, 1), "fr": _rows(4, 2)}
    key = pd.DataFrame({"language": ["en", "en", "fr"], "layer": [0, 1, 1], "unit": [3, 4, 7]})
    t = ablation_table(tiny_model, sets, key, ["en", "fr"], draws=2, seed=0, progress=False)
    assert len(t) == 2 * (1 + 2) * 2
    assert set(t[t["ablated"] == "en"]["neurons"]) == {2}
    s = ablation_summary(t)
    assert len(s) == 4 and s["random_sd"].notna().all()
    row = t[(t["kind"] == "key") & (t["ablated"] == "fr") & (t["language"] == "en")].iloc[0]
    assert row["loss"] == pytest.approx(language_losses(tiny_model, sets, {1: [7]})["en"])


def test_neurons_stage_on_the_micro_chain(chain_copy):
    """Chapter 10's stage: scores for every checkpoint and the CLT, ablation rows for every
    language with key neurons, and a rebuild from scratch gives the same tables."""
    import shutil

    from conftest import RUN, micro_preset
    from mlclt_utils import stages
    from mlclt_utils.models.load import checkpoint_steps

    preset = micro_preset(**{"features.max_rows": 20, "neurons.max_rows": 12, "neurons.display_rows": 5,
                             "neurons.ablation_tokens": 128, "neurons.ablation_draws": 2})
    stages.build("unit_stats", preset, RUN, "s-en50", chain_copy, progress=False)
    st = stages.build("neurons", preset, RUN, "s-en50", chain_copy, progress=False)
    out = stages.load("neurons", preset, RUN, "s-en50", chain_copy)
    steps = checkpoint_steps(stages.stage("models", RUN, "s-en50", chain_copy).path)
    mlp = out["scores"][out["scores"]["unit"] == "mlp"]
    assert sorted(mlp["step"].unique()) == steps and set(mlp["layer"]) == {"all", "0", "1"}
    assert (out["scores"]["unit"] == "clt").sum() == 3
    assert set(out["row_scores"]["layer"].astype(str)) == {"all", "0", "1"}
    assert out["similarity"]["mlp"].shape == (10, 10)
    langs = set(out["key_units"]["language"])
    assert set(out["ablation"]["ablated"]) == langs
    first = {k: out[k].copy() for k in ("scores", "key_units", "ablation")}
    shutil.rmtree(st.path)
    stages.build("neurons", preset, RUN, "s-en50", chain_copy, progress=False)
    again = stages.load("neurons", preset, RUN, "s-en50", chain_copy)
    for k, df in first.items():
        pd.testing.assert_frame_equal(df, again[k])


def test_row_scores_average_to_the_region_scores_against_the_loop_reference():
    rng = np.random.default_rng(4)
    meaning_vec = rng.normal(size=(12, 20))
    blocks = {lang: [np.abs(meaning_vec + rng.normal(size=20) * 2 + rng.normal(size=(12, 20)) * 0.5)]
              for lang in LANGS}
    x, lang, meaning = regions.patterns(_stats(blocks))
    rows = regions.row_scores(x, lang, meaning)
    lrds, sads = _reference_scores(x, lang, meaning)
    assert len(rows) == 12
    assert rows["lrds"].mean() == pytest.approx(lrds) and rows["sads"].mean() == pytest.approx(sads)


def _located(signal_layers, n_layers=4, rows=40, units=60, seed=0):
    """Patterns of equal scale in every layer: units 0-29 are lifted in every layer, for every
    language, except in ``signal_layers``, where each language lifts only its own ten."""
    rng = np.random.default_rng(seed)
    blocks = {}
    for i, lang in enumerate(LANGS):
        layers = []
        for layer in range(n_layers):
            m = np.abs(rng.normal(1.0, 0.3, size=(rows, units)))
            if layer in signal_layers:
                m[:, i * 10:(i + 1) * 10] += 3.0
            else:
                m[:, :30] += 3.0
            layers.append(m)
        blocks[lang] = layers
    return _stats(blocks)


def test_key_location_sees_planted_edge_neurons_and_the_null_does_not():
    loc = regions.key_location(_located({0, 3}), draws=5, n_boot=50).set_index("spread")
    pooled = loc.loc["all"]
    assert pooled["edge_share"] == 1.0 and pooled["low"] > pooled["null_edge_share"]
    assert pooled["null_keys"] < pooled["keys"]


def test_key_location_without_language_signal_is_no_concentration():
    from mlclt_utils.claims import decide

    loc = regions.key_location(_located(set(), seed=1), draws=5, n_boot=100).set_index("spread").loc["all"]
    assert decide(loc["low"], loc["high"], loc["null_edge_share"]) != "holds"


def _neurons_out(sads_growth: float, own_hurt: float, seed: int = 0):
    """A loaded neurons stage in miniature: 60 rows at steps 10 and 100 (SADS up by
    ``sads_growth``), key counts moving to layer 0, and ablations where a language's key
    neurons raise its own loss by ``own_hurt``."""
    rng = np.random.default_rng(seed)
    rows = []
    for step, shift in ((10, 0.0), (100, sads_growth)):
        rows.append(pd.DataFrame({"meaning": range(60), "lrds": 0.3 + rng.normal(0, 0.05, 60),
                                  "sads": 0.01 + shift + rng.normal(0, 0.01, 60), "unit": "mlp", "step": step}))
    counts = pd.DataFrame([{"layer": l, "language": "en", "units": n, "unit": "mlp", "step": st, "spread": "all",
                            "width": 64} for st, per in ((10, [5, 20, 20, 5]), (100, [30, 10, 10, 5]))
                           for l, n in enumerate(per)])
    abl = []
    for a in LANGS:
        for lang in LANGS:
            abl.append({"kind": "key", "draw": 0, "ablated": a, "language": lang,
                        "relative_change": (own_hurt if a == lang else 0.0) + rng.normal(0, 0.005)})
            abl += [{"kind": "random", "draw": d, "ablated": a, "language": lang,
                     "relative_change": rng.normal(0, 0.005)} for d in range(5)]
    location = pd.DataFrame([{"spread": "all", "keys": 50, "edge_share": 0.9, "low": 0.8, "high": 0.95,
                              "null_keys": 10, "null_edge_share": 0.5, "even_share": 0.5}])
    # 4 layers x 64 neurons; key and LAPE neurons agree on 15 of 40 (chance: 40 * 20 / 256 = ~3)
    overlap = pd.DataFrame({"language": ["en", "fr", "de"], "key": [20, 20, 10], "lape": [10, 10, 0],
                            "both": [8, 7, 0], "jaccard": [0.3, 0.3, 0.0]})
    return {"row_scores": pd.concat(rows), "steps": [1, 10, 100], "key_counts": counts,
            "key_location": location, "ablation": pd.DataFrame(abl), "rows": 60, "method_overlap": overlap}


def test_neuron_verdicts_on_planted_data():
    from mlclt_utils.neurons import verdicts

    got = verdicts({"m": _neurons_out(0.02, 0.1)}, {"m": [10, 100]}, n_boot=300)
    by = {(r["claim"], r["statistic"].split(",")[0]): r["verdict"] for r in got}
    assert by[("C1", "SADS growth")] == "holds" and by[("C1", "LRDS (same language minus different languages)")] == "holds"
    assert by[("C3", "first layer's share of key neurons")] == "holds"
    assert by[("C3", "share of key neurons (one z spread for all layers) in the first and last layers")] == "holds"
    assert all(r["verdict"] == "holds" for r in got if r["claim"] == "C4")
    flat = verdicts({"m": _neurons_out(0.0, 0.0, seed=1)}, {"m": [10, 100]}, n_boot=300)
    assert all(r["verdict"] == "inconclusive" for r in flat
               if (r["claim"] == "C4" and r["counted"]) or "growth" in r["statistic"])
    # step 1 came before the loss moved: growth is measured from step 10, not step 1
    assert any("step 10 to 100" in r["statistic"] for r in got)
    # key vs LAPE: over en and fr only (de has no LAPE neuron), shown but not counted
    lape = [r for r in got if "LAPE" in r["statistic"]]
    assert len(lape) == 1 and not lape[0]["counted"] and lape[0]["verdict"] == "holds"
    assert lape[0]["n_units"] == 40 and lape[0]["estimate"] == pytest.approx(15 / 40)
    assert lape[0]["null"] == pytest.approx((20 * 10 + 20 * 10) / 256 / 40)
    assert lape[0]["note"].endswith("en, fr")


def test_lape_agreement_at_chance_is_not_called_agreement():
    from mlclt_utils.claims import decide, wilson
    from mlclt_utils.neurons import lape_agreement

    # 256 neurons, 64 key and 64 LAPE per language: 16 in common is exactly chance
    overlap = pd.DataFrame({"language": ["en", "fr"], "key": [64, 64], "lape": [64, 64], "both": [16, 16]})
    both, n, chance = lape_agreement(overlap, 256)
    assert (both, n) == (32, 128) and chance == pytest.approx(0.25)
    assert decide(*wilson(both, n)[1:], chance) == "inconclusive"
    assert lape_agreement(overlap.assign(lape=0), 256) == (0, 0, pytest.approx(float("nan"), nan_ok=True))


def test_row_scores_by_layer_and_their_intervals():
    from scipy import stats as st

    rng = np.random.default_rng(5)
    blocks = {lang: [np.abs(rng.normal(size=(12, 20))) + i, np.abs(rng.normal(size=(12, 30)))]
              for i, lang in enumerate(LANGS)}
    stats = _stats(blocks)
    rows = regions.row_scores_by_layer(stats)
    assert list(dict.fromkeys(rows["layer"])) == ["all", "0", "1"]
    pd.testing.assert_frame_equal(rows[rows["layer"] == "all"].drop(columns="layer").reset_index(drop=True),
                                  regions.row_scores(*regions.patterns(stats)))
    by_layer = regions.scores_by_layer(stats).set_index("layer")
    ci = regions.score_intervals(rows).set_index("layer")
    for layer in ("all", "0", "1"):
        v = rows.loc[rows["layer"] == layer, "sads"].to_numpy()
        assert ci.loc[layer, "lrds"] == pytest.approx(by_layer.loc[layer, "lrds"])
        assert ci.loc[layer, "sads"] == pytest.approx(by_layer.loc[layer, "sads"])
        lo, hi = st.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=st.sem(v))    # 12 rows: t quantiles
        assert (ci.loc[layer, "sads_low"], ci.loc[layer, "sads_high"]) == (pytest.approx(lo), pytest.approx(hi))

"""Model diffing (chapter 08): the transplant against a hand-built hook, known answers of the
statistics on constructed data, and the stages on the micro chain (a finetune starts from
the base weights; a named weak language the base model never saw is refused before work)."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from mlclt_utils.clt.evaluate import encode_layer
from mlclt_utils.diffing import (a5_verdicts, choose_languages, closed_share, finetune_mixture, loss_table,
                                 random_features_like, row_losses, transplant_losses, transplant_summary,
                                 weak_pair_gaps)
from mlclt_utils.features.activations import UnitStats

from test_clt_formats import BOS, L, tiny_clt, tiny_model

ROWS = torch.tensor([[BOS, 5, 9, 7, 11, 30, 6, 8], [BOS, 12, 13, 33, 7, 7, 21, 2]])


def _hand_loss(logits, rows):
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    return (-lp.gather(-1, rows[:, 1:, None])[..., 0]).mean(1).numpy()


def test_moving_decoders_to_themselves_changes_nothing():
    model, clt = tiny_model(), tiny_clt()
    feats = [(l, f) for l in range(L) for f in range(4)]
    np.testing.assert_allclose(transplant_losses(model, clt, copy.deepcopy(clt), feats, ROWS),
                               row_losses(model, ROWS), rtol=0, atol=1e-6)


def test_moving_a_last_layer_decoder_adds_exactly_activation_times_the_decoder_change():
    model, clt = tiny_model(), tiny_clt()
    last = L - 1
    name = f"blocks.{last}.{clt.cfg.input_hook}"
    with torch.no_grad():
        _, cache = model.run_with_cache(ROWS, names_filter=[name])
        acts = encode_layer(clt, cache[name], last)                      # [B, P, F]
    f = int(acts[:, 1:].gt(0).sum((0, 1)).argmax())
    other = copy.deepcopy(clt)
    with torch.no_grad():
        other.W_dec[last][f] = torch.randn(other.W_dec[last][f].shape, generator=torch.Generator().manual_seed(1))
    write = acts[..., f, None] * (other.W_dec[last][f, 0] - clt.W_dec[last][f, 0]) / clt.output_scale[last]
    write[:, 0] = 0                                                        # BOS untouched
    assert write.abs().sum() > 0
    with torch.no_grad():
        expected = model.run_with_hooks(ROWS, fwd_hooks=[(f"blocks.{last}.hook_mlp_out",
                                                          lambda out, hook: out + write.detach())])
    np.testing.assert_allclose(transplant_losses(model, clt, other, [(last, f)], ROWS),
                               _hand_loss(expected, ROWS), rtol=0, atol=1e-5)
    # and the plain row loss is the model's own next-token loss
    with torch.no_grad():
        np.testing.assert_allclose(row_losses(model, ROWS), _hand_loss(model(ROWS), ROWS), rtol=0, atol=1e-5)


def test_moving_activations_adds_exactly_the_activation_change_times_the_decoder():
    model, clt = tiny_model(), tiny_clt()
    donor = tiny_model(seed=1)
    last = L - 1
    name = f"blocks.{last}.{clt.cfg.input_hook}"
    with torch.no_grad():
        acts = {}
        for key, m in (("own", model), ("donor", donor)):
            _, cache = m.run_with_cache(ROWS, names_filter=[name])
            acts[key] = encode_layer(clt, cache[name], last)
    f = int((acts["own"] - acts["donor"])[:, 1:].abs().sum((0, 1)).argmax())
    write = (acts["donor"][..., f, None] - acts["own"][..., f, None]) * clt.W_dec[last][f, 0] / clt.output_scale[last]
    write[:, 0] = 0
    assert write.abs().sum() > 0
    with torch.no_grad():
        expected = model.run_with_hooks(ROWS, fwd_hooks=[(f"blocks.{last}.hook_mlp_out",
                                                          lambda out, hook: out + write.detach())])
    got = transplant_losses(model, clt, clt, [(last, f)], ROWS, move="activations", donor_model=donor)
    np.testing.assert_allclose(got, _hand_loss(expected, ROWS), rtol=0, atol=1e-5)
    # the model as its own donor: nothing moves
    np.testing.assert_allclose(transplant_losses(model, clt, clt, [(l, 1) for l in range(L)], ROWS,
                                                 move="activations", donor_model=model),
                               row_losses(model, ROWS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="donor model"):
        transplant_losses(model, clt, clt, [(last, f)], ROWS, move="activations")


def test_weak_and_strong_languages_are_chosen_from_the_loss_and_untrained_ones_refused():
    val = {"en": 3.0, "fr": 4.0, "zh": 5.5, "de": 3.9}
    weak, strong, table = choose_languages(val, ["en", "fr", "zh", "de"])
    assert (weak, strong) == ("zh", "en")
    assert table.set_index("language").loc["zh", "gap"] == pytest.approx(2.5)
    assert choose_languages(val, ["en", "fr", "zh"], weak="fr")[0] == "fr"
    # no English: the reference is the best language, and strong is the best one too
    assert choose_languages({"fr": 4.0, "zh": 5.5}, ["fr", "zh"])[:2] == ("zh", "fr")
    with pytest.raises(ValueError, match="'ar'.*not a language the base model was trained on"):
        choose_languages(val, ["en", "fr"], weak="ar")
    assert choose_languages(val, ["en", "fr"], weak="en")[1] == "fr"          # strong: the best other one
    with pytest.raises(ValueError, match="strong-language control"):
        choose_languages(val, ["en", "fr"], weak="fr", strong="fr")


def test_finetune_mixtures():
    langs = ["en", "fr", "zh"]
    assert finetune_mixture("weak", langs, 0.9, None, "zh", "en") == (0.0, {"fr": 0.0, "zh": 1.0})
    assert finetune_mixture("strong", langs, 0.9, None, "zh", "en") == (1.0, None)
    assert finetune_mixture("mixture", langs, 0.9, None, "zh", "en") == (0.9, None)
    with pytest.raises(ValueError, match="unknown finetune 'other'"):
        finetune_mixture("other", langs, 0.9, None, "zh", "en")


def test_loss_table_pairs_rows_and_gives_zero_for_the_base():
    rng = np.random.default_rng(0)
    base = rng.normal(4, 1, 200)
    losses = {"base": {"fr": base}, "weak": {"fr": base - 0.1 + rng.normal(0, 0.01, 200)}}
    t = loss_table(losses).set_index("variant")
    assert t.loc["base", "change"] == 0
    assert t.loc["weak", "high"] < 0 < t.loc["weak", "change"] + 0.2          # -0.1 with a narrow interval
    assert t.loc["weak", "change"] == pytest.approx(-0.1, abs=0.01)


def test_closed_share_known_answer():
    base, moved, tuned = np.full(50, 2.0), np.full(50, 1.5), np.full(50, 1.0)
    est, lo, hi = closed_share(base, moved, tuned, n_boot=200)
    assert est == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_transplant_summary_reads_both_directions():
    rows = np.arange(40)
    parts = [("base to finetuned", "none", 0, 2.0), ("base to finetuned", "finetuned model", 0, 1.0),
             ("base to finetuned", "late", 0, 1.75), ("finetuned to base", "late", 0, 1.5),
             ("base to finetuned", "random late", 0, 2.0), ("base to finetuned", "random late", 1, 1.8)]
    t = pd.concat([pd.DataFrame({"direction": d, "move": "none" if s in ("none", "finetuned model") else "decoders",
                                 "set": s, "draw": k, "row": rows, "loss": v}) for d, s, k, v in parts])
    got = transplant_summary(t, n_boot=100).set_index(["direction", "set"])
    assert got.loc[("base to finetuned", "late"), "share"] == pytest.approx(0.25)
    assert got.loc[("finetuned to base", "late"), "share"] == pytest.approx(0.5)       # half the gain undone
    assert got.loc[("base to finetuned", "random late"), "share"] == pytest.approx(0.1)  # mean over draws
    assert got.loc[("base to finetuned", "random late"), "draws"] == 2


def test_random_features_match_layers_and_counts_and_avoid_the_set():
    feats = [(1, 3), (1, 4), (2, 0)]
    got = random_features_like(feats, 10, feats, np.random.default_rng(0))
    assert sorted(l for l, _ in got) == [1, 1, 2]
    assert not set(got) & set(feats)


def _stats(fired):
    """UnitStats of one layer from a bool [rows, units] firing table."""
    fired = torch.as_tensor(fired)
    return UnitStats(fired=[fired], counts=[fired.sum(0)], means=[fired.float()], n_tokens=int(fired.shape[0]),
                     lengths=torch.full((fired.shape[0],), 5))


def test_weak_pair_gaps_separate_pairs_with_the_weak_language():
    rng = np.random.default_rng(1)
    shared = rng.random((60, 40)) < 0.2
    noise = rng.random((60, 40)) < 0.2
    stats = {"en": _stats(shared), "fr": _stats(shared), "zh": _stats(noise)}   # zh shares nothing
    weak, other = weak_pair_gaps(stats, "zh", [0], dense_fraction=0.9)
    assert other.mean() > 0.5 and abs(weak.mean()) < 0.1


def test_link_share_on_a_constructed_graph():
    from types import SimpleNamespace

    from mlclt_utils.diffing import link_share

    # four feature nodes (layer, pos, feature): two middle (layer 1), one late language feature
    # (layer 2, feature 7), one other late feature; then one logit node
    feats = torch.tensor([[1, 0, 3], [1, 1, 4], [2, 1, 7], [2, 1, 8]])
    adj = torch.zeros(5, 5)
    adj[2, 0], adj[2, 1] = 1.0, -2.0          # middle -> the language feature: |1| + |-2|
    adj[3, 0] = 4.0                           # middle -> another late feature
    adj[4, 2], adj[4, 3] = 0.5, 2.5           # features -> logit
    graph = SimpleNamespace(adjacency_matrix=adj, active_features=feats, selected_features=torch.arange(4),
                            logit_targets=[0])
    assert link_share(graph, [1], [(2, 7)]) == pytest.approx(3 / 10)
    assert link_share(graph, [1], [(2, 9)]) == 0.0                          # not in the graph


def _verses(effect_late, n=60, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(1, 0.2, n)
    parts = []
    for cond, shift in (("base", 0.0), ("weak", effect_late), ("mixture", 0.0), ("strong", 0.0)):
        parts.append(pd.DataFrame({"measure": "late", "condition": cond, "language": "fr", "row": np.arange(n),
                                   "value": base + shift + rng.normal(0, 0.02, n)}))
        for m, v in (("middle_weak", 0.1), ("middle_other", 0.3)):
            parts.append(pd.DataFrame({"measure": m, "condition": cond, "language": "fr", "row": np.arange(n),
                                       "value": v + rng.normal(0, 0.02, n)}))
    return pd.concat(parts, ignore_index=True)


def test_a5_verdicts_hold_for_a_planted_effect_and_fail_for_the_opposite():
    rows = {r["statistic"]: r for r in a5_verdicts(_verses(0.3), "fr", "s-en90", n_boot=200)}
    late = [r for s, r in rows.items() if s.startswith("late layers") and "minus base" in s][0]
    assert late["verdict"] == "holds" and late["counted"]
    static = [r for s, r in rows.items() if "minus the other pairs" in s][0]
    assert static["verdict"] == "holds"                                        # weak pairs overlap less
    middle = [r for s, r in rows.items() if s.startswith("middle layers") and "minus base" in s][0]
    assert middle["verdict"] == "inconclusive"                                 # nothing planted there
    early = [r for s, r in rows.items() if s.startswith("early layers")]
    assert early and not any(r["counted"] for r in early)                      # not measured: shown only
    opposite = [r for r in a5_verdicts(_verses(-0.3), "fr", "s-en90", n_boot=200)
                if r["statistic"].startswith("late layers") and "minus base" in r["statistic"]][0]
    assert opposite["verdict"] == "fails"


def test_finetune_stage_refuses_a_weak_language_the_base_model_never_saw(tmp_path):
    from conftest import micro_preset
    from mlclt_utils.stages import build

    p = micro_preset(**{"mixtures.english_shares": [0.0], "models.size_comparison_share": 0.0,
                        "diffing.weak_language": "en"})
    with pytest.raises(ValueError, match="diffing.weak_language 'en' is not a language the base model s-en0"):
        build("finetunes", p, "micro", "weak", tmp_path)
    assert not any(tmp_path.iterdir())                        # refused before any work


def test_diffing_stages_on_the_micro_chain(chain_copy):
    from conftest import RUN, micro_preset
    from mlclt_utils import stages
    from mlclt_utils.diffing import CLT_VARIANTS, VARIANTS

    p = micro_preset(**{"diffing.selection_rows": 8, "diffing.crosscoder_tokens": 512,
                        "diffing.crosscoder_train_tokens": 1024, "diffing.transplant_draws": 2,
                        "features.max_rows": 16, "features.bootstrap": 50})
    for v in VARIANTS:
        stages.build("finetunes", p, RUN, v, chain_copy, progress=False)
    base = stages.load("models", p, RUN, "s-en50", root=chain_copy)
    weak = stages.load("finetunes", p, RUN, "weak", root=chain_copy)
    choice = stages.load("finetunes", p, RUN, "weak", root=chain_copy, part="choice")
    assert (choice["weak"], choice["strong"]) == ("fr", "en")
    # the finetune started from the base weights and moved them
    diff = [float((a - b).detach().abs().max()) for a, b in zip(base.parameters(), weak.parameters())]
    assert 0 < max(diff) < 1
    for v in CLT_VARIANTS:
        stages.build("diff_clts", p, RUN, v, chain_copy, progress=False)
    clt = stages.load("clt", p, RUN, "s-en50", root=chain_copy)
    floor = stages.load("diff_clts", p, RUN, "floor", root=chain_copy)
    torch.testing.assert_close(floor.input_scale, clt.input_scale)         # scales kept
    torch.testing.assert_close(floor.output_scale, clt.output_scale)
    assert not torch.equal(floor.W_dec[0], clt.W_dec[0])
    stages.build("crosscoders", p, RUN, "s-en50", chain_copy, progress=False)
    stages.build("graphs", p, RUN, "s-en50", chain_copy, progress=False)
    stages.build("diffing", p, RUN, "s-en50", chain_copy, progress=False)
    out = stages.load("diffing", p, RUN, "s-en50", root=chain_copy)
    assert set(out["losses"]["variant"]) == {"base", *VARIANTS}
    assert set(out["verses"]["measure"]) >= {"late", "middle_weak", "middle_other"}
    early = out["selection"][(out["selection"]["part"] == "early") & (out["selection"]["language"] == "fr")]
    assert ("early" in set(out["verses"]["measure"])) == bool(early["features"].iloc[0] > 0)
    assert set(out["transplant"]["move"]) <= {"none", "decoders", "activations"}
    rows = a5_verdicts(out["verses"], out["weak"], "s-en50", n_boot=50, links=out["links"])
    assert {r["verdict"] for r in rows} <= {"holds", "fails", "inconclusive"}
    parts = {r["statistic"].split(":")[0] for r in rows}
    assert parts == {"late layers", "middle layers", "early layers", "links"}


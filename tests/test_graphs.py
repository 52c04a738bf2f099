"""Attribution graphs on a tiny random model and CLT: every checked edge equals the effect
of intervening on its source in the linearised replacement model (as circuit-tracer's own
tests check), and the tables the book reads off a graph."""

import pandas as pd
import pytest
import torch

from mlclt_utils.graphs import attribution as A
from mlclt_utils.graphs.circuit_tracer import build_replacement_model

from test_clt_formats import BOS, L, tiny_clt, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
TOKENS = torch.tensor([BOS, 5, 9, 7, 11, 30, 6, 8])


@pytest.fixture(scope="module")
def replacement():
    torch.manual_seed(0)
    model, clt = tiny_model(), tiny_clt()
    rm = build_replacement_model(model, clt, tokenizer=tiny_tokenizer())
    yield rm
    rm.reset_hooks(including_permanent=True)


def test_each_feature_edge_is_the_effect_of_intervening_on_its_source(replacement):
    rm = replacement
    graph = A.graph_for_prompt(rm, TOKENS, target=None)
    feats = graph.active_features
    n = feats.shape[0]
    assert n > 0
    logits, acts = rm.get_activations(TOKENS, apply_activation_function=False)
    targets = graph.logit_token_ids
    before = acts[feats[:, 0], feats[:, 1], feats[:, 2]]
    before_logits = logits[0, -1, targets] - logits[0, -1].mean()
    g = torch.Generator().manual_seed(0)
    for node in torch.randperm(n, generator=g)[:12].tolist():
        layer, pos, f = feats[node].tolist()
        new_logits, new_acts = rm.feature_intervention(
            TOKENS, [(layer, pos, f, acts[layer, pos, f] * 2)],
            constrained_layers=range(rm.cfg.n_layers), apply_activation_function=False)
        effect = graph.adjacency_matrix[:, node]
        after = new_acts[feats[:, 0], feats[:, 1], feats[:, 2]]
        torch.testing.assert_close(after - before, effect[:n], atol=5e-4, rtol=1e-4)
        after_logits = new_logits[0, -1, targets] - new_logits[0, -1].mean()
        torch.testing.assert_close(after_logits - before_logits, effect[-len(targets):],
                                   atol=1e-4, rtol=1e-3)


def test_graph_tables_and_scores(replacement):
    graph = A.graph_for_prompt(replacement, TOKENS, target=7)
    assert graph.logit_token_ids.tolist() == [7]
    scores = A.graph_scores(graph)
    assert 0 <= scores["replacement"] <= 1 and 0 <= scores["completeness"] <= 1
    nodes, edges = A.pruned_graph(graph)
    assert set(nodes["kind"]) <= {"feature", "error", "token", "logit"}
    assert (nodes["kind"] == "token").sum() == len(TOKENS) and (nodes["kind"] == "logit").sum() == 1
    feats = nodes[nodes["kind"] == "feature"]
    assert feats["layer"].between(0, L - 1).all() and (feats["activation"] > 0).all()
    assert nodes.loc[nodes["kind"] != "logit", "influence"].sum() <= 1 + 1e-6
    assert set(edges["source"]) | set(edges["target"]) <= set(nodes["node"])
    adj = graph.adjacency_matrix
    for _, e in edges.head(20).iterrows():
        assert e["weight"] == pytest.approx(float(adj[int(e["target"]), int(e["source"])]))
    logit = int(nodes.loc[nodes["kind"] == "logit", "node"].iloc[0])
    assert (edges["target"] == logit).any()              # something reaches the target
    with pytest.raises(ValueError, match="outside the vocabulary"):
        A.graph_for_prompt(replacement, TOKENS, target=10_000)
    with pytest.raises(ValueError, match="at least one token"):
        A.graph_for_prompt(replacement, TOKENS[:1])


def test_the_language_target_is_the_answer_minus_its_mean_over_languages(replacement):
    model = tiny_model()
    t = A.language_target(model, {"en": 5, "fr": 9, "de": 11}, "fr")
    W = model.W_U.detach()
    torch.testing.assert_close(t.vec, W[:, 9] - (W[:, 5] + W[:, 9] + W[:, 11]) / 3)
    graph = A.graph_for_prompt(replacement, TOKENS, target=t)
    assert graph.adjacency_matrix.shape[0] == graph.adjacency_matrix.shape[1]
    with pytest.raises(ValueError, match="'zh'"):
        A.language_target(model, {"en": 5, "fr": 9}, "zh")


def test_shared_features_by_layer_on_constructed_graphs():
    def nodes(rows):
        return pd.DataFrame([("feature", l, 0, f, 1.0, w) for l, f, w in rows],
                            columns=["kind", "layer", "position", "feature", "activation", "influence"])

    out = A.shared_features({"en": nodes([(0, 1, 0.3), (0, 2, 0.1), (1, 5, 0.6)]),
                             "fr": nodes([(0, 1, 0.2), (1, 6, 0.5), (1, 5, 0.5)])}).set_index("layer")
    assert out.loc[0, "shared"] == 1 and out.loc[1, "shared"] == 1
    assert out.loc[0, "shared influence en"] == pytest.approx(0.75)
    assert out.loc[0, "shared influence fr"] == pytest.approx(1.0)
    assert out.loc[1, "shared influence fr"] == pytest.approx(0.5)
    assert out.loc[0, "pair influence en"] == pytest.approx(0.75)
    three = A.shared_features({"en": nodes([(0, 1, 0.5), (0, 2, 0.5)]), "fr": nodes([(0, 1, 1.0)]),
                               "de": nodes([(0, 2, 1.0)])}).set_index("layer")
    assert three.loc[0, "shared"] == 0 and three.loc[0, "pair influence en"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two languages"):
        A.shared_features({"en": nodes([(0, 1, 1.0)])})


def test_influence_share_and_shared_features_over_concepts():
    nodes = pd.DataFrame([("feature", 0, 0, 1, 1.0, 0.2), ("feature", 1, 2, 4, 1.0, 0.6),
                          ("error", 0, 1, -1, float("nan"), 0.5)],
                         columns=["kind", "layer", "position", "feature", "activation", "influence"])
    assert A.influence_share(nodes, [(1, 4)]) == pytest.approx(0.75)
    assert A.influence_share(nodes, []) == 0.0
    both = pd.concat([nodes.assign(prompt_id=0), nodes.assign(prompt_id=1)]).assign(graph="logit")
    prompts = pd.DataFrame({"prompt_id": [0, 1], "concept": ["God", "God"], "language": ["en", "fr"]})
    out = A.shared_by_concept(both, prompts)
    assert set(out["language"]) == {"en", "fr"} and (out["shared influence"] == 1.0).all()
    # the control pairs a concept's first language with another concept's graphs
    other = nodes.assign(feature=[7, 8, -1])                  # no feature in common with the first
    four = pd.concat([both, other.assign(prompt_id=2, graph="logit"), other.assign(prompt_id=3, graph="logit")])
    two = pd.DataFrame({"prompt_id": [0, 1, 2, 3], "concept": ["God", "God", "king", "king"],
                        "language": ["en", "fr", "en", "fr"]})
    ctl = A.shared_by_concept(four, two, control=True)
    assert (ctl["shared influence"] == 0.0).all() and set(ctl["concept"]) == {"God", "king"}


def test_attribution_benchmark_sets_the_asked_sparsity_and_times_a_graph():
    from mlclt_utils.bench.attribution import _one

    row = _one("tiny", batch_size=64, tokens=12, l0=5.0, repeats=2)
    # thresholds at the (1 - l0/F) quantile of the prompt's pre-activations: about l0 per
    # token and layer fire, positions after BOS only
    per_token = row["active_features"] / (row["n_layers"] * (row["tokens"] - 1))
    assert 2.0 <= per_token <= 8.0
    assert row["seconds_per_graph"] > 0 and row["seconds_single"] > 0 and row["peak_rss_mb"] > 0


def test_shared_profile_row_on_planted_concepts():
    import pandas as pd

    from mlclt_utils.graphs.attribution import shared_profile_row

    rows = [{"concept": c, "layer": l, "language": lang, "shared influence": v}
            for c in range(8) for lang in ("en", "fr") for l, v in enumerate([0.1, 0.5 + 0.01 * c, 0.45, 0.1])]
    row = shared_profile_row(pd.DataFrame(rows), 4, "m", n_boot=200)
    assert row["verdict"] == "holds" and row["n_units"] == 8 and not row["counted"]
    assert row["estimate"] == pytest.approx((0.535 + 0.45) / 2 - 0.1)
    assert shared_profile_row(pd.DataFrame(rows), 2, "m") is None


def test_language_share_sentence_says_more_or_less_only_when_the_interval_does():
    import pandas as pd

    from mlclt_utils.graphs.attribution import language_share_sentence

    def share(vector, logit):
        return pd.DataFrame({"language-vector graph": vector, "answer-logit graph": logit})

    assert "matter more" in language_share_sentence(share([0.30, 0.32, 0.35, 0.31], [0.10, 0.12, 0.11, 0.09]))
    assert "matter less" in language_share_sentence(share([0.10, 0.12, 0.11, 0.09], [0.30, 0.32, 0.35, 0.31]))
    # a higher mean that the interval cannot separate from zero is not called "more"
    mixed = language_share_sentence(share([0.30, 0.05, 0.40, 0.02], [0.10, 0.20, 0.15, 0.12]))
    assert "does not tell the two apart" in mixed and "more" not in mixed.split(":")[-1]
    assert "too few" in language_share_sentence(share([0.3], [0.1]))

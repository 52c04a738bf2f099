"""Explorable views: circuitsvis with its bundled script and a fallback, and the feature
explorer's cards on a tiny random model."""

import re

import pytest
import torch

from mlclt_utils.viz import explore
from mlclt_utils.viz.progress import PLAIN_ENV

from test_chain import fetched_from_network
from test_clt_eval import eval_tokens
from test_clt_formats import V, tiny_clt, tiny_model


def test_circuitsvis_view_inlines_its_script_and_keeps_a_fallback_outside_the_view():
    tokens = [["a", "b", "c"], ["d", "e"]]
    acts = [torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]]), torch.zeros(2, 2)]
    page = explore.token_activation_view(tokens, acts, ["f1", "f2"], fallback_html="<p>FALLBACK</p>")
    assert "CircuitsVis.render" in page and len(page) > 1_000_000      # the bundled script
    assert "unpkg.com" not in page and fetched_from_network(page) == []
    mount = re.search(r'<div id="(circuits-vis-[^"]+)"[^>]*></div>', page)
    assert mount, "the view's mount point must be closed"
    fallback = page.index("FALLBACK")
    assert fallback > mount.end()                  # not inside the view's container
    fid = re.search(r'id="(mlclt-fallback-[0-9a-f]+)"', page).group(1)
    assert f'document.getElementById("{fid}").remove()' in page
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        explore.token_activation_view(tokens, [torch.zeros(2, 2), torch.zeros(2, 2)], ["f1", "f2"])
    with pytest.raises(TypeError, match="RenderedHTML"):
        explore.circuitsvis_view("<p>not a view</p>", "")


def _explorer_model():
    model, clt = tiny_model(), tiny_clt()
    rows = {"en": eval_tokens(4, seed=1), "fr": eval_tokens(4, seed=2)}
    labels = ["special"] * 4 + ["en" if i % 2 else "fr" for i in range(4, V)]
    keys = [f"Gen 1:{i + 1}" for i in range(4)]
    return explore.ExplorerModel(model, clt, rows, keys, labels)


def test_feature_card_shows_the_top_verse_its_lift_and_an_inline_histogram():
    m = _explorer_model()
    layer = 1
    busiest = max(range(m.clt.cfg.d_features),
                  key=lambda f: sum(int((a > 0).sum()) for a in m.activations(layer, f).values()))
    acts = m.activations(layer, busiest)
    top_row = int(acts["en"].max(1).values.argmax())
    card = explore.feature_card(m, layer, busiest, k=1, languages=["en", "fr"])
    assert f"Gen 1:{top_row + 1}" in card                   # the verse where it fires most
    assert "en (English): <b>" in card and "fr (French): <b>" in card
    assert 'src="data:image/png;base64,' in card and fetched_from_network(card) == []
    assert "<mark" in card
    with pytest.raises(ValueError, match="feature 999"):
        explore.feature_card(m, layer, 999)
    with pytest.raises(ValueError, match="layer 7"):
        explore.feature_card(m, 7, 0)


def test_explorer_draws_static_cards_in_the_book(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    monkeypatch.setenv(PLAIN_ENV, "1")
    ex = explore.FeatureExplorer({"tiny": _explorer_model()}, languages=["en", "fr"], k=1)
    ex.show([("tiny", 0, 1, "first card"), ("tiny", 1, 2, "second card")])
    assert len(shown) == 1
    page = shown[0].data
    assert "first card" in page and "second card" in page
    with pytest.raises(ValueError, match="'other'"):
        ex.card("other", 0, 0)


def test_explorer_widget_lists_the_suggested_features_of_the_chosen_layer():
    pytest.importorskip("ipywidgets")
    import pandas as pd

    m = _explorer_model()
    m.suggested = pd.DataFrame({"layer": [0, 1, 1], "feature": [3, 5, 6], "top_language": ["en", "fr", "en"]})
    ex = explore.FeatureExplorer({"tiny": m}, k=1)
    form = ex.widget(layer=1)
    (model_box, layer_box), (suggested, feature) = (c.children for c in form.children[:2])
    assert [v for _, v in suggested.options] == [5, 6] and feature.value == 5
    layer_box.value = 0
    assert [v for _, v in suggested.options] == [3]


def test_the_book_shows_each_languages_most_frequent_language_feature():
    import pandas as pd

    m = _explorer_model()
    m.suggested = pd.DataFrame({"layer": [1, 1, 0, 0], "feature": [5, 6, 3, 4],
                                "top_language": ["en", "en", "fr", "fr"],
                                "frequency": [0.1, 0.3, 0.2, 0.5]})
    ex = explore.FeatureExplorer({"tiny": m}, languages=["fr", "en"])
    picks = [(layer, f) for _, layer, f, _ in ex.language_feature_choices("tiny")]
    assert picks == [(0, 4), (1, 6)]     # none at the last layer: each language's latest one
    m.suggested = m.suggested.iloc[:0]
    (_, layer, f, title), = ex.language_feature_choices("tiny")
    last = m.clt.cfg.n_layers - 1

    def fired(g):
        return sum(int((a > 0).sum()) for a in m.activations(last, g).values())

    assert layer == last and all(fired(f) >= fired(g) for g in range(m.clt.cfg.d_features))

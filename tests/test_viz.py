"""The presentation layer: tables, figure conventions, multilingual text."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mlclt_utils.models.load import is_degenerate  # noqa: E402
from mlclt_utils.viz.style import language_colour, language_order, zoom_to_data  # noqa: E402
from mlclt_utils.viz.table import format_number, table  # noqa: E402
from mlclt_utils.viz.text import context_html, trim_to_words  # noqa: E402


@pytest.mark.parametrize("value, text", [(0.045348, "0.0453"), (284.774129, "285"), (12800, "12,800"),
                                         (5.7215, "5.72"), (0.0, "0"), (float("nan"), "–"),
                                         (True, "yes"), (123456.7, "123,457")])
def test_numbers_keep_three_significant_digits(value, text):
    assert format_number(value) == text


def test_table_drops_row_numbers_and_constant_columns_and_names_headers():
    df = pd.DataFrame({"language": ["en", "fr"], "ce_recovered": [0.951234, 0.9],
                       "split": ["all", "all"]}, index=[10, 11])
    html = table(df)._repr_html_()
    assert "CE recovered" in html and "ce_recovered" not in html
    assert ">10<" not in html and ">11<" not in html                 # no meaningless index
    assert "<th>split</th>" not in html and "In every row: split = all." in html
    assert '<td class="num">0.951</td>' in html
    assert '<td class="key">en</td>' in html                          # key columns never wrap


def test_wide_tables_are_split_and_repeat_their_key_columns():
    df = pd.DataFrame({"model": ["s-en50", "s-en90", "m-en50", "m-en90"],
                       **{f"measurement_{i}": [1.5, 2.5, 3.5, 4.5 + i] for i in range(12)}})
    parts = table(df).parts
    assert len(parts) > 1 and all("<th>model</th>" in p for p in parts)


def test_few_rows_of_many_columns_are_transposed():
    df = pd.DataFrame({f"measurement_{i}": [1.5 + i] for i in range(12)})
    html = table(df)._repr_html_()
    assert html.count("<tr>") == 13                                   # header + one row per column


def test_shared_colour_scale_spans_its_columns():
    df = pd.DataFrame({"en": [4.0, 5.0], "fr": [6.0, 7.0], "gap": [1.0, 2.0]})
    html = table(df, colour={("en", "fr"): "viridis", "gap": "magma"})._repr_html_()
    cells = [c for c in html.split("<td")[1:]]
    en_low, fr_high = cells[0], cells[4]
    assert en_low.split("background-color:")[1][:7] != fr_high.split("background-color:")[1][:7]


def test_contexts_are_marked_escaped_and_directional():
    out = context_html("قال [[الرب]] <b>")
    assert '<mark class="mlclt-token">الرب</mark>' in out and 'dir="auto"' in out
    assert "&lt;b&gt;" in out and "[[" not in out


def test_continuations_end_on_a_whole_word():
    assert trim_to_words("and the LORD, and the LO", "en") == "and the LORD, and the …"
    assert trim_to_words("我我我", "zh") == "我我我"


def test_degenerate_continuations():
    assert is_degenerate("and the LORD, and the LORD, and the LORD, and the", "en")
    assert is_degenerate("，我，我，我，我，我，我", "zh") and is_degenerate("..", "fr")
    assert not is_degenerate("Now the word of the LORD came unto Jonah", "en")


def test_language_colours_are_fixed_distinct_and_ordered_by_the_book():
    paper = ["en", "fr", "de", "ar", "zh"]
    assert len({language_colour(c) for c in paper}) == 5
    assert language_colour("fr") == language_colour("fr")
    assert language_order(["zh", "en", "xx", "fr"], paper) == ["en", "fr", "zh", "xx"]


def test_axes_zoom_only_when_values_sit_in_a_narrow_band():
    fig, ax = plt.subplots()
    ax.bar(range(3), [0.97, 0.98, 0.99])
    assert zoom_to_data(ax, [0.97, 0.98, 0.99]) and ax.get_ylim()[0] > 0.9
    fig2, ax2 = plt.subplots()
    assert not zoom_to_data(ax2, [0.1, 0.5, 0.9])
    plt.close("all")


def test_loss_curves_leave_no_empty_panel():
    from mlclt_utils.viz.figures import loss_curves

    df = pd.DataFrame({"tokens": [1, 10, 100], "train_loss": [5.0, 4.0, 3.0],
                       "val_loss_en": [5.5, 4.5, 3.5], "val_loss_fr": [5.6, 4.6, 3.6]})
    for n in (1, 2, 3):
        fig = loss_curves({f"m{i}": df for i in range(n)}, ["en", "fr"])
        shown = [a for a in fig.axes if a.get_visible()]
        assert all(a.lines or a.get_legend() for a in shown)
        assert len(shown) == n + (n % 2 if n > 1 else 0)
        assert sum(a.get_legend() is not None for a in shown) + len(fig.legends) == 1
        plt.close(fig)


def _graph(n_features=30, seed=0):
    """A graph of 3 layers over 6 positions: ``n_features`` features (influence falling with
    their id), one error node, six tokens and a target, edges from tokens to features and
    from features to the target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = [(i, "feature", i % 3, 2 + i % 4, 100 + i, 1.0, 1.0 / (1 + i)) for i in range(n_features)]
    rows.append((n_features, "error", 1, 5, -1, float("nan"), 0.05))
    tokens = list(range(n_features + 1, n_features + 7))
    rows += [(t, "token", -1, j, -1, float("nan"), 0.1) for j, t in enumerate(tokens)]
    target = n_features + 7
    rows.append((target, "logit", 3, 5, -1, float("nan"), float("nan")))
    nodes = pd.DataFrame(rows, columns=["node", "kind", "layer", "position", "feature", "activation", "influence"])
    src = [tokens[i % 6] for i in range(n_features)] + list(range(n_features))
    dst = list(range(n_features)) + [target] * n_features
    edges = pd.DataFrame({"source": src, "target": dst, "weight": rng.normal(size=len(src))})
    return nodes, edges


def test_graph_figure_caps_nodes_labels_the_top_features_and_explains_its_colours():
    import numpy as np
    from matplotlib.collections import PathCollection
    from matplotlib.colors import to_rgb

    from mlclt_utils.viz.figures import SHARED_COLOUR, graph_figure

    graphs = []
    for seed, lang in enumerate(("en", "ja")):
        nodes, edges = _graph(seed=seed)
        graphs.append({"nodes": nodes, "edges": edges, "tokens": [f"t{i}" for i in range(6)], "title": lang})
    labels = {(i % 3, 100 + i): f"↑ word{i}" for i in range(30)}
    fig = graph_figure(graphs, labels, shared={(0, 100), (1, 101)}, language_features={(2, 102): "fr"},
                       max_nodes=8, max_edges=20, labelled=4)
    drawn = [a for a in fig.axes if a.get_visible()]
    assert len(drawn) == 2
    for ax in drawn:
        circles = [c for c in ax.collections if isinstance(c, PathCollection)
                   and c.get_paths() and len(c.get_paths()[0].vertices) > 20]      # circle markers
        assert 0 < len(circles) <= 8                                                # the node cap
        texts = [t.get_text() for t in ax.texts]
        assert texts[:4] == ["1", "2", "3", "4"]                                    # top features, numbered
        key = texts[4].splitlines()                                                 # ... and listed
        assert len(key) == 4 and key[0] == "1  L0/100  ↑ word0"
        assert 0 < len(ax.lines) <= 20                                              # the edge cap
        colours = {tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in ax.collections if len(c.get_facecolor())}
        assert tuple(np.round(to_rgb(SHARED_COLOUR), 3)) in colours
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "feature shared with the other languages" in legend and "fr (French) language feature" in legend
    assert "edge raises its target" in legend and "edge lowers its target" in legend
    plt.close(fig)
    with pytest.raises(ValueError, match="no graph"):
        graph_figure([])


def test_long_tables_fold_and_short_ones_do_not():
    long = table(pd.DataFrame({"verse": range(30), "score": np.linspace(0, 1, 30)}), caption="per verse")
    html = long._repr_html_()
    assert html.startswith('<details class="mlclt-fold">') and "Show the table (30 rows: per verse)" in html
    assert "<table" in html and html.endswith("</details>")
    short = table(pd.DataFrame({"verse": range(5), "score": np.linspace(0, 1, 5)}))._repr_html_()
    assert "<details" not in short and "<table" in short
    assert "<details" not in table(pd.DataFrame({"v": range(30)}), fold=None)._repr_html_()


def test_intervals_stay_on_one_line_and_long_text_wraps():
    df = pd.DataFrame({"layer": [0, 1],
                       "change [95% CI]": ["+0.012 [+0.003, +0.021]", "-0.100 [-0.200, +0.021]"],
                       "verse": ["In the beginning God created the heaven and the earth.",
                                 "And the earth was without form, and void; and darkness."]})
    html = table(df)._repr_html_()
    assert '<td class="num">+0.012 [+0.003, +0.021]</td>' in html          # nowrap, like a number
    assert '<td class="text" dir="auto">In the beginning' in html          # wraps, whatever the dtype

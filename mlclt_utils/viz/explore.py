"""Views a reader explores rather than reads, each with a static fallback.

* ``FeatureExplorer``: pick a model, a layer and a CLT feature and see its top verses per
  language, the histogram of its activations per language and the logit lift of its
  decoder per language. In a live notebook it is an ipywidgets form; in the book (the
  chapters the runner executes, see ``static_output``) the same view is drawn for a few
  chosen features as plain HTML with an inline image, since widgets need a kernel and
  scripts from the network.
* ``circuitsvis_view``: a circuitsvis component drawn with the script bundled in the
  circuitsvis package (``local_src``, about 1.3 MB, chosen explicitly: its default picks the
  CDN when the machine is online, and the built book must fetch nothing). A static HTML
  fallback sits next to it and is removed by a script once the view is drawn, so a reader
  whose viewer runs no scripts (GitHub, nbviewer) still sees the content.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .progress import PLAIN_ENV
from .style import language_colour, language_label, language_order
from .text import context_html


def static_output() -> bool:
    """True in the chapters the runner executes for the book: show the static fallback."""
    return bool(os.environ.get(PLAIN_ENV))


# ---------------------------------------------------------------------- circuitsvis -----

def circuitsvis_view(view, fallback_html: str) -> str:
    """HTML of a circuitsvis view (``circuitsvis.activations.text_neuron_activations(...)``
    and the like) with its bundled script inlined, plus ``fallback_html`` shown until the
    view has been drawn (and for good where scripts do not run)."""
    src = getattr(view, "local_src", None)
    if not isinstance(src, str) or "<script" not in src:
        raise TypeError(f"expected a circuitsvis RenderedHTML, got {type(view).__name__}")
    fid = "mlclt-fallback-" + uuid.uuid4().hex[:12]
    # circuitsvis writes its mount point as '<div id=.../>', which HTML reads as an open
    # tag: close it so the fallback is not swallowed into the view's container
    src = re.sub(r'(<div id="circuits-vis-[^"]+"[^>]*?)/>', r"\1></div>", src, count=1)
    return (f'<div class="mlclt-interactive">{src}'
            f'<div id="{fid}" class="mlclt-fallback">{fallback_html}</div>'
            f'<script type="module">document.getElementById("{fid}").remove();</script></div>')


def token_activation_view(tokens: Sequence[Sequence[str]], activations: Sequence[Tensor],
                          unit_labels: Sequence[str], fallback_html: str = "",
                          group_label: str = "-") -> str:
    """The activations of several units over several texts, one text per sample: the reader
    picks a unit and a text and sees every token shaded by its activation
    (circuitsvis ``text_neuron_activations``). ``activations``: per sample a
    [tokens, units] tensor."""
    from circuitsvis.activations import text_neuron_activations

    if len(tokens) != len(activations):
        raise ValueError(f"{len(tokens)} token lists but {len(activations)} activation arrays")
    acts = []
    for toks, a in zip(tokens, activations):
        a = torch.as_tensor(a, dtype=torch.float32)
        if a.ndim != 2 or a.shape != (len(toks), len(unit_labels)):
            raise ValueError(f"activations must be [tokens, units] = ({len(toks)}, {len(unit_labels)}), "
                             f"got {tuple(a.shape)}")
        acts.append(a[:, None, :].numpy())                      # [tokens, 1 layer, units]
    view = text_neuron_activations(tokens=[list(t) for t in tokens], activations=acts,
                                   first_dimension_name="layer", second_dimension_name="feature",
                                   first_dimension_labels=[group_label],
                                   second_dimension_labels=list(unit_labels))
    return circuitsvis_view(view, fallback_html)


# ---------------------------------------------------------------- feature explorer -----

@dataclass
class ExplorerModel:
    """What the explorer needs of one model: the model and its CLT, the parallel rows per
    language (token rows, one verse each) with their keys, the token-language table (for the
    decoder lift) and the features to offer first (a DataFrame with layer, feature and
    top_language, such as chapter 05's language features)."""

    model: object
    clt: object
    rows: Mapping[str, Tensor]
    keys: Sequence[str]
    token_languages: object
    suggested: object = None
    _cache: dict = field(default_factory=dict, repr=False)

    def activations(self, layer: int, feature: int) -> dict[str, Tensor]:
        from ..features.examples import feature_activations

        key = (layer, feature)
        if key not in self._cache:
            self._cache[key] = {lang: feature_activations(self.model, self.clt, rows, layer, feature)
                                for lang, rows in self.rows.items()}
        return self._cache[key]


def _check_choice(m: ExplorerModel, layer: int, feature: int) -> None:
    n_layers, n_features = m.clt.cfg.n_layers, m.clt.cfg.d_features
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range; the CLT has layers 0..{n_layers - 1}")
    if not 0 <= feature < n_features:
        raise ValueError(f"feature {feature} is out of range; layer {layer} has features 0..{n_features - 1}")


def _histogram_png(acts: Mapping[str, Tensor], order: Sequence[str]) -> str:
    import matplotlib.pyplot as plt

    from .style import TEXT_WIDTH

    fig, ax = plt.subplots(figsize=(TEXT_WIDTH, 2.3))
    fired = {lang: a[a > 0].numpy() for lang, a in acts.items()}
    top = max((float(v.max()) for v in fired.values() if v.size), default=1.0)
    bins = torch.linspace(0, top, 31).numpy()
    for lang in order:
        v = fired[lang]
        if v.size:
            ax.hist(v, bins=bins, histtype="step", lw=1.6, color=language_colour(lang),
                    label=f"{lang}: fires on {v.size} tokens")
        else:
            ax.plot([], [], color=language_colour(lang), label=f"{lang}: never fires")
    ax.set_xlabel("activation where the feature fires")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def feature_card(m: ExplorerModel, layer: int, feature: int, k: int = 2, title: str = "",
                 languages: Sequence[str] | None = None) -> str:
    """HTML of one feature: a header, the logit lift of its decoder per language, the
    histogram of its activations per language and its top ``k`` verses per language."""
    from ..features.examples import top_activating_examples
    from ..features.lift import clt_decoder_directions, logit_lift, token_labels

    _check_choice(m, layer, feature)
    order = language_order(m.rows, languages or list(m.rows))
    acts = m.activations(layer, feature)
    ex = top_activating_examples(m.model, m.clt, m.rows, layer, feature, k=k, window=None,
                                 after=None, activations=acts)
    labelled = [lang for lang in order if lang in set(token_labels(m.token_languages))]
    lift_cells = ""
    if labelled:
        lift = logit_lift(clt_decoder_directions(m.clt, layer, [feature])[0], m.model,
                          m.token_languages, languages=labelled)
        lift_cells = "".join(f"<td>{language_label(lang)}: <b>{lift[lang]:+.2f}</b></td>" for lang in labelled)
    firing = " · ".join(f"{lang} {float((acts[lang] > 0).float().sum() / max(1, _n_tokens(m.rows[lang]))):.1%}"
                        for lang in order)
    head = html.escape(title or f"layer {layer}, feature {feature}")
    rank = {lang: i for i, lang in enumerate(order)}
    ex = ex.assign(_rank=ex["language"].map(rank)).sort_values(["_rank", "activation"],
                                                               ascending=[True, False])
    rows_html = []
    for _, r in ex.iterrows():
        key = html.escape(str(m.keys[int(r["row"])])) if m.keys else str(int(r["row"]))
        rows_html.append(f"<tr><td>{html.escape(language_label(r['language']))}</td>"
                         f"<td>{r['activation']:.2f}</td><td>{key}</td>"
                         f"<td class=\"mlclt-text\">{context_html(r['context'])}</td></tr>")
    verses = ("<table class=\"mlclt-table\"><thead><tr><th>language</th><th>activation</th>"
              "<th>verse</th><th>verse text, the token where it fires most marked</th></tr></thead>"
              f"<tbody>{''.join(rows_html)}</tbody></table>" if rows_html
              else "<p>The feature does not fire on these verses.</p>")
    png = _histogram_png(acts, order)
    return (f'<div class="mlclt-card"><h4>{head}</h4>'
            f"<p>Share of tokens where it fires: {html.escape(firing)}</p>"
            + (f"<p>Decoder lift on each language's tokens (logits):</p><table class=\"mlclt-table\"><tr>{lift_cells}</tr></table>"
               if lift_cells else "")
            + f'<img alt="activation histogram per language" src="data:image/png;base64,{png}"/>'
            + verses + "</div>")


def _n_tokens(rows: Tensor) -> int:
    from ..features.activations import kept_positions

    return int(kept_positions(rows).sum())


class FeatureExplorer:
    """model, layer, feature -> top verses per language, activation histogram, decoder lift.

    ``models``: name -> ``ExplorerModel``. ``show()`` draws the ipywidgets form in a live
    notebook and, where there is no kernel to answer it (the book), the static cards of
    ``static_choices`` [(model, layer, feature, title)]."""

    def __init__(self, models: Mapping[str, ExplorerModel], languages: Sequence[str] | None = None,
                 k: int = 2):
        if not models:
            raise ValueError("the explorer needs at least one model")
        self.models = dict(models)
        self.languages = languages
        self.k = k

    def card(self, model: str, layer: int, feature: int, title: str = "") -> str:
        if model not in self.models:
            raise ValueError(f"model {model!r} is not in the explorer; choose one of {list(self.models)}")
        return feature_card(self.models[model], layer, feature, self.k, title, self.languages)

    def _feature_options(self, model: str, layer: int) -> list[tuple[str, int]]:
        s = self.models[model].suggested
        if s is None or len(s) == 0:
            return []
        s = s[s["layer"] == layer]
        return [(f"{int(r['feature'])} · {r['top_language']} language feature", int(r["feature"]))
                for _, r in s.iterrows()]

    def widget(self, model: str | None = None, layer: int | None = None, feature: int | None = None):
        import ipywidgets as w

        model = model or next(iter(self.models))
        n_layers = self.models[model].clt.cfg.n_layers
        layer = n_layers - 1 if layer is None else layer
        m_box = w.Dropdown(options=list(self.models), value=model, description="model")
        l_box = w.Dropdown(options=list(range(n_layers)), value=layer, description="layer")
        f_list = w.Dropdown(options=self._feature_options(model, layer), description="suggested")
        f_box = w.BoundedIntText(value=feature or 0, min=0,
                                 max=self.models[model].clt.cfg.d_features - 1, description="feature")
        out = w.Output()

        def redraw(*_):
            from IPython.display import HTML, display

            out.clear_output(wait=True)
            with out:
                display(HTML(self.card(m_box.value, l_box.value, f_box.value)))

        def pick(change):
            if change["new"] is not None:
                f_box.value = change["new"]

        def relist(*_):
            m = self.models[m_box.value]
            l_box.options = list(range(m.clt.cfg.n_layers))
            f_box.max = m.clt.cfg.d_features - 1
            f_list.options = self._feature_options(m_box.value, l_box.value)

        m_box.observe(relist, "value")
        l_box.observe(relist, "value")
        f_list.observe(pick, "value")
        f_box.observe(redraw, "value")
        m_box.observe(redraw, "value")
        l_box.observe(redraw, "value")
        if feature is None and f_list.options:
            f_box.value = f_list.options[0][1]
        redraw()
        return w.VBox([w.HBox([m_box, l_box]), w.HBox([f_list, f_box]), out])

    def language_feature_choices(self, model: str, layer: int | None = None,
                                 max_rows: int = 64) -> list[tuple[str, int, int, str]]:
        """Cards worth showing in the book: per language its most frequent language feature of
        ``layer`` (default: the last), or of its latest layer that has one. Without any
        language feature, the feature of ``layer`` that fires on the most tokens of the first
        ``max_rows`` rows of every language."""
        from ..features.activations import CLTFeatures, collect_unit_stats

        m = self.models[model]
        layer = m.clt.cfg.n_layers - 1 if layer is None else layer
        s = m.suggested
        choices = []
        if s is not None and len(s):
            for lang in language_order(s["top_language"].unique(), self.languages or []):
                mine = s[s["top_language"] == lang]
                at = mine[mine["layer"] == layer] if (mine["layer"] == layer).any() else \
                    mine[mine["layer"] == mine["layer"].max()]
                best = at.sort_values("frequency", ascending=False).iloc[0]
                choices.append((model, int(best["layer"]), int(best["feature"]),
                                f"{model}, layer {int(best['layer'])}, feature {int(best['feature'])}: "
                                f"language feature of {language_label(lang)}"))
        if not choices:
            source = CLTFeatures(m.model, m.clt)
            counts = sum(collect_unit_stats(source, rows[:max_rows]).counts[layer] for rows in m.rows.values())
            f = int(counts.argmax())
            choices.append((model, layer, f, f"{model}, layer {layer}, feature {f}: the feature that "
                                             "fires most often (this run has no language feature)"))
        return choices

    def show(self, static_choices: Sequence[tuple[str, int, int, str]]):
        """Display the explorer: the widget form in a live notebook, else the static cards."""
        from IPython.display import HTML, display

        if not static_output():
            try:
                import ipywidgets  # noqa: F401
                from IPython import get_ipython

                if get_ipython() is not None and getattr(get_ipython(), "kernel", None) is not None:
                    first = static_choices[0] if static_choices else (None, None, None, "")
                    display(self.widget(*first[:3]))
                    return
            except ImportError:
                pass
        display(HTML("".join(self.card(*c) for c in static_choices)))


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token of ``ids`` for display: with a fast tokenizer, cut from the
    decoded text by character offsets, so the byte pieces of one character (common in
    Chinese) show that character once instead of replacement characters."""
    ids = [int(i) for i in ids]
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.decode(ids)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if enc["input_ids"] == ids:
            out, seen = [], 0
            for a, b in enc["offset_mapping"]:
                out.append(text[max(a, seen):b])
                seen = max(seen, b)
            return out
    return [tokenizer.decode([i]) for i in ids]


def features_over_verses(m: ExplorerModel, layer: int, features: Sequence[int],
                         labels: Sequence[str], verses_per_language: int = 2,
                         languages: Sequence[str] | None = None) -> str:
    """A circuitsvis view of ``features`` (of ``layer``) over the first verses of every
    language: the reader picks a feature and a verse and sees each token shaded by the
    feature's activation. The fallback lists the verses as text."""
    from ..features.activations import kept_positions

    tok = m.model.tokenizer
    order = language_order(m.rows, languages or list(m.rows))
    samples, acts, fallback = [], [], []
    per_feature = {f: m.activations(layer, f) for f in features}
    for lang in order:
        rows = m.rows[lang][:verses_per_language]
        keep = kept_positions(rows)
        for r in range(rows.shape[0]):
            ids = rows[r][keep[r]].tolist()
            if not ids:
                continue
            samples.append(token_texts(tok, ids))
            acts.append(torch.stack([per_feature[f][lang][r][keep[r]] for f in features], dim=1))
            fallback.append(f"<li>{html.escape(language_label(lang))}, {html.escape(str(m.keys[r]))}: "
                            f"<span dir=\"auto\">{html.escape(tok.decode(ids))}</span></li>")
    note = ("<p><em>The interactive view needs JavaScript; these are the verses it shows.</em></p>"
            f"<ul>{''.join(fallback)}</ul>")
    return token_activation_view(samples, acts, labels, fallback_html=note, group_label=f"layer {layer}")

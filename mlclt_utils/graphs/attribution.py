"""Attribution graphs of the run's models with circuit-tracer, and what the book reads off
them.

circuit-tracer computes the graph (``attribute``), prunes it by cumulative influence
(``prune_graph``) and scores it (``compute_graph_scores``); this module only prepares its
inputs from the project's models and turns its ``Graph`` into tables:

* ``graph_for_prompt``: one graph for a token prompt, with the next-token logit of a given
  answer, or of a custom direction (``language_target``), as the attribution target;
* ``pruned_graph``: the nodes and edges kept by pruning (features with layer, position,
  feature id, activation and influence on the target; error nodes; tokens), as DataFrames;
* ``language_target``: the "language vector" target of the multilingual-CLT study, the
  unembedding of the answer in the prompt's language minus the mean of the answer's
  unembeddings over the run's languages (circuit-tracer's ``CustomTarget``);
* ``shared_features``: across the graphs of one concept in several languages, which
  features appear in all of them, by layer, and the share of each graph's influence they
  carry. No library computes this cross-language comparison.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def graph_for_prompt(replacement, tokens: Tensor | Sequence[int], target=None,
                     max_feature_nodes: int | None = None, batch_size: int = 256):
    """circuit-tracer's attribution graph of ``tokens`` (BOS first). ``target``: a token id
    (its logit at the last position), a ``CustomTarget`` (``language_target``), or None for
    circuit-tracer's default (the most likely next tokens up to 95 % probability)."""
    from circuit_tracer import attribute
    from circuit_tracer.attribution.targets import CustomTarget

    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() < 2:
        raise ValueError(f"a prompt needs BOS and at least one token, got {tokens.numel()} token(s)")
    if target is None:
        targets = None
    elif isinstance(target, CustomTarget):
        targets = [target]
    else:
        vocab = replacement.cfg.d_vocab
        if not 0 <= int(target) < vocab:
            raise ValueError(f"target token {int(target)} is outside the vocabulary (0..{vocab - 1})")
        targets = torch.tensor([int(target)])
    import logging
    import warnings

    # circuit-tracer's backward hooks warn on every graph (PyTorch's full-backward-hook
    # notice, printed with the library's file path) and its Graph warns that it has no
    # "scan" name for uploading; neither applies here, and both would flood the book
    quiet = logging.getLogger("circuit_tracer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook")
            return attribute(tokens, replacement, attribution_targets=targets,
                             max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    finally:
        quiet.setLevel(level)


def graph_scores(graph) -> dict:
    """circuit-tracer's replacement and completeness scores of a graph."""
    from circuit_tracer.graph import compute_graph_scores

    replacement, completeness = compute_graph_scores(graph)
    return {"replacement": replacement, "completeness": completeness}


def pruned_graph(graph, node_threshold: float = 0.8, edge_threshold: float = 0.98):
    """What survives circuit-tracer's pruning, as two DataFrames.

    ``nodes``: one row per kept node: node (its index in the full graph), kind (feature,
    error, token, logit), layer (the embedding is layer -1, logits n_layers), position,
    feature id and activation (features only), and influence (the node's share of the total
    influence on the targets, from circuit-tracer's influence computation).
    ``edges``: source node, target node and weight (the direct effect) of the kept edges.
    """
    import pandas as pd
    from circuit_tracer.graph import compute_node_influence, prune_graph

    n_layers, n_pos = graph.cfg.n_layers, graph.n_pos
    n_feat = len(graph.selected_features)
    n_logit = len(graph.logit_targets)
    n_err = n_layers * n_pos
    adj = graph.adjacency_matrix.float().cpu()
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    mask, edge_mask = pruned.node_mask.cpu(), pruned.edge_mask.cpu()
    weights = torch.zeros(adj.shape[0])
    weights[-n_logit:] = graph.logit_probabilities.float().cpu()
    influence = compute_node_influence(adj, weights)
    influence = influence / influence[: -n_logit].sum().clamp(min=1e-12)
    rows = []
    feats = graph.active_features[graph.selected_features].cpu()
    kept = torch.nonzero(mask).flatten().tolist()
    for i in kept:
        if i < n_feat:
            layer, pos, f = feats[i].tolist()
            rows.append((i, "feature", layer, pos, f, float(graph.activation_values[i]), float(influence[i])))
        elif i < n_feat + n_err:
            layer, pos = divmod(i - n_feat, n_pos)
            rows.append((i, "error", layer, pos, -1, float("nan"), float(influence[i])))
        elif i < n_feat + n_err + n_pos:
            rows.append((i, "token", -1, i - n_feat - n_err, -1, float("nan"), float(influence[i])))
        else:
            rows.append((i, "logit", n_layers, n_pos - 1, -1, float("nan"), float("nan")))
    nodes = pd.DataFrame(rows, columns=["node", "kind", "layer", "position", "feature", "activation",
                                        "influence"])
    keep = mask[:, None] & mask[None, :] & edge_mask
    tgt, src = torch.nonzero(keep, as_tuple=True)
    edges = pd.DataFrame({"source": src.numpy(), "target": tgt.numpy(), "weight": adj[tgt, src].numpy()})
    return nodes, edges


def language_target(model, answers: Mapping[str, int], language: str):
    """circuit-tracer ``CustomTarget`` for the direction W_U[:, answer in ``language``] minus
    the mean of W_U[:, answer] over the languages of ``answers`` (the first token of the
    same word in each language): what pushes the output towards this language's form of
    the answer rather than towards the answer in general."""
    from circuit_tracer.attribution.targets import CustomTarget

    if language not in answers:
        raise ValueError(f"language {language!r} has no answer; answers are given for {sorted(answers)}")
    if len(answers) < 2:
        raise ValueError("a language target needs the answer in at least two languages")
    W_U = model.W_U.detach()
    ids = torch.tensor([int(answers[lang]) for lang in answers])
    direction = W_U[:, int(answers[language])] - W_U[:, ids].mean(1)
    return CustomTarget(token_str=f"{language} vector", prob=1.0, vec=direction)


def shared_features(nodes_by_language: Mapping[str, "object"]):
    """For one concept's graphs in several languages (``pruned_graph`` node tables): per layer the
    number of distinct features in each graph, the number present in every graph, and per
    language the share of the graph's feature influence carried by those shared features
    ("shared influence <lang>") and by features present in at least one other language's
    graph ("pair influence <lang>").
    Features are matched by (layer, feature id), at any position."""
    import pandas as pd

    langs = list(nodes_by_language)
    if len(langs) < 2:
        raise ValueError(f"need graphs of at least two languages, got {langs}")
    feats = {lang: df[df["kind"] == "feature"] for lang, df in nodes_by_language.items()}
    layers = sorted(set().union(*(set(f["layer"]) for f in feats.values())))
    rows = []
    for layer in layers:
        sets = {lang: set(f.loc[f["layer"] == layer, "feature"]) for lang, f in feats.items()}
        common = set.intersection(*sets.values())
        row = {"layer": layer, "shared": len(common),
               "features (mean per graph)": sum(map(len, sets.values())) / len(sets)}
        for lang, f in feats.items():
            here = f[f["layer"] == layer]
            total = here["influence"].sum()
            others = set().union(*(v for k, v in sets.items() if k != lang))
            for col, keep in ((f"shared influence {lang}", common), (f"pair influence {lang}", others)):
                row[col] = (here.loc[here["feature"].isin(keep), "influence"].sum() / total
                            if total > 0 else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def shared_by_concept(nodes, prompts, graph: str = "logit", control: bool = False):
    """``shared_features`` for every concept whose graphs (of kind ``graph``: "logit" or
    "language") exist in at least two languages (the first prompt of each language), in long form: concept, layer, language, shared
    (features present in every language's graph), shared influence. ``control``: the same
    with every language but the concept's first taking the graph of the *next* concept
    (cyclic), so the graphs compared differ in meaning."""
    import pandas as pd

    nodes = nodes[nodes["graph"] == graph]
    first = prompts.drop_duplicates(["concept", "language"])
    concepts = list(dict.fromkeys(first["concept"]))
    out = []
    for concept, ps in first.groupby("concept", sort=False):
        if control:
            if len(concepts) < 2:
                break
            other = first[first["concept"] == concepts[(concepts.index(concept) + 1) % len(concepts)]]
            ps = pd.concat([ps.iloc[:1], other[other["language"] != ps.iloc[0]["language"]]])
        by_lang = {p.language: nodes[nodes["prompt_id"] == p.prompt_id] for p in ps.itertuples()}
        by_lang = {lang: df for lang, df in by_lang.items() if (df["kind"] == "feature").any()}
        if len(by_lang) < 2:
            continue
        s = shared_features(by_lang)
        for lang in by_lang:
            out.append(pd.DataFrame({"concept": concept, "layer": s["layer"], "language": lang,
                                     "shared": s["shared"],
                                     "shared influence": s[f"shared influence {lang}"],
                                     "pair influence": s[f"pair influence {lang}"]}))
    cols = ["concept", "layer", "language", "shared", "shared influence", "pair influence"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def influence_share(nodes, features) -> float:
    """Share of a graph's feature influence carried by ``features`` [(layer, feature)]."""
    f = nodes[nodes["kind"] == "feature"]
    total = f["influence"].sum()
    if total <= 0:
        return float("nan")
    keys = set(map(tuple, features))
    mine = [(int(l), int(x)) in keys for l, x in zip(f["layer"], f["feature"])]
    return float(f.loc[mine, "influence"].sum() / total)


def shared_profile_row(shared, n_layers: int, model_name: str, n_boot: int = 1000, seed: int = 0,
                       control=None) -> dict | None:
    """A shown (not counted) A1 row from :func:`shared_by_concept`: the influence carried by
    features present in every language's graph, middle layers minus the larger of the first
    and last, bootstrapped over concepts; with ``control`` (the different-concept table) the
    statistic is taken on the difference, per concept and layer. Not counted: A1 is decided on
    chapter 04's overlap; a few concepts' graphs are a second, coarser look."""
    import numpy as np

    from ..claims import bootstrap, verdict

    if shared.empty or n_layers < 3:
        return None
    def table(df):
        return df.groupby(["concept", "layer"])["shared influence"].mean().unstack().reindex(
            columns=range(n_layers)).fillna(0.0)

    per = table(shared)
    against = control is not None and not control.empty
    if against:
        per = per - table(control).reindex(index=per.index, columns=per.columns).fillna(0.0)

    def stat(x):
        m = x.mean(0)
        return float(m[1:-1].mean() - max(m[0], m[-1]))

    est, lo, hi = bootstrap(per.to_numpy(), stat, n_boot, seed)
    what = "minus a different concept's, " if against else ""
    return verdict("A1", f"graph influence of features in every language's graph, {what}middle minus first/last layers",
                   est, lo, hi, n_units=len(per), units="concepts", chapter="06", model=model_name,
                   control="the first and last layers" + (", each against graphs of another concept" if against else ""),
                   counted=False, note="graphs are a second look; A1 is decided in chapter 04")


def graph_findings(model_name: str, n_concepts: int, prompts, scores, nodes, shared, lang_share,
                   n_layers: int, n_boot: int = 1000, seed: int = 0) -> tuple[list[str], list[dict], list[dict]]:
    """Chapter 06's closing findings: ``(sentences, results rows, verdict rows)`` from its
    prompts, graph scores, node tables, :func:`shared_by_concept` table and the language
    features' share of influence per language (``lang_share``, columns "language-vector
    graph" and "answer-logit graph")."""
    from ..claims import sentence

    items, rows, verdicts = [], [], []
    answered = float(prompts["answered"].mean()) if len(prompts) else float("nan")
    items.append(f"{model_name}: {n_concepts} concepts mined, {len(prompts)} prompts; the model answers "
                 f"{answered:.0%} of them." + (" The others are kept as the closest prompts (highest probability "
                 "of the answer), so their graphs explain what the model predicts there, not a correct answer."
                 if answered < 1 else ""))
    rows.append({"model": model_name, "metric": "share of cloze prompts answered", "value": answered})
    for target in ("logit", "language"):
        s = scores[scores["graph"] == target]
        items.append(f"Graphs of the {'answer logit' if target == 'logit' else 'language vector'}: replacement score "
                     f"{s['replacement'].mean():.2f} ± {s['replacement'].std():.2f}, completeness "
                     f"{s['completeness'].mean():.2f} ± {s['completeness'].std():.2f} (mean ± sd over {len(s)} graphs).")
        rows += [{"model": model_name, "metric": f"replacement score, {target} graphs", "value": float(s["replacement"].mean())},
                 {"model": model_name, "metric": f"completeness score, {target} graphs", "value": float(s["completeness"].mean())}]
    if not shared.empty:
        m = shared.groupby("layer")["shared influence"].mean()
        pair = shared.groupby("layer")["pair influence"].mean()
        concepts = shared["concept"].nunique()
        if (m <= 0).all():
            items.append(f"No feature is present in the graphs of every language at any layer ({concepts} concepts); "
                         "features present in at least one other language's graph carry "
                         + ", ".join(f"{v:.0%} (layer {int(l)})" for l, v in pair.items()) + " of the influence.")
        else:
            items.append(f"Influence carried by features present in every language's graph, by layer, over {concepts} "
                         "concepts: " + ", ".join(f"{int(l)}: {v:.0%}" for l, v in m.items())
                         + "; features present in at least one other language: "
                         + ", ".join(f"{int(l)}: {v:.0%}" for l, v in pair.items()) + ".")
        control = shared_by_concept(nodes, prompts, "logit", control=True)
        if len(control):
            c = control.groupby("layer")["shared influence"].mean()
            items.append("With another concept's graphs in place of the translations (control): "
                         + ", ".join(f"{int(l)}: {v:.0%}" for l, v in c.items()) + ".")
        row = shared_profile_row(shared, n_layers, model_name, n_boot, seed, control=control)
        if row is not None:
            verdicts.append(row)
            items.append(sentence(row) + " Graphs of a few concepts are a second, coarser look: the row is shown, "
                         "not counted; A1 is decided in chapter 04 over hundreds of verses.")
        rows += [{"model": model_name, "metric": f"shared influence, layer {int(l)}", "value": float(v)}
                 for l, v in m.items()]
    lv, lg = lang_share["language-vector graph"].mean(), lang_share["answer-logit graph"].mean()
    items.append(language_share_sentence(lang_share, n_boot, seed))
    rows += [{"model": model_name, "metric": "language features' share, language-vector graphs", "value": float(lv)},
             {"model": model_name, "metric": "language features' share, answer-logit graphs", "value": float(lg)}]
    return items, rows, verdicts


def promoted_tokens(clt, model, tokenizer, keys, k: int = 2) -> dict[tuple[int, int], str]:
    """A short label per CLT feature ``(layer, feature)`` of ``keys``: the ``k`` tokens its
    total decoder write promotes most when read straight through the unembedding (the
    direct-logit view of ``features.lift``), e.g. ``"↑ king, roi"``. Special tokens and
    byte pieces that decode to nothing printable are skipped."""
    import torch

    from ..features.lift import clt_decoder_directions, final_ln_linear
    from ..tokenizer import SPECIAL_TOKENS

    keys = sorted({(int(l), int(f)) for l, f in keys})
    out = {}
    for layer in sorted({l for l, _ in keys}):
        feats = [f for l, f in keys if l == layer]
        with torch.no_grad():
            logits = final_ln_linear(clt_decoder_directions(clt, layer, feats), model) @ model.W_U.to(clt.W_dec[layer])
        for f, row in zip(feats, logits):
            words = []
            for t in row.argsort(descending=True).tolist():
                text = tokenizer.decode([t]).strip()
                if text and "\ufffd" not in text and text not in SPECIAL_TOKENS:
                    words.append(text)
                if len(words) == k:
                    break
            out[(layer, f)] = "↑ " + ", ".join(words)
    return out


def language_share_sentence(lang_share, n_boot: int = 1000, seed: int = 0) -> str:
    """Chapter 06's sentence on where the prompt language's features matter: their share of
    the language-vector graphs' influence against the answer-logit graphs', paired over
    languages (t interval); "more" or "less" only when the interval says so."""
    from ..claims import paired_difference

    lv, lg = lang_share["language-vector graph"].mean(), lang_share["answer-logit graph"].mean()
    pair = lang_share[["language-vector graph", "answer-logit graph"]].dropna()
    if len(pair) < 2:
        return (f"Chapter 05's language features of the prompt's language carry {lv:.0%} of the language-vector "
                f"graphs' feature influence against {lg:.0%} of the answer-logit graphs' ({len(pair)} language: "
                "too few for an interval).")
    est, lo, hi = paired_difference(pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy(), n_boot, seed)
    read = ("they matter more for which language the answer takes than for the answer itself" if lo > 0 else
            "they matter less there than in the answer-logit graphs" if hi < 0 else
            "the interval does not tell the two apart")
    return (f"Chapter 05's language features of the prompt's language carry {lv:.0%} of the language-vector "
            f"graphs' feature influence against {lg:.0%} of the answer-logit graphs' (mean over {len(pair)} "
            f"languages; difference {est:+.0%}, 95 % t interval [{lo:+.0%}, {hi:+.0%}]): {read}.")

"""Chapter 06's statistics in one call: mined concepts, cloze prompts the model answers,
and for each prompt two attribution graphs (the answer's logit, and the language vector of
the answer), reduced to the tables the chapter and the stage keep."""

from __future__ import annotations

from typing import Mapping

import torch

from ..languages import NO_SPACE_LANGUAGES
from ..prompts import cloze_prompts, context_ids, load_given_prompts, mine_concepts, scored_prompts
from .attribution import graph_for_prompt, graph_scores, language_target, pruned_graph
from .circuit_tracer import build_replacement_model


def aligned_units(corpus, split: str = "train") -> dict[str, list[str]]:
    """The documents of ``split`` present in every language, aligned by their ids (Bible
    chapters ``book:chapter``)."""
    langs = corpus.languages
    ids = {lang: corpus.ids[lang][split] for lang in langs}
    common = [i for i in ids[langs[0]] if all(i in set(ids[l]) for l in langs[1:])]
    where = {lang: {i: k for k, i in enumerate(ids[lang])} for lang in langs}
    return {lang: [corpus.texts[lang][split][where[lang][i]] for i in common] for lang in langs}


def answer_token(tokenizer, word: str, lang: str) -> int:
    """The first token of ``word`` as it follows other text: with its leading space in
    languages written with spaces."""
    text = word if lang in NO_SPACE_LANGUAGES else " " + word
    return int(tokenizer.encode(text, add_special_tokens=False)[0])


def _viewer_files(graph, slug: str, viewer_dir, tokenizer_dir, scan: str, cfg: Mapping) -> None:
    """circuit-tracer's viewer JSON for one graph. Its writer reads the tokenizer by name,
    so the graph is pointed at the run's tokenizer folder (nothing is fetched)."""
    import logging

    from circuit_tracer.utils.create_graph_files import create_graph_files

    if tokenizer_dir is None:
        raise ValueError("writing viewer files needs tokenizer_dir, the run's tokenizer folder")
    graph.cfg.tokenizer_name = str(tokenizer_dir)
    logging.getLogger("circuit_tracer").setLevel(logging.WARNING)
    create_graph_files(graph, slug=slug, output_path=str(viewer_dir), scan=scan,
                       node_threshold=cfg["node_threshold"], edge_threshold=cfg["edge_threshold"])


def concept_graphs(model, clt, corpus, cfg: Mapping, progress: bool = True, viewer_dir=None,
                   tokenizer_dir=None, scan: str = "mlclt") -> dict:
    """``{"concepts", "prompts", "scores", "nodes", "edges"}`` DataFrames. ``cfg``: the
    stage config (max_concepts, per_concept, min_units, min_chars, node_threshold,
    edge_threshold, max_feature_nodes, batch_size). With ``viewer_dir`` (and
    ``tokenizer_dir``, a local tokenizer folder), every graph is also written there in the
    JSON format of circuit-tracer's web viewer (``create_graph_files``)."""
    import pandas as pd

    from ..viz.progress import progress_bar

    langs = corpus.languages
    if cfg.get("prompt_source"):
        records = load_given_prompts(cfg["prompt_source"], cfg.get("prompt_columns"))
        prompts, concepts = scored_prompts(model, records, langs)
        keep = list(concepts.dropna(how="all").index[:cfg["max_concepts"]])
        prompts = prompts[prompts["concept"].isin(keep)].reset_index(drop=True)
        concepts = concepts.loc[keep]
    else:
        if not corpus.has_parallel:
            raise ValueError("chapter 06 mines cloze prompts from the corpus's parallel verses; this "
                             "corpus has none (use the Bible source or give graphs.prompt_source)")
        concepts = mine_concepts(aligned_units(corpus), min_units=cfg["min_units"])
        concepts = concepts.dropna(subset=langs).head(cfg["max_concepts"])
        verses = {lang: corpus.parallel[lang] for lang in langs}
        prompts = cloze_prompts(model, concepts, verses, corpus.parallel["keys"],
                                per_concept=cfg["per_concept"], min_chars=cfg["min_chars"],
                                same_verse=True)
    prompts.insert(0, "prompt_id", range(len(prompts)))
    tok = model.tokenizer
    answers = {c: {lang: answer_token(tok, concepts.loc[c, lang], lang) for lang in langs
                   if isinstance(concepts.loc[c, lang], str)} for c in concepts.index}
    rm = build_replacement_model(model, clt)
    scores, nodes, edges = [], [], []
    bar = progress_bar(total=2 * len(prompts), desc="attribution graphs", disable=not progress)
    try:
        for _, p in prompts.iterrows():
            ids = context_ids(tok, tok.encode(p["prompt"], add_special_tokens=False), model.cfg.n_ctx)
            targets = {"logit": int(p["target_token"])}
            mine = answers[p["concept"]]
            # a language whose answer token another language shares has no vector of its own
            if len(mine) > 1 and list(mine.values()).count(mine[p["language"]]) == 1:
                targets["language"] = language_target(model, mine, p["language"])
            for kind, target in targets.items():
                graph = graph_for_prompt(rm, torch.tensor(ids), target,
                                         max_feature_nodes=cfg["max_feature_nodes"],
                                         batch_size=cfg["batch_size"])
                n, e = pruned_graph(graph, cfg["node_threshold"], cfg["edge_threshold"])
                if viewer_dir is not None:
                    _viewer_files(graph, f"prompt{int(p['prompt_id'])}-{kind}", viewer_dir, tokenizer_dir,
                                  scan, cfg)
                key = {"prompt_id": int(p["prompt_id"]), "graph": kind}
                scores.append({**key, **graph_scores(graph), "tokens": len(ids),
                               "active_features": int(graph.active_features.shape[0]),
                               "kept_features": int((n["kind"] == "feature").sum())})
                nodes.append(n.assign(**key))
                edges.append(e.assign(**key))
                bar.update(1)
            if "language" not in targets:
                bar.update(1)
    finally:
        bar.close()
        rm.reset_hooks(including_permanent=True)
    empty = {"nodes": ["node", "kind", "layer", "position", "feature", "activation", "influence"],
             "edges": ["source", "target", "weight"]}
    return {"concepts": concepts.reset_index(), "prompts": prompts,
            "scores": pd.DataFrame(scores),
            "nodes": pd.concat(nodes, ignore_index=True) if nodes else pd.DataFrame(columns=empty["nodes"]),
            "edges": pd.concat(edges, ignore_index=True) if edges else pd.DataFrame(columns=empty["edges"])}

"""Interventions on CLT features in the original model (chapter 07).

A ``Steer`` changes one feature of one source layer at every position: scaled (``scale``:
new = scale x its current activation, 0 clamps it off, a negative value reverses it) or
set (``value``: new = value wherever the token is not BOS). The model runs unchanged except
that each target layer's MLP output gets the change in the CLT's reconstruction that the
new activations cause: (new - current) x decoder / output scale, summed over the steered
features that write to it. The current activation is read in the steered forward pass
itself, so the effects of earlier layers' steering propagate (circuit-tracer's
``feature_intervention`` without frozen attention does the same; a test checks that both
give the same logits). Written with TransformerLens hooks rather than through
circuit-tracer because generation needs the steering at positions that do not exist yet.

``greedy_generate`` continues a prompt greedily (no sampling, for the baseline and the
steered model alike), re-running the whole context at every step so that the steering
applies to every position, generated ones included. ``greedy_generate_many`` does the same
for one prompt under many steer lists in one batch (``row_steering_hooks``: each row its own
steers): the language switch runs every strength and control draw of a prompt and target
together, about seven times faster on the ``small`` preset than one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .clt.evaluate import encode_layer


@dataclass(frozen=True)
class Steer:
    layer: int
    feature: int
    scale: float | None = None
    value: float | None = None

    def __post_init__(self):
        if (self.scale is None) == (self.value is None):
            raise ValueError(f"a Steer takes exactly one of scale= or value=, got scale={self.scale!r}, "
                             f"value={self.value!r}")


def check_steers(clt, steers: Sequence[Steer]) -> None:
    L, F = clt.cfg.n_layers, clt.cfg.d_features
    for s in steers:
        if not isinstance(s, Steer):
            raise TypeError(f"expected Steer objects, got {type(s).__name__}")
        if not 0 <= s.layer < L:
            raise ValueError(f"steer layer {s.layer} is out of range; the CLT has layers 0..{L - 1}")
        if not 0 <= s.feature < F:
            raise ValueError(f"steer feature {s.feature} is out of range; layers have features 0..{F - 1}")


def steering_hooks(model, clt, steers: Sequence[Steer], tokens: Tensor, bos_id: int | None = None):
    """TransformerLens forward hooks [(name, fn)] that apply ``steers`` (see the module
    docstring) in a forward pass over ``tokens`` [batch, pos]; BOS positions are left alone."""
    return row_steering_hooks(model, clt, [steers] * tokens.shape[0], tokens, bos_id)


def row_steering_hooks(model, clt, row_steers: Sequence[Sequence[Steer]], tokens: Tensor,
                       bos_id: int | None = None):
    """As :func:`steering_hooks`, with its own steers for each row of ``tokens`` (one list per
    row, possibly empty): many steered continuations of one prompt run as one batch."""
    from functools import partial

    if len(row_steers) != tokens.shape[0]:
        raise ValueError(f"row_steers has {len(row_steers)} lists for {tokens.shape[0]} rows of tokens")
    for steers in row_steers:
        check_steers(clt, steers)
    cfg = clt.cfg
    B = len(row_steers)
    # per source layer: the features any row steers, and per row how (0 not, 1 scale, 2 value)
    tables: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for layer in sorted({s.layer for steers in row_steers for s in steers}):
        feats = sorted({s.feature for steers in row_steers for s in steers if s.layer == layer})
        col = {f: j for j, f in enumerate(feats)}
        mode = torch.zeros(B, len(feats), dtype=torch.long)
        param = torch.zeros(B, len(feats))
        for b, steers in enumerate(row_steers):
            for s in steers:
                if s.layer == layer:
                    j = col[s.feature]
                    mode[b, j], param[b, j] = (1, s.scale) if s.scale is not None else (2, s.value)
        tables[layer] = (torch.tensor(feats), mode, param)
    if bos_id is None:
        bos_id = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    keep = (tokens != bos_id)[..., None] if bos_id is not None else None
    pending: dict[int, Tensor] = {}                 # target layer -> [batch, pos, d] to add

    def read_input(x, hook, layer):
        feats, mode, param = (t.to(x.device) for t in tables[layer])
        current = encode_layer(clt, x.to(clt.W_enc.dtype), layer)[..., feats]          # [b, p, n]
        mode, param = mode[:, None, :], param[:, None, :].to(current.dtype)
        new = torch.where(mode == 1, current * param, torch.where(mode == 2, param.expand_as(current), current))
        if keep is not None:
            new = torch.where(keep.to(x.device), new, current)
        delta = new - current
        W = clt.W_dec[layer][feats]                                                     # [n, T, d]
        for t in range(W.shape[1]):
            k = layer + t if cfg.cross_layer else layer
            add = (delta @ W[:, t, :]) / clt.output_scale[k]
            pending[k] = pending.get(k, 0) + add.to(x.dtype)
        return x

    def write_output(out, hook, layer):
        add = pending.pop(layer, None)
        return out if add is None else out + add

    hooks = [(f"blocks.{layer}.{cfg.input_hook}", partial(read_input, layer=layer)) for layer in tables]
    targets = sorted({(l + t if cfg.cross_layer else l) for l in tables
                      for t in range(clt.W_dec[l].shape[1])})
    hooks += [(f"blocks.{k}.{cfg.output_hook}", partial(write_output, layer=k)) for k in targets]
    return hooks


@torch.no_grad()
def steered_logits(model, clt, tokens: Tensor, steers: Sequence[Steer], bos_id: int | None = None) -> Tensor:
    """Logits [batch, pos, vocab] of ``model`` on ``tokens`` with ``steers`` applied."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    tokens = tokens.to(model.cfg.device)
    hooks = steering_hooks(model, clt, steers, tokens, bos_id)
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@torch.no_grad()
def greedy_generate(model, clt, tokens: Sequence[int] | Tensor, steers: Sequence[Steer] = (),
                    max_new_tokens: int = 10, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation (token ids, prompt excluded) of one prompt, with or without
    steering; stops early at a token of ``stop_ids`` or at the model's context length."""
    ids = [int(t) for t in torch.as_tensor(tokens).flatten().tolist()]
    out: list[int] = []
    for _ in range(max_new_tokens):
        if len(ids) >= model.cfg.n_ctx:
            break
        ctx = torch.tensor([ids])
        logits = steered_logits(model, clt, ctx, steers) if steers else model(ctx.to(model.cfg.device))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out


@torch.no_grad()
def greedy_generate_many(model, clt, tokens: Sequence[int] | Tensor, row_steers: Sequence[Sequence[Steer]],
                         max_new_tokens: int = 10, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """:func:`greedy_generate` of one prompt under each list of ``row_steers``, as one batch:
    the same continuations, one forward pass per new token for all of them."""
    ids = torch.as_tensor(tokens).flatten().long()
    ctx = ids[None].repeat(len(row_steers), 1).to(model.cfg.device)
    outs: list[list[int]] = [[] for _ in row_steers]
    done = [False] * len(row_steers)
    for _ in range(max_new_tokens):
        if ctx.shape[1] >= model.cfg.n_ctx or all(done):
            break
        hooks = row_steering_hooks(model, clt, row_steers, ctx) if any(row_steers) else []
        nxt = model.run_with_hooks(ctx, fwd_hooks=hooks)[:, -1].argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                outs[b].append(int(t))
                done[b] = int(t) in stop_ids
        ctx = torch.cat([ctx, nxt[:, None]], 1)
    return outs


# ------------------------------------------------------------ switching the language -----

def firing_means(stats, layer: int) -> Tensor:
    """[F]: each unit's mean activation where it fires, from a ``UnitStats`` of one language
    (0 for a unit that never fires there)."""
    total = (stats.means[layer].double() * stats.lengths[:, None].double()).sum(0)
    counts = stats.counts[layer].double()
    return torch.where(counts > 0, total / counts.clamp(min=1), torch.zeros_like(total)).float()


def switch_steers(source_feats, target_feats, target_means, strength: float, clamp_scale: float):
    """Steers that clamp ``source_feats`` [(layer, feature)] to ``clamp_scale`` x their
    activation and set ``target_feats`` to ``strength`` x their mean firing activation
    (``target_means[(layer, feature)]``)."""
    return ([Steer(l, f, scale=clamp_scale) for l, f in source_feats]
            + [Steer(l, f, value=strength * float(target_means[(l, f)])) for l, f in target_feats])


MATCH_POOL = 20     # a control feature is drawn among this many of nearest firing frequency


def matched_random_features(feats, freq: Mapping | None, taken, n_features: int, rng) -> list:
    """Per ``(layer, feature)`` of ``feats``, a random feature of the same layer that is not in
    ``taken`` (the language features) nor drawn already, among the ``MATCH_POOL`` whose firing
    frequency (``freq[(layer, feature)]``) is nearest to the replaced feature's; uniform over
    the layer when ``freq`` is None."""
    out = []
    for layer, f0 in feats:
        free = [f for f in range(n_features) if (layer, f) not in taken and (layer, f) not in out]
        if not free:
            raise ValueError(f"layer {layer} has no feature left to draw a control from")
        if freq is not None:
            target = freq.get((layer, f0), 0.0)
            free = sorted(free, key=lambda f: abs(freq.get((layer, f), 0.0) - target))[:MATCH_POOL]
        out.append((layer, int(free[int(rng.integers(len(free)))])))
    return out


def language_switch(model, clt, prompts, features, means, classify, strengths: Sequence[float],
                    clamp_scale: float = 0.0, max_new_tokens: int = 8, controls: int = 5,
                    seed: int = 0, progress: bool = True, freq: Mapping | None = None):
    """Steer every prompt of language A towards every other language B and classify the
    language of the greedy continuation.

    ``prompts``: DataFrame with columns prompt_id, language, ids (token ids, BOS first) and
    optionally answer_<lang> (the first token of the prompt's concept in each language).
    ``features``: {lang: [(layer, feature)]}, the language features steered. ``means``:
    {lang: {(layer, feature): mean firing activation}} for every feature of those layers
    that may be set (language features and control features alike). ``classify``: token
    ids -> language code.

    The control clamps and sets as many random features of the same layers (none of them a
    language feature), each drawn among the ``MATCH_POOL`` features whose firing frequency in
    the same language (``freq[lang][(layer, feature)]``) is nearest to the replaced feature's,
    so that it fires about as often; ``controls`` draws per prompt. Returns one row per prompt,
    target language, strength, kind ("steer", "control") and draw, plus a "baseline" row per
    prompt, with the continuation (ids), its language ("none" when it holds no letter),
    whether it mostly repeats itself (degenerate), success (language == target and not
    degenerate; for the baseline, language == the prompt's) and, where answers are given,
    whether the first generated token is the concept's word in the target language.
    """
    import numpy as np
    import pandas as pd

    from .models.load import is_degenerate
    from .viz.progress import progress_bar

    langs = [l for l in features if features[l]]
    taken = {lf for feats in features.values() for lf in feats}
    rng = np.random.default_rng(seed)
    F = clt.cfg.d_features

    def random_like(feats, lang):
        return matched_random_features(feats, None if freq is None else freq[lang], taken, F, rng)

    rows = []
    todo = prompts[prompts["language"].isin(langs)]
    total = len(todo) * (1 + (len(langs) - 1) * len(strengths) * (1 + controls))
    bar = progress_bar(total=total, desc="interventions", disable=not progress)
    stop = [model.tokenizer.eos_token_id] if getattr(model.tokenizer, "eos_token_id", None) is not None else []

    def record(p, target, strength, kind, out, draw=0):
        text = model.tokenizer.decode(out) if out else ""
        # punctuation, digits or nothing: no language to read, never a success
        lang = classify(out) if any(ch.isalpha() for ch in text) else "none"
        answer = p.get(f"answer_{target}") if target else None
        degenerate = is_degenerate(text, lang)
        rows.append({"prompt_id": p["prompt_id"], "source": p["language"], "target": target,
                     "strength": strength, "kind": kind, "draw": draw, "continuation": out, "language": lang,
                     "degenerate": degenerate,
                     "success": (lang == target and not degenerate) if target else lang == p["language"],
                     "first_is_answer": (bool(out) and out[0] == int(answer))
                     if answer is not None and not pd.isna(answer) else None})
        bar.update(1)

    try:
        for _, p in todo.iterrows():
            ids = list(p["ids"])
            record(p, None, 0.0, "baseline", greedy_generate(model, clt, ids, (), max_new_tokens, stop))
            src = features[p["language"]]
            for target in langs:
                if target == p["language"]:
                    continue
                dst = features[target]
                draws = [(random_like(src, p["language"]), random_like(dst, target)) for _ in range(controls)]
                # a random feature that never fires in the target gets the mean of the target's
                # language features, so the control adds as much activation
                fallback = float(np.mean([means[target][lf] for lf in dst]))
                # every strength and draw of this prompt and target as one batch
                runs = []
                for s in strengths:
                    runs.append((s, "steer", 0, switch_steers(src, dst, means[target], s, clamp_scale)))
                    for d, (rs, rd) in enumerate(draws):
                        m = {lf: means[target].get(lf, 0.0) or fallback for lf in rd}
                        runs.append((s, "control", d, switch_steers(rs, rd, m, s, clamp_scale)))
                conts = greedy_generate_many(model, clt, ids, [r[3] for r in runs], max_new_tokens, stop)
                for (s, kind, d, _), out in zip(runs, conts):
                    record(p, target, s, kind, out, d)
    finally:
        bar.close()
    return pd.DataFrame(rows)


def switch_prompts(graphs: dict, corpus, tokenizer, languages: Sequence[str], per_language: int,
                   n_ctx: int, verse_tokens: int = 12, skip_rows: int = 0):
    """Prompts for the switch experiment: chapter 06's cloze prompts of each language (those
    the model answers first), then beginnings (``verse_tokens`` tokens) of test verses not
    already used, up to ``per_language`` each, from beyond the first ``skip_rows`` parallel
    verses (those chose the language features). Columns: prompt_id, language, kind ("cloze",
    "verse"), concept, ids (BOS first), and answer_<lang> for cloze prompts (the first token
    of the concept's word in each language)."""
    import pandas as pd

    from .graphs.concepts import answer_token
    from .prompts import context_ids

    concepts = graphs["concepts"].set_index("concept")
    cloze = graphs["prompts"].sort_values(["answered", "p_target"], ascending=[False, False])
    rows = []
    for lang in languages:
        mine = cloze[cloze["language"] == lang].head(per_language)
        used = set(mine["verse"])
        for p in mine.itertuples():
            ids = context_ids(tokenizer, tokenizer.encode(p.prompt, add_special_tokens=False), n_ctx)
            row = {"language": lang, "kind": "cloze", "concept": p.concept, "ids": ids}
            for other in languages:
                word = concepts.loc[p.concept].get(other)
                if isinstance(word, str) and word:
                    row[f"answer_{other}"] = answer_token(tokenizer, word, other)
            rows.append(row)
        missing = per_language - len(mine)
        if corpus.has_parallel:
            for key, text in list(zip(corpus.parallel["keys"], corpus.parallel[lang]))[skip_rows:]:
                if missing <= 0:
                    break
                ids = tokenizer.encode(text, add_special_tokens=False)[:verse_tokens]
                if key not in used and len(ids) >= 4:
                    rows.append({"language": lang, "kind": "verse", "concept": None,
                                 "ids": context_ids(tokenizer, ids, n_ctx)})
                    missing -= 1
    out = pd.DataFrame(rows)
    out.insert(0, "prompt_id", range(len(out)))
    return out


def switch_experiment(model, clt, units: dict, lstats: dict, graphs: dict, corpus, cfg: Mapping,
                      thresholds: Mapping, progress: bool = True) -> dict:
    """Chapter 07's tables in one call, so that the ``interventions`` stage only stores them:
    ``{"results", "classifier", "features", "prompts"}``. ``units`` / ``lstats`` / ``graphs``:
    the ``unit_stats``, ``language_stats`` and ``graphs`` stages' contents; ``cfg``: the stage
    config (languages, max_features, prompts_per_language, strengths, clamp_scale,
    max_new_tokens, controls, seed); ``thresholds``: the preset's ``features`` section, named
    in the error when too few languages have late-layer language features."""
    import pandas as pd

    from .features.language import SpanClassifier, validate_span_classifier
    from .features.tokens import late_layers

    tok = model.tokenizer
    late = late_layers(clt.cfg.n_layers)
    feats = lstats["language_features"]
    feats = feats[feats["layer"].isin(late)].sort_values("frequency", ascending=False)
    langs = [l for l in cfg["languages"] if l in units["clt"]]
    features = {lang: [(int(r.layer), int(r.feature)) for r in
                       feats[feats["top_language"] == lang].head(cfg["max_features"]).itertuples()]
                for lang in langs}
    steerable = [lang for lang in langs if features[lang]]
    if len(steerable) < 2:
        raise ValueError(f"chapter 07 needs late-layer language features in at least two languages; "
                         f"this CLT has them for {steerable or 'none'} (late layers {late}). Lower "
                         f"features.min_frequency ({thresholds['min_frequency']}) or "
                         f"features.min_concentration ({thresholds['min_concentration']})")
    means, freq = {}, {}
    for lang in langs:
        m = {l: firing_means(units["clt"][lang], l) for l in late}
        means[lang] = {(l, f): float(v) for l in late for f, v in enumerate(m[l].tolist())}
        s = units["clt"][lang]
        freq[lang] = {(l, f): float(v) / max(s.n_tokens, 1) for l in late for f, v in enumerate(s.counts[l].tolist())}
    prompts = switch_prompts(graphs, corpus, tok, langs, cfg["prompts_per_language"], model.cfg.n_ctx,
                             skip_rows=cfg.get("selection_rows") or 0)
    classify = SpanClassifier(lstats["token_languages"], tok, languages=langs)
    results = language_switch(model, clt, prompts, features, means, classify, cfg["strengths"],
                              cfg["clamp_scale"], cfg["max_new_tokens"], cfg["controls"], cfg["seed"],
                              progress=progress, freq=freq)
    check = validate_span_classifier(classify, {l: corpus.parallel[l] for l in langs}, tok,
                                     lengths=(cfg["max_new_tokens"],))
    used = pd.DataFrame([{"language": l, "layer": a, "feature": b} for l, fs in features.items()
                         for a, b in fs], columns=["language", "layer", "feature"])
    return {"results": results, "classifier": check, "features": used, "prompts": prompts}


def _steer_minus_control(table, value: str, n_boot: int, seed: int):
    """Per prompt, the mean ``value`` of the steered rows minus that of the control rows
    (averaged over targets and draws), bootstrapped over prompts: ``(est, lo, hi, prompts)``."""
    from .claims import bootstrap

    per_prompt = table.groupby(["prompt_id", "kind"])[value].mean().unstack().dropna()
    if not {"steer", "control"} <= set(per_prompt):
        return None
    est, lo, hi = bootstrap(per_prompt[["steer", "control"]].to_numpy(float),
                            lambda x: float(x[:, 0].mean() - x[:, 1].mean()), n_boot, seed)
    return est, lo, hi, len(per_prompt)


def switch_verdicts(results, prompts, model_name: str, n_boot: int = 1000, seed: int = 0) -> tuple[list[dict], float]:
    """Claim A4 from the switch results: the strength is chosen on the even-numbered prompts
    (largest steered-minus-control success) and scored on the odd-numbered ones, so the
    strength is never chosen and scored on the same prompts. Rows: (1) success (in the target
    language and not degenerate) of the language features minus the frequency-matched random
    control, per prompt averaged over targets and draws, bootstrap over prompts; (2) on cloze
    prompts whose concept has a different first token in source and target, how often the
    first token is the concept in the target language, steered minus control (shown: the
    content part of the claim). Returns ``(rows, chosen strength)``."""
    import numpy as np

    from .claims import verdict

    arms = results[results["kind"].isin(["steer", "control"])]
    if arms.empty:
        return [], float("nan")
    select = arms[arms["prompt_id"] % 2 == 0]
    score = arms[arms["prompt_id"] % 2 == 1]
    gain = select.groupby(["strength", "kind"])["success"].mean().unstack()
    gain = (gain["steer"] - gain["control"]) if {"steer", "control"} <= set(gain) else None
    if gain is None or score.empty:
        return [], float("nan")
    best = float(gain.idxmax())
    at = score[score["strength"] == best]
    est, lo, hi, n = _steer_minus_control(at.assign(success=at["success"].astype(float)), "success", n_boot, seed)
    rows = [verdict("A4", f"switch success (target language, not degenerate), language features minus control, "
                          f"strength {best:g} (chosen on other prompts)", est, lo, hi,
                    control="as many random features of the same layers, matched in firing frequency, 5 draws",
                    n_units=n, units="held-out prompts", chapter="07", model=model_name)]
    answers = [c for c in prompts.columns if c.startswith("answer_")]
    if answers:
        table = at.merge(prompts[["prompt_id"] + answers], on="prompt_id")
        own = [table.loc[i, f"answer_{table.loc[i, 'source']}"] for i in table.index]
        tgt = [table.loc[i, f"answer_{table.loc[i, 'target']}"] for i in table.index]
        distinct = [(a == a and b == b and a != b) for a, b in zip(own, tgt)]
        table = table[np.asarray(distinct, bool) & table["first_is_answer"].notna()]
        kept = _steer_minus_control(table.assign(hit=table["first_is_answer"].astype(bool).astype(float)),
                                    "hit", n_boot, seed) if len(table) else None
        if kept is not None and kept[3] >= 2:
            rows.append(verdict("A4", "first token is the concept in the target language, steered minus control",
                                *kept[:3], control="the frequency-matched random control",
                                n_units=kept[3], units="held-out cloze prompts", chapter="07",
                                model=model_name))
    return rows, best

"""Model diffing (chapter 08, claim A5): why the weak language is weak, and what finetuning on
it changes.

The base model is the run's most English-heavy model; its *weak language* is the trained
language whose validation loss trails the reference (English, else the best language) most.
Three finetunes of equal budget start from the base weights (:func:`finetune_mixture`):

* ``weak``: the weak language alone (the treatment);
* ``mixture``: the base model's own mixture ("more training", not "more of that language");
* ``strong``: the best language alone (more of *a* language, not of the weak one).

The base CLT is trained further, keeping its scaling and with no sparsity warm-up, on
``stagewise`` the weak finetune, ``mixture`` and ``strong`` the control finetunes, ``floor``
the base model itself (another data order: the noise floor of further training), and
``data_only`` the base model on weak-language text (a shift of data is not a change of the
model). Feature f means the same thing in all of them, so a model and its matched CLT are
compared with the base model and its ``floor`` CLT, trained the same budget from the same
start: only the model differs.

What this module computes, each per verse (or row) so that intervals pair the two sides:

* :func:`row_losses`: next-token loss per evaluation row; :func:`loss_table` the change of
  every variant against the base, paired over rows;
* :func:`feature_activity`: the mean activation of a feature set per verse (from
  ``features.activations.UnitStats``): the *late* part (the weak language's language
  features, selected on validation text, scored on the test verses);
* :func:`weak_pair_gaps`: chapter 04's overlap gap restricted to pairs with the weak language:
  the *middle* part;
* :func:`piece_activity`: word-reassembly features (``features.words``) of the first layer,
  selected on validation text, their activity per test verse: the *early* part;
* :func:`crosscoder_tables`: the second instrument, a crosscoder on both residual streams;
* :func:`transplant_losses`: beyond the study, a causal test: in the base model, the chosen
  features' decoders are moved to the finetuned CLT's decoders (through hooks on the real
  model: the MLP outputs change by exactly sum_f a_f (d_f' - d_f)), and the weak language's
  loss is measured; the share of the finetuning gain this closes, against random features of
  the same layers and count;
* :func:`a5_verdicts`: the claims rows.

Written here: model diffing of this kind (stage-wise CLTs with a noise floor) has no library.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .tokenizer import BOS_ID, PAD_ID

VARIANTS = ("weak", "mixture", "strong")                  # the finetunes
CLT_VARIANTS = ("stagewise", "floor", "data_only", "mixture", "strong")   # further-trained CLTs
CLT_MODEL = {"stagewise": "weak", "floor": None, "data_only": None, "mixture": "mixture",
             "strong": "strong"}                          # the model each CLT is trained on (None: base)


# ------------------------------------------------------------------ choosing languages
def choose_languages(val_loss: Mapping[str, float], trained: Sequence[str], weak: str | None = None,
                     strong: str | None = None) -> tuple[str, str, pd.DataFrame]:
    """``(weak, strong, table)`` from the base model's final validation loss per language.

    The reference is English when trained, else the trained language with the lowest loss;
    ``weak``: the trained language (not the reference) whose loss exceeds the reference's most;
    ``strong``: the other trained language with the lowest loss. A given ``weak`` / ``strong`` must
    be a trained language. ``table``: language, val_loss, gap to the reference."""
    trained = [lang for lang in trained if lang in val_loss]
    if len(trained) < 2:
        raise ValueError(f"model diffing needs at least two trained languages, got {trained}")
    for name, lang in (("weak_language", weak), ("strong_language", strong)):
        if lang is not None and lang not in trained:
            raise ValueError(f"diffing.{name} {lang!r} is not a language the base model was trained on; "
                             f"allowed: {trained}")
    ref = "en" if "en" in trained else min(trained, key=lambda lang: val_loss[lang])
    table = pd.DataFrame({"language": trained, "val_loss": [float(val_loss[lang]) for lang in trained]})
    table["gap"] = table["val_loss"] - float(val_loss[ref])
    table["reference"] = table["language"] == ref
    if weak is None:
        weak = str(table[~table["reference"]].sort_values("gap").iloc[-1]["language"])
    if strong is None:
        strong = str(table[table["language"] != weak].sort_values("val_loss").iloc[0]["language"])
    if strong == weak:
        raise ValueError(f"the strong-language control {strong!r} is the weak language itself; "
                         "name another with diffing.strong_language")
    return weak, strong, table


def finetune_mixture(variant: str, languages: Sequence[str], base_share: float,
                     base_weights: Mapping[str, float] | None, weak: str, strong: str
                     ) -> tuple[float, dict | None]:
    """``(english_share, weights)`` of a finetune's data (``data.datasets.mixture_budgets``):
    one language alone for ``weak`` / ``strong``, the base mixture for ``mixture``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown finetune {variant!r}; allowed: {VARIANTS}")
    if variant == "mixture":
        return float(base_share), (dict(base_weights) if base_weights else None)
    lang = weak if variant == "weak" else strong
    if lang == "en":
        return 1.0, None
    others = [x for x in languages if x != "en"]
    return 0.0, {x: (1.0 if x == lang else 0.0) for x in others}


# ------------------------------------------------------------------ losses
@torch.no_grad()
def row_losses(model, rows: Tensor, batch_size: int = 16, hooks=None) -> np.ndarray:
    """Mean next-token loss of each row [N, n_ctx] (packed evaluation rows, no padding);
    ``hooks``: a function of a batch of rows giving the forward hooks to run it with."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, rows.shape[0], batch_size):
        chunk = rows[i:i + batch_size].to(device)
        loss = model.run_with_hooks(chunk, fwd_hooks=hooks(chunk) if hooks else [], return_type="loss",
                                    loss_per_token=True)
        out.append(loss.float().mean(1).cpu())
    return torch.cat(out).numpy().astype(float)


def loss_table(losses: Mapping[str, Mapping[str, np.ndarray]], base: str = "base", n_boot: int = 1000,
               seed: int = 0) -> pd.DataFrame:
    """``variant, language, loss, change, low, high, n_rows``: every variant's mean loss and its
    change against ``base`` on the same rows (negative: the variant is better), 95 % interval
    paired over rows."""
    from .claims import paired_difference

    rows = []
    for variant, by_lang in losses.items():
        for lang, v in by_lang.items():
            ref = np.asarray(losses[base][lang])
            est, lo, hi = paired_difference(v, ref, n_boot, seed) if variant != base else (0.0, 0.0, 0.0)
            rows.append({"variant": variant, "language": lang, "loss": float(np.mean(v)),
                         "change": est, "low": lo, "high": hi, "n_rows": len(v)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ features
def late_language_features(stats, language: str, layers: Sequence[int], min_frequency: float,
                           min_concentration: float) -> list[tuple[int, int]]:
    """``[(layer, feature)]``: chapter 05's language features of ``language`` in ``layers``,
    selected on ``stats`` (language -> UnitStats of the text they are chosen on)."""
    from .features.specificity import language_features, specificity

    out = []
    for layer in layers:
        chosen = language_features(specificity(stats, layer), min_frequency, min_concentration)
        out += [(int(layer), int(u)) for u in chosen.index[chosen["top_language"] == language]]
    return out


def feature_activity(stats, features: Sequence[tuple[int, int]]) -> np.ndarray:
    """[rows]: the mean over ``features`` of each row's mean activation (``UnitStats.means``)."""
    if not features:
        return np.full(len(stats.lengths), np.nan)
    cols = [stats.means[layer][:, f].double() for layer, f in features]
    return torch.stack(cols, 1).mean(1).numpy()


def weak_pair_gaps(stats, weak: str, layers: Sequence[int], dense_fraction: float = 0.5,
                   draws: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(weak_gaps, other_gaps)`` [rows]: chapter 04's per-verse overlap gap (translations
    minus length-matched other verses) in ``layers``, averaged over the language pairs that
    include ``weak`` and over the pairs that do not (NaN where no such pair exists)."""
    from itertools import combinations

    from .features.overlap import row_gaps

    langs = list(stats)
    weak_pairs, other_pairs = [], []
    for a, b in combinations(langs, 2):
        g = row_gaps({a: stats[a], b: stats[b]}, dense_fraction, draws)[:, list(layers)].mean(1)
        (weak_pairs if weak in (a, b) else other_pairs).append(g)
    n = len(next(iter(stats.values())).lengths)
    mean = lambda gs: np.nanmean(np.stack(gs), 0) if gs else np.full(n, np.nan)  # noqa: E731
    return mean(weak_pairs), mean(other_pairs)


def token_pieces(tokenizer, rows: Tensor) -> list[list[str]]:
    """Each row's token texts (BOS and padding dropped), decoded one id at a time."""
    cache: dict[int, str] = {}
    out = []
    for row in rows.tolist():
        ids = [t for t in row if t not in (BOS_ID, PAD_ID)]
        for t in ids:
            if t not in cache:
                cache[t] = tokenizer.decode([t])
        out.append([cache[t] for t in ids])
    return out


@torch.no_grad()
def _layer_acts(model, clt, rows: Tensor, layer: int, batch_size: int = 16) -> list[np.ndarray]:
    """Per row, [kept tokens, features] activations of the CLT's ``layer`` (BOS, padding dropped)."""
    from .features.activations import CLTFeatures, kept_positions

    source = CLTFeatures(model, clt)
    out = []
    for i in range(0, rows.shape[0], batch_size):
        chunk = rows[i:i + batch_size]
        acts = source.activations(chunk)[layer].cpu()
        keep = kept_positions(chunk)
        out += [acts[j][keep[j]].numpy() for j in range(chunk.shape[0])]
    return out


def word_pieces(tokenizer, rows: Tensor, language: str) -> tuple[list[np.ndarray], float]:
    """``(continues per row, tokens per unit over all rows)``: the continuing-piece rule of
    ``features.words`` for the language (words, or characters for zh/ja), and tokens per word
    (per character for zh/ja)."""
    from .features.words import FRAGMENT, continues_unit, language_has_words

    pieces = token_pieces(tokenizer, rows)
    cont = [continues_unit(p, language) for p in pieces]
    if language_has_words(language):
        lettered = [np.array([any(c.isalpha() for c in t) for t in p], dtype=bool) for p in pieces]
        units = sum(int((l & ~c).sum()) for l, c in zip(lettered, cont))
        tokens = sum(int(l.sum()) for l in lettered)
    else:       # characters: letters of the decoded rows; tokens: those holding a letter or a byte piece
        units = sum(sum(ch.isalpha() for ch in tokenizer.decode([t for t in row if t not in (BOS_ID, PAD_ID)]))
                    for row in rows.tolist())
        tokens = sum(sum(any(c.isalpha() or c == FRAGMENT for c in t) for t in p) for p in pieces)
    return cont, (tokens / units if units else float("nan"))


def reassembly_selection(model, clt, tokenizer, rows: Tensor, language: str, layer: int = 0,
                         share: float = 0.8, min_fires: int = 20) -> tuple[np.ndarray, float]:
    """``(features, base rate)``: the reassembly features of ``layer`` chosen on ``rows`` of
    ``language`` (``features.words.reassembly_features``) and the share of continuing pieces
    among the rows' tokens (what a share of a feature's firing is read against)."""
    from .features.words import reassembly_features

    acts = _layer_acts(model, clt, rows, layer)
    cont, _ = word_pieces(tokenizer, rows, language)
    fired = np.concatenate([a > 0 for a in acts])
    c = np.concatenate(cont)
    return reassembly_features(fired, c, share, min_fires), float(c.mean()) if c.size else float("nan")


def piece_activity(model, clt, rows: Tensor, features: Sequence[int], continues: Sequence[np.ndarray],
                   layer: int = 0) -> np.ndarray:
    """[rows]: the mean activation of ``features`` of ``layer`` over each row's continuing
    pieces (``continues``: per row, from :func:`word_pieces`; NaN for a row with none, or no
    features)."""
    if len(features) == 0:
        return np.full(rows.shape[0], np.nan)
    acts = _layer_acts(model, clt, rows, layer)
    f = np.asarray(features, dtype=int)
    return np.array([a[c][:, f].mean() if c.any() else np.nan for a, c in zip(acts, continues)])


# ------------------------------------------------------------------ causal transplant
MOVES = ("decoders", "activations")


def _swap_hooks(clt_from, clt_to, features: Sequence[tuple[int, int]], bos: Tensor, move: str = "decoders",
                donor: Mapping[int, Tensor] | None = None):
    """Hooks that add, at every target layer's MLP output, the change of the chosen features'
    write: ``move="decoders"``: a_f (d_f[clt_to] - d_f[clt_from]); ``"activations"``:
    (a'_f - a_f) d_f[clt_from], with a'_f the donor's activations at the same positions
    (``donor``: source layer -> [B, P, n] in the order of that layer's features). a_f is read
    by ``clt_from`` on the forward pass's own MLP inputs; BOS positions (``bos`` [B, P]) are
    left alone, as the CLT never saw them. Both CLTs share their scaling (one is trained
    further from the other, scales kept), so decoder rows compare directly."""
    from .clt.evaluate import encode_layer

    if move not in MOVES:
        raise ValueError(f"move must be one of {MOVES}, got {move!r}")
    cfg = clt_from.cfg
    by_layer: dict[int, list[int]] = {}
    for layer, f in features:
        by_layer.setdefault(int(layer), []).append(int(f))
    state: dict = {}

    def read(x, hook, layer):
        feats = torch.tensor(by_layer[layer])
        acts = encode_layer(clt_from, x.to(clt_from.W_enc.dtype), layer)[..., feats]   # [B, P, n]
        acts = acts.masked_fill(bos[..., None], 0.0)
        if move == "decoders":
            add = torch.einsum("bpn,ntd->bptd", acts, (clt_to.W_dec[layer][feats] - clt_from.W_dec[layer][feats])
                               .to(acts.dtype))
        else:
            change = (donor[layer].to(acts.dtype) - acts).masked_fill(bos[..., None], 0.0)
            add = torch.einsum("bpn,ntd->bptd", change, clt_from.W_dec[layer][feats].to(acts.dtype))
        for i, k in enumerate(clt_from.target_layers(layer)):
            state[k] = state.get(k, 0) + add[:, :, i] / clt_from.output_scale[k]
        return x

    def write(y, hook, layer):
        extra = state.pop(layer, None)
        return y if extra is None else y + extra.to(y.dtype)

    hooks = [(f"blocks.{l}.{cfg.input_hook}", partial(read, layer=l)) for l in sorted(by_layer)]
    targets = sorted({k for l in by_layer for k in clt_from.target_layers(l)})
    hooks += [(f"blocks.{k}.{cfg.output_hook}", partial(write, layer=k)) for k in targets]
    return hooks


def transplant_losses(model, clt_from, clt_to, features: Sequence[tuple[int, int]], rows: Tensor,
                      batch_size: int = 16, move: str = "decoders", donor_model=None) -> np.ndarray:
    """Per-row loss of ``model`` with ``features`` moved towards the other model (see
    :func:`_swap_hooks`): their decoders to ``clt_to``'s, or their activations to those that
    ``clt_to`` reads in ``donor_model`` on the same rows; with no features, the model's own loss."""
    from .clt.evaluate import bos_mask
    from .features.activations import CLTFeatures

    if move == "activations" and donor_model is None:
        raise ValueError("moving activations needs the donor model whose activations are moved in")
    if not features:
        return row_losses(model, rows, batch_size)
    layers = sorted({int(l) for l, _ in features})

    def hooks(chunk):
        donor = None
        if move == "activations":
            acts = CLTFeatures(donor_model, clt_to).activations(chunk)
            donor = {layer: acts[layer][..., [int(f) for l, f in features if int(l) == layer]] for layer in layers}
        return _swap_hooks(clt_from, clt_to, features, bos_mask(chunk, BOS_ID), move, donor)
    return row_losses(model, rows, batch_size, hooks)


def random_features_like(features: Sequence[tuple[int, int]], n_features: int, exclude, rng
                         ) -> list[tuple[int, int]]:
    """As many random features per layer as ``features`` has there, none of ``exclude``."""
    taken = set(map(tuple, exclude))
    out = []
    for layer in sorted({l for l, _ in features}):
        n = sum(1 for l, _ in features if l == layer)
        free = [f for f in range(n_features) if (layer, f) not in taken]
        out += [(layer, int(f)) for f in rng.choice(free, size=min(n, len(free)), replace=False)]
    return out


def closed_share(base: np.ndarray, moved: np.ndarray, finetuned: np.ndarray, n_boot: int = 1000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Share of the finetuning gain (base - finetuned loss) that moving the features closes
    (base - moved), as a ratio of means with a bootstrap interval over rows."""
    from .claims import bootstrap

    units = np.stack([base, moved, finetuned], 1)
    units = units[np.isfinite(units).all(1)]

    def ratio(u):
        gain = u[:, 0].mean() - u[:, 2].mean()
        return float((u[:, 0].mean() - u[:, 1].mean()) / gain) if gain != 0 else float("nan")
    return bootstrap(units, ratio, n_boot, seed)


# ------------------------------------------------------------------ crosscoders
def crosscoder_summary(relative: np.ndarray, low: float = 0.1, high: float = 0.9) -> dict:
    """Counts of crosscoder latents by relative decoder norm: base-only (< ``low``), shared,
    finetuned-only (> ``high``)."""
    r = np.asarray(relative, dtype=float)
    r = r[np.isfinite(r)]
    return {"latents": int(r.size), "base_only": int((r < low).sum()), "finetuned_only": int((r > high).sum()),
            "shared": int(((r >= low) & (r <= high)).sum())}


def crosscoder_tables(model_a, model_b, train_rows: Tensor, held_rows: Tensor, cfg: Mapping,
                      progress: bool = True) -> tuple[dict[str, pd.DataFrame], dict[str, Tensor]]:
    """A crosscoder (``sae.crosscoder``) on the residual stream of ``model_a`` (base) and
    ``model_b`` (finetuned) after each of ``cfg["layers"]``, trained on ``train_rows`` and read
    on ``held_rows``: ``({"norms", "quality", "scaling"}, weights)``. ``norms``: every latent's
    relative decoder norm and firing count; ``quality``: FVU per model, L0 and dead share;
    ``scaling``: the latent-scaling check of every live latent that looks specific (relative
    norm outside [0.1, 0.9]), for base-only ones with the models' roles exchanged."""
    from .features.activations import ResidualStream, kept_positions
    from .sae.crosscoder import CrosscoderConfig, latent_scaling, train_crosscoder

    @torch.no_grad()
    def resid(model, rows, layer):
        source, out = ResidualStream(model), []
        for i in range(0, rows.shape[0], 32):
            chunk = rows[i:i + 32]
            out.append(source.activations(chunk)[layer][kept_positions(chunk)])
        return torch.cat(out)

    norms, scaling, quality, tensors = [], [], [], {}
    for layer in cfg["layers"]:
        a, b = resid(model_a, train_rows, layer), resid(model_b, train_rows, layer)
        cc = train_crosscoder(a, b, CrosscoderConfig(d_in=a.shape[1], d_latent=cfg["expansion"] * a.shape[1],
                                                     k=cfg["k"], train_tokens=cfg["train_tokens"], seed=cfg["seed"]),
                              progress=progress)
        ha, hb = resid(model_a, held_rows, layer), resid(model_b, held_rows, layer)
        with torch.no_grad():
            x = torch.stack([ha, hb], 1)
            z = cc.encode(x)
            err = (x - cc.decode(z)).pow(2).sum(-1).sum(0)
            var = (x - x.mean(0)).pow(2).sum(-1).sum(0)
        quality.append({"layer": layer, "fvu_base": float(err[0] / var[0]), "fvu_finetuned": float(err[1] / var[1]),
                        "l0": float((z > 0).float().sum(1).mean()), "dead": float(((z > 0).sum(0) == 0).float().mean())})
        rel, fires = cc.relative_norms().numpy(), (z > 0).sum(0).numpy()
        norms.append(pd.DataFrame({"layer": layer, "latent": range(len(rel)), "relative_norm": rel, "fires": fires}))
        b_only = [j for j in range(len(rel)) if rel[j] > 0.9 and fires[j] > 0]
        a_only = [j for j in range(len(rel)) if rel[j] < 0.1 and fires[j] > 0]
        if b_only:
            scaling.append(latent_scaling(cc, ha, hb, b_only).assign(layer=layer, looks="finetuned-only"))
        if a_only:      # latent_scaling reads b's direction: exchange the models' roles
            scaling.append(latent_scaling(cc.swapped(), hb, ha, a_only).assign(layer=layer, looks="base-only"))
        tensors.update({f"layer_{layer}.{k}": v.detach().contiguous() for k, v in cc.state_dict().items()})
    cols = ["latent", "beta_reconstruction_a", "beta_reconstruction_b", "beta_error_a", "beta_error_b",
            "nu_reconstruction", "nu_error", "layer", "looks"]
    return ({"norms": pd.concat(norms, ignore_index=True), "quality": pd.DataFrame(quality),
             "scaling": pd.concat(scaling, ignore_index=True) if scaling else pd.DataFrame(columns=cols)}, tensors)


# ------------------------------------------------------------------ verdicts
def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def paired_row(claim_part: str, statistic: str, a, b, control: str, units: str, model: str,
               direction: str = "greater", n_boot: int = 1000, seed: int = 0, counted: bool = True,
               note: str = "") -> dict:
    """An A5 verdict row on the paired difference ``a - b`` (the part's name leads the statistic)."""
    from .claims import paired_difference, verdict

    a, b = _pair(a, b)
    if a.size < 2:
        return verdict("A5", f"{claim_part}: {statistic}", np.nan, np.nan, np.nan, control=control,
                       n_units=int(a.size), units=units, chapter="08", model=model, direction=direction,
                       counted=False, note=note or "fewer than two units to compare")
    est, lo, hi = paired_difference(a, b, n_boot, seed)
    return verdict("A5", f"{claim_part}: {statistic}", est, lo, hi, control=control, n_units=int(a.size),
                   units=units, chapter="08", model=model, direction=direction, counted=counted, note=note)


# ------------------------------------------------------------------ the chapter's tables
MEASURES = ("late", "late_reference", "middle_weak", "middle_other", "early", "early_reference")
CONDITIONS = {"base": ("base", "floor"), "weak": ("weak", "stagewise"), "mixture": ("mixture", "mixture"),
              "strong": ("strong", "strong")}          # condition -> (model, matched CLT)


def middle_layers(n_layers: int) -> list[int]:
    """Layers strictly between the first and the last (empty under three layers)."""
    return list(range(1, n_layers - 1))


def _reference(trained: Sequence[str], weak: str) -> str:
    return "en" if "en" in trained and weak != "en" else next(l for l in trained if l != weak)


def diffing_tables(models: Mapping, clts: Mapping, data: Mapping, corpus, tokenizer, weak: str, cfg: Mapping,
                   prompts: pd.DataFrame | None = None, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every table of chapter 08 from the base model and its finetunes (``models``: base, weak,
    mixture, strong) and the base CLT with its further-trained copies (``clts``: base,
    stagewise, floor, data_only, mixture, strong). ``cfg``: the diffing stage's config.

    Tables: ``losses`` (:func:`loss_table` on the test split), ``changes`` (changed features
    per variant and layer against the floor), ``features`` (per feature of the stage-wise CLT:
    the diff statistics, changed, and firing rates on the weak and reference languages' test
    verses before and after), ``transfer`` (the base CLT on the finetuned model), ``verses``
    (per test verse: measure, condition, language, row, value), ``transplant`` (per test row:
    direction, set, draw, loss), ``selection`` (which features each part reads) and ``links``
    (per cloze prompt of the weak language among ``prompts``, chapter 06's table: the
    attribution flow from middle-layer features to the late language features)."""
    from .clt.diff import changed_features, feature_diff
    from .clt.evaluate import evaluate_clt
    from .data.datasets import verse_rows
    from .features.activations import CLTFeatures, collect_unit_stats
    from .features.parallel import load_parallel
    from .features.tokens import late_layers
    from .features.words import unit_name
    from .viz.progress import progress_bar

    langs = list(cfg["trained_languages"])
    if weak not in langs:
        raise ValueError(f"the weak language {weak!r} is not one the base model was trained on: {langs}")
    ref = _reference(langs, weak)
    base_model, n_layers = models["base"], models["base"].cfg.n_layers
    n_ctx, bs, seed, n_boot = base_model.cfg.n_ctx, cfg["batch_size"], cfg["seed"], cfg["bootstrap"]
    steps = progress_bar(total=7, desc="diffing", disable=not progress)

    # 1. loss of every model on the test split
    per_lang = max(1, cfg["eval_tokens_per_language"] // n_ctx)
    test = {lang: data["test"][lang][:per_lang] for lang in langs}
    losses = {v: {lang: row_losses(m, test[lang], bs) for lang in langs} for v, m in models.items()}
    out = {"losses": loss_table(losses, "base", n_boot, seed)}
    steps.update(1)

    # 2. unit statistics of each condition on the parallel test verses; selection on validation text
    parallel = load_parallel(cfg["parallel"], langs, corpus=corpus)
    if cfg["max_rows"]:
        parallel = parallel.subset(cfg["max_rows"])
    rows = {lang: verse_rows(tokenizer, parallel.texts[lang], n_ctx) for lang in langs}
    stats = {c: {lang: collect_unit_stats(CLTFeatures(models[m], clts[k]), rows[lang], bs) for lang in langs}
             for c, (m, k) in CONDITIONS.items()}
    sel_rows = {lang: data["validation"][lang][:cfg["selection_rows"]] for lang in langs}
    sel_stats = {lang: collect_unit_stats(CLTFeatures(base_model, clts["base"]), sel_rows[lang], bs) for lang in langs}
    steps.update(1)

    # 3. feature changes against the noise floor, over the features that fire: a feature that
    # (almost) never fires keeps a tiny decoder that a few Adam steps turn anywhere, and would
    # set the floor by its noise alone
    fires = torch.cat([sum(stats["base"][lang].counts[l] for lang in langs) for l in range(n_layers)]).numpy()
    live = fires >= cfg.get("min_fires", 10)
    floor = feature_diff(clts["base"], clts["floor"])[live]
    diffs = {}
    for v in ("stagewise", "data_only", "mixture", "strong", "floor"):
        d = feature_diff(clts["base"], clts[v]).assign(live=live, changed=False)
        d.loc[live, "changed"] = changed_features(d[live], floor, cfg["floor_quantile"])["changed"].to_numpy()
        diffs[v] = d
    out["changes"] = pd.concat([d[d["live"]].groupby("layer")["changed"].agg(["sum", "size"]).reset_index()
                                .assign(variant=v) for v, d in diffs.items()], ignore_index=True
                               ).rename(columns={"sum": "changed", "size": "features"})
    steps.update(1)

    late = late_layers(n_layers)
    late_feats = {lang: late_language_features(sel_stats, lang, late, cfg["min_frequency"], cfg["min_concentration"])
                  for lang in (weak, ref)}
    mid = middle_layers(n_layers) or list(range(n_layers))
    verse_parts = []

    def add(measure, cond, lang, values):
        verse_parts.append(pd.DataFrame({"measure": measure, "condition": cond, "language": lang,
                                         "row": np.arange(len(values)), "value": values}))

    for c in CONDITIONS:
        add("late", c, weak, feature_activity(stats[c][weak], late_feats[weak]))
        add("late_reference", c, ref, feature_activity(stats[c][ref], late_feats[ref]))
        w, o = weak_pair_gaps(stats[c], weak, mid, cfg["dense_fraction"])
        add("middle_weak", c, weak, w)
        add("middle_other", c, weak, o)
    selection = [{"part": "late", "language": lang, "layers": ",".join(map(str, late)),
                  "features": len(late_feats[lang])} for lang in (weak, ref)]
    selection.append({"part": "middle", "language": weak, "layers": ",".join(map(str, mid))})
    for lang, measure in ((weak, "early"), (ref, "early_reference")):
        chosen, rate = reassembly_selection(base_model, clts["base"], tokenizer, sel_rows[lang], lang, 0,
                                            cfg["reassembly_share"])
        cont, ppw = word_pieces(tokenizer, rows[lang], lang)
        selection.append({"part": "early", "language": lang, "layers": "0", "features": len(chosen),
                          "unit": unit_name(lang), "tokens_per_unit": ppw, "continuing_share": rate})
        if len(chosen):
            for c, (m, k) in CONDITIONS.items():
                add(measure, c, lang, piece_activity(models[m], clts[k], rows[lang], chosen, cont, 0))
    out["verses"] = pd.concat(verse_parts, ignore_index=True)
    out["selection"] = pd.DataFrame(selection)
    steps.update(1)

    # per feature of the stage-wise CLT: the diff and firing rates before and after
    feat = diffs["stagewise"].copy()
    for lang in (weak, ref):
        for c in ("base", "weak"):
            s = stats[c][lang]
            feat[f"rate_{lang}_{c}"] = np.concatenate([s.counts[l].double().numpy() / max(s.n_tokens, 1)
                                                       for l in range(n_layers)])
    out["features"] = feat

    # 4. transfer: the base CLT read on the finetuned model, against the matched CLT
    pairs = {"base model, base CLT": ("base", "base"), "finetuned model, base CLT (transfer)": ("weak", "base"),
             "finetuned model, stage-wise CLT": ("weak", "stagewise")}
    sets = {lang: test[lang] for lang in (weak, ref)}
    parts = []
    for name, (m, k) in pairs.items():
        ev = evaluate_clt(models[m], clts[k], sets, batch_size=bs, pooled_languages=list(sets))
        fvu = ev["layers"].groupby("language")["fvu"].mean()
        parts.append(ev["languages"][["language", "ce_recovered", "kl"]].assign(
            pair=name, fvu=lambda d: [float(fvu.get(x, np.nan)) for x in d["language"]]))
    out["transfer"] = pd.concat(parts, ignore_index=True)
    steps.update(1)

    # 5. the causal transplant, on the weak language's test rows
    rng = np.random.default_rng(seed)
    n_set = max(1, len(late_feats[weak]))
    # middle features that changed beyond the floor, those firing most on the weak language's
    # own verses first (a feature silent there cannot change its loss); then unchanged ones
    weak_count = torch.cat([stats["base"][weak].counts[l] for l in range(n_layers)]).numpy()
    candidates = diffs["stagewise"].assign(weak_count=weak_count)
    candidates = candidates[candidates["live"] & (weak_count >= cfg.get("min_fires", 10))
                            & candidates["layer"].isin(middle_layers(n_layers))]
    candidates = candidates.sort_values(["changed", "weak_count"], ascending=False).head(n_set)
    mid_set = [(int(r.layer), int(r.feature)) for r in candidates.itertuples()]
    sets_ = {"late": late_feats[weak], "middle": mid_set}
    F = clts["base"].cfg.d_features
    rows_w = test[weak][:cfg.get("transplant_rows")]
    tp = []

    def put(direction, move, set_name, draw, values):
        tp.append(pd.DataFrame({"direction": direction, "move": move, "set": set_name, "draw": draw,
                                "row": np.arange(len(values)), "loss": values}))

    put("base to finetuned", "none", "none", 0, losses["base"][weak][:len(rows_w)])
    put("base to finetuned", "none", "finetuned model", 0, losses["weak"][weak][:len(rows_w)])
    ends = {"base to finetuned": (base_model, clts["floor"], clts["stagewise"], models["weak"]),
            "finetuned to base": (models["weak"], clts["stagewise"], clts["floor"], base_model)}
    for name, feats in sets_.items():
        if not feats:
            continue
        draws = [random_features_like(feats, F, feats, rng) for _ in range(int(cfg["transplant_draws"]))]
        for direction, (m, c_from, c_to, donor) in ends.items():
            for move in MOVES:
                run = partial(transplant_losses, m, c_from, c_to, rows=rows_w, batch_size=bs, move=move,
                              donor_model=donor)
                put(direction, move, name, 0, run(feats))
                for d, rand in enumerate(draws):
                    put(direction, move, f"random {name}", d, run(rand))
    out["transplant"] = pd.concat(tp, ignore_index=True)
    steps.update(1)

    # 6. links: attribution graphs of the weak language's cloze prompts, matched CLTs
    from .prompts import context_ids

    mine = prompts[prompts["language"] == weak].copy() if prompts is not None else pd.DataFrame()
    if len(mine):
        mine["ids"] = [context_ids(tokenizer, tokenizer.encode(t, add_special_tokens=False), n_ctx)
                       for t in mine["prompt"]]
        conditions = {c: (models[m], clts[k]) for c, (m, k) in CONDITIONS.items() if c != "strong"}
        out["links"] = link_table(conditions, mine, mid, late_feats[weak], cfg, progress=False)
    else:
        out["links"] = pd.DataFrame(columns=["condition", "prompt_id", "link_share", "replacement", "completeness"])
    steps.update(1)
    steps.close()
    return out


def transplant_summary(transplant: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per direction, move and feature set: the share of the base-to-finetuned loss change that
    moving the features produces, with a bootstrap interval over rows (random sets: the mean
    over draws, per row). ``finetuned to base`` reads as the share of the gain it undoes."""
    def per_row(t):
        return t.groupby("row")["loss"].mean().sort_index().to_numpy()

    ref = transplant[transplant["move"] == "none"]
    base = per_row(ref[ref["set"] == "none"])
    tuned = per_row(ref[ref["set"] == "finetuned model"])
    rows = []
    for (direction, move, set_name), t in transplant[transplant["move"] != "none"].groupby(
            ["direction", "move", "set"], sort=False):
        moved = per_row(t)
        if direction == "base to finetuned":
            est, lo, hi = closed_share(base, moved, tuned, n_boot, seed)
        else:   # the finetuned model moved back: the share of its gain undone
            est, lo, hi = closed_share(tuned, moved, base, n_boot, seed)
        rows.append({"direction": direction, "move": move, "set": set_name, "share": est, "low": lo, "high": hi,
                     "draws": int(t["draw"].nunique()), "rows": len(moved)})
    return pd.DataFrame(rows)


def instrument_agreement(changes: pd.DataFrame, norms: pd.DataFrame, low: float = 0.1, high: float = 0.9
                         ) -> pd.DataFrame:
    """Per layer: the share of stage-wise CLT features changed beyond the floor (and the data-only
    share) beside the share of crosscoder latents that look specific to one model (relative
    decoder norm outside [low, high], among latents that fire on held-out text)."""
    ch = changes.assign(share=changes["changed"] / changes["features"]).pivot(index="layer", columns="variant",
                                                                              values="share")
    live = norms[norms["fires"] > 0]
    cc = live.groupby("layer")["relative_norm"].apply(lambda r: float(((r < low) | (r > high)).mean()))
    out = pd.DataFrame({"layer": ch.index, "clt_changed": ch.get("stagewise"), "clt_data_only": ch.get("data_only"),
                        "clt_floor": ch.get("floor")}).reset_index(drop=True)
    out["crosscoder_specific"] = [float(cc.get(l, np.nan)) for l in out["layer"]]
    return out


def a5_verdicts(verses: pd.DataFrame, weak: str, model: str, n_boot: int = 1000, seed: int = 0,
                links: pd.DataFrame | None = None) -> list[dict]:
    """The A5 rows from the ``verses`` table: for each part (late, middle, early), whether the
    weak-language finetune (finetuned model, stage-wise CLT) raises it beyond the base (base
    model, floor CLT: trained the same budget on the unchanged model) and beyond the mixture
    finetune ("more training"), paired over test verses; and the static part of the claim
    (the weak language's middle-layer overlap below the other pairs'). ``links`` (the
    ``links`` table): the same comparisons of the attribution flow, paired over cloze prompts.
    The level of the late
    and early features against the reference language is shown, not counted: the two sides are
    different feature sets."""
    def v(measure, condition):
        t = verses[(verses["measure"] == measure) & (verses["condition"] == condition)]
        return t.sort_values("row")["value"].to_numpy(dtype=float)

    common = dict(model=model, n_boot=n_boot, seed=seed, units="verses")
    floor = "the base model read by the floor CLT (the base CLT trained the same budget on the unchanged base model)"
    more = "the mixture finetune of equal budget, read by its own further-trained CLT"
    rows = []
    for measure, part, what in (("late", "late layers", f"activity of {weak}'s late language features on {weak} verses"),
                                ("middle_weak", "middle layers",
                                 f"overlap gap (translations minus other verses) of the pairs with {weak}"),
                                ("early", "early layers",
                                 f"activity of the first layer's word-reassembly features on {weak}'s continuing pieces")):
        if measure not in set(verses["measure"]):
            note = (f"no word-reassembly feature of {weak} passes the rule on validation text"
                    if measure == "early" else f"no late language feature of {weak}")
            for against in ("base", "mixture"):
                rows.append(paired_row(part, f"{what}, finetuned minus {against}", [], [], floor, "verses", model,
                                       counted=False, note=note, n_boot=n_boot, seed=seed))
            continue
        rows.append(paired_row(part, f"{what}, {weak} finetune minus base", v(measure, "weak"), v(measure, "base"),
                               floor, **common))
        rows.append(paired_row(part, f"{what}, {weak} finetune minus mixture finetune", v(measure, "weak"),
                               v(measure, "mixture"), more, **common))
    if links is not None and len(links):
        def lk(condition):
            return links[links["condition"] == condition].sort_values("prompt_id")["link_share"].to_numpy(dtype=float)
        what = f"attribution flow from middle-layer features to {weak}'s late language features, share of the graph"
        rows.append(paired_row("links", f"{what}, {weak} finetune minus base", lk("weak"), lk("base"), floor,
                               units="cloze prompts", model=model, n_boot=n_boot, seed=seed))
        rows.append(paired_row("links", f"{what}, {weak} finetune minus mixture finetune", lk("weak"), lk("mixture"),
                               more, units="cloze prompts", model=model, n_boot=n_boot, seed=seed))
    else:
        for against in ("base", "mixture"):
            rows.append(paired_row("links", f"attribution flow to {weak}'s late language features, finetuned minus "
                                   f"{against}", [], [], floor, "cloze prompts", model, counted=False,
                                   note=f"no cloze prompt in {weak}", n_boot=n_boot, seed=seed))
    if "middle_other" in set(verses["measure"]):
        rows.append(paired_row("middle layers", f"overlap gap of the pairs with {weak} minus the other pairs, base",
                               v("middle_weak", "base"), v("middle_other", "base"),
                               "the same verses' gap between the other languages", direction="less", **common))
    for measure, part in (("late", "late layers"), ("early", "early layers")):
        ref = f"{measure}_reference"
        if measure in set(verses["measure"]) and ref in set(verses["measure"]):
            lang = verses.loc[verses["measure"] == ref, "language"].iloc[0]
            rows.append(paired_row(part, f"level in the base model, {weak} minus {lang} (each its own features)",
                                   v(measure, "base"), v(ref, "base"), f"{lang}'s own features on the same verses",
                                   direction="less" if measure == "late" else "greater", counted=False,
                                   note="two different feature sets: a level, not a like-for-like test", **common))
    return rows


# ------------------------------------------------------------------ links (attribution graphs)
def link_share(graph, middle: Sequence[int], late_features: Sequence[tuple[int, int]]) -> float:
    """In a circuit-tracer graph: the summed |direct effect| of every middle-layer feature node
    on the late language features' nodes, over the summed |direct effect| into every feature
    and logit node (the whole graph's flow; unpruned, so that a link is not lost to a
    threshold)."""
    adj = graph.adjacency_matrix.float().abs().cpu()
    feats = graph.active_features[graph.selected_features].cpu()        # [n, 3]: layer, pos, feature
    n_feat = feats.shape[0]
    layer, feature = feats[:, 0], feats[:, 2]
    mid = torch.isin(layer, torch.tensor(list(middle), dtype=layer.dtype))
    late = torch.zeros(n_feat, dtype=torch.bool)
    for l, f in late_features:
        late |= (layer == l) & (feature == f)
    total = adj[:n_feat].sum() + adj[-len(graph.logit_targets):].sum()
    if not late.any() or not mid.any() or total <= 0:
        return 0.0
    return float(adj[:n_feat][late][:, :n_feat][:, mid].sum() / total)


def link_table(conditions: Mapping[str, tuple], prompts: pd.DataFrame, middle: Sequence[int],
               late_features: Sequence[tuple[int, int]], cfg: Mapping, progress: bool = True) -> pd.DataFrame:
    """Per cloze prompt (``prompts``: prompt_id, ids, target_token) and condition (name ->
    (model, clt)): the :func:`link_share` of its logit graph and circuit-tracer's graph scores."""
    from .graphs.attribution import graph_for_prompt, graph_scores
    from .graphs.circuit_tracer import build_replacement_model
    from .viz.progress import progress_bar

    rows = []
    bar = progress_bar(total=len(conditions) * len(prompts), desc="link graphs", disable=not progress)
    try:
        for name, (model, clt) in conditions.items():
            rm = build_replacement_model(model, clt)
            try:
                for p in prompts.itertuples():
                    graph = graph_for_prompt(rm, torch.tensor(p.ids), int(p.target_token),
                                             batch_size=cfg.get("graph_batch_size", 64))
                    rows.append({"condition": name, "prompt_id": int(p.prompt_id),
                                 "link_share": link_share(graph, middle, late_features), **graph_scores(graph)})
                    bar.update(1)
            finally:
                rm.reset_hooks(including_permanent=True)
    finally:
        bar.close()
    return pd.DataFrame(rows, columns=["condition", "prompt_id", "link_share", "replacement", "completeness"])

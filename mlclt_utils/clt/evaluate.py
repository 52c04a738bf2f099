"""How good a trained CLT is: reconstruction, sparsity, and the replacement model.

Reconstruction (per layer, streamed over batches of token rows):

* FVU = E||y - y^||^2 / E||y - mean(y)||^2, with the TARGET's variance in the denominator.
  It is computed on raw MLP outputs; the per-layer normalisation multiplies numerator and
  denominator by the same s_out[l]^2, so the value equals the one in normalised space.
* L0: mean number of active features per token, per layer.
* Dead features: fraction of a layer's features that never fired on the tokens seen
  (the window is ``n_tokens``).

Replacement model: the model runs as usual (attention, LayerNorm, embeddings, unembedding),
but at every layer k the MLP output (``blocks.k.hook_mlp_out``) is replaced by the CLT's
reconstruction y^_k = sum_{l <= k} W_dec[l -> k] a_l + b_dec[k], where the features a_l
read the MLP input of the replacement forward pass itself (``blocks.l.ln2.hook_normalized``).
One forward pass with hooks does it, layer by layer. Metrics, per language: next-token CE of
the original, the replacement and the zero-ablated model (every MLP output set to 0), KL
(original || replacement) per token, top-1 agreement, and CE loss recovered =
(CE_zero - CE_replacement) / (CE_zero - CE_original).

BOS positions. The CLT is trained without BOS tokens, so at BOS positions the replacement
(and the zero ablation) keep the model's own MLP output, as circuit-tracer leaves position 0
out of its graphs. Scored predictions are those made at a non-BOS position about a non-BOS
next token, for every metric alike. (The first prediction of a row, made at the BOS, is
therefore not scored: the CE here differs slightly from the training chapter's.)

With ``add_error=True`` each replaced output gets the error term y_k - y^_k, where y_k is the
true MLP output computed inside the same forward pass: the sum is the true output, so the
model with error terms reproduces the original logits (up to float rounding). That is the
"local replacement model" circuit-tracer attributes through.

The replacement forward is written here because no installed library runs a
TransformerLens model with its MLPs swapped for this CLT: circuit-tracer only hooks features
on top of the real MLPs, and sae-lens splices single-layer SAEs.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..artifacts import Stage, atomic_path
from ..corpus import PAD_ID
from .activations import _bos_id, collect_mlp_io, kept_mask


# ------------------------------------------------------------------ per-layer CLT ------

def encode_layer(clt, x: Tensor, layer: int) -> Tensor:
    """Activations [..., F] of ``clt``'s layer ``layer`` from raw MLP inputs [..., d].

    The same as ``clt.encode`` restricted to one layer (every activation mode is per layer
    at inference), without computing the other layers: the replacement forward needs each
    layer's features before the next layer's input exists. BatchTopK uses its inference
    threshold, so the CLT must be in eval mode.
    """
    cfg = clt.cfg
    h = (x * clt.input_scale[layer]) @ clt.W_enc[layer] + clt.b_enc[layer]
    if cfg.activation == "jumprelu":
        return h * (h > clt.log_threshold[layer].exp())
    if cfg.activation == "topk":
        vals, idx = h.topk(min(cfg.k, cfg.d_features), dim=-1)
        return torch.zeros_like(h).scatter(-1, idx, vals.relu())
    if clt.training:
        raise RuntimeError("a BatchTopK CLT selects over the batch in training mode; call .eval()")
    return h * (h > clt.batchtopk_threshold[layer])


def decode_contributions(clt, acts: Tensor, layer: int) -> Tensor:
    """[..., n_targets, d]: what source layer ``layer`` writes to each of its target layers,
    in normalised space (no bias)."""
    W = clt.W_dec[layer]                                  # [F, T, d]
    out = acts @ W.reshape(W.shape[0], -1)
    return out.view(*acts.shape[:-1], W.shape[1], W.shape[2])


def bos_mask(tokens: Tensor, bos_id: int) -> Tensor:
    """True at BOS positions (position 0 of every row and any ``bos_id`` token): the
    complement of the positions the CLT is trained on (``activations.kept_mask``)."""
    return ~kept_mask(tokens, bos_id)


# ------------------------------------------------------------------ reconstruction ------

class ReconstructionStats:
    """Streaming per-layer FVU, L0 and dead-feature counts (float64 sums).

    ``frame()`` columns: layer, fvu, mse and target_variance (per-token means of squared
    norms, raw space), l0, dead_fraction, n_dead, n_tokens (the dead-feature window)."""

    def __init__(self, n_layers: int, d_model: int, n_features: int):
        self.n = 0
        self.sq_err = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_y = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.sum_y2 = torch.zeros(n_layers, dtype=torch.float64)
        self.active = torch.zeros(n_layers, dtype=torch.float64)
        self.fired = torch.zeros(n_layers, n_features, dtype=torch.bool)

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor, acts: Tensor) -> None:
        """``y``, ``y_hat``: [n, L, d] targets and reconstructions; ``acts``: [n, L, F]."""
        y, y_hat = y.detach().double().cpu(), y_hat.detach().double().cpu()
        on = acts.detach().cpu() > 0
        self.n += y.shape[0]
        self.sq_err += (y - y_hat).pow(2).sum((0, 2))
        self.sum_y += y.sum(0)
        self.sum_y2 += y.pow(2).sum((0, 2))
        self.active += on.sum((0, 2)).double()
        self.fired |= on.any(0)

    def frame(self):
        import pandas as pd

        n = max(self.n, 1)
        variance = (self.sum_y2 - self.sum_y.pow(2).sum(-1) / n) / n
        mse = self.sq_err / n
        fvu = torch.where(variance > 0, mse / variance.clamp_min(1e-300),
                          torch.full_like(mse, math.nan))
        dead = ~self.fired
        return pd.DataFrame({
            "layer": range(len(mse)),
            "fvu": fvu.tolist(),
            "mse": mse.tolist(),
            "target_variance": variance.tolist(),
            "l0": (self.active / n).tolist(),
            "dead_fraction": dead.double().mean(-1).tolist(),
            "n_dead": dead.sum(-1).tolist(),
            "n_tokens": [self.n] * len(mse),
        })


def _row_chunks(tokens: Tensor, rows: int):
    for i in range(0, tokens.shape[0], rows):
        yield tokens[i:i + rows]


@torch.no_grad()
def reconstruction_metrics(model, clt, tokens: Tensor, batch_size: int = 16,
                           bos_id: int | None = None):
    """Per-layer FVU, L0 and dead features of ``clt`` on token rows ``tokens`` [M, n_ctx]
    (BOS positions excluded, as in training), streamed ``batch_size`` rows at a time.
    Returns a DataFrame with one row per layer."""
    return _reconstruction_stats(model, clt, {"_": tokens}, batch_size, bos_id)["_"].frame()


def _reconstruction_stats(model, clt, tokens_by_lang: Mapping[str, Tensor], batch_size: int,
                          bos_id: int | None = None,
                          pooled: ReconstructionStats | None = None) -> dict:
    clt.eval()
    device = clt.W_enc.device
    cfg = clt.cfg
    bos = _bos_id(model, bos_id)
    out = {}
    for lang, tokens in tokens_by_lang.items():
        stats = ReconstructionStats(cfg.n_layers, cfg.d_model, cfg.d_features)
        for chunk in _row_chunks(tokens, batch_size):
            x, y = collect_mlp_io(model, chunk, batch_size, bos_id=bos,
                                  input_hook=cfg.input_hook, output_hook=cfg.output_hook)
            x, y = x.to(device, clt.W_enc.dtype), y.to(device, clt.W_enc.dtype)
            y_hat, acts = clt(x)
            stats.update(y, y_hat, acts)
            if pooled is not None:
                pooled.update(y, y_hat, acts)
        out[lang] = stats
    return out


# ------------------------------------------------------------------ replacement model ---

def _replacement_hooks(model, clt, keep: Tensor, mode: str, store: dict | None = None):
    """Forward hooks for one batch. ``mode``: "replace", "replace+error" or "zero".
    ``keep`` [B, P]: positions (BOS) where the model's own MLP output is kept."""
    cfg = clt.cfg
    L, d = cfg.n_layers, cfg.d_model
    keep = keep[..., None]
    state: dict = {}

    def encode(x, hook, layer):
        acts = encode_layer(clt, x.to(clt.W_enc.dtype), layer)
        acts = acts.masked_fill(keep, 0.0)
        if "acc" not in state:
            state["acc"] = torch.zeros(*x.shape[:-1], L, d, dtype=acts.dtype, device=acts.device)
        targets = clt.target_layers(layer)
        state["acc"][..., targets[0]:targets[-1] + 1, :] += decode_contributions(clt, acts, layer)
        if store is not None:
            store.setdefault("acts", {})[layer] = acts
        return x

    def replace(y, hook, layer):
        if mode == "zero":
            new = torch.zeros_like(y)
        else:
            recon = ((state["acc"][..., layer, :] + clt.b_dec[layer]) / clt.output_scale[layer])
            recon = recon.to(y.dtype)
            new = recon + (y - recon) if mode == "replace+error" else recon
            if store is not None:
                store.setdefault("recon", {})[layer] = recon
                store.setdefault("mlp_out", {})[layer] = y
        return torch.where(keep, y, new)

    hooks = []
    for layer in range(L):
        if mode != "zero":
            hooks.append((f"blocks.{layer}.{cfg.input_hook}", partial(encode, layer=layer)))
        hooks.append((f"blocks.{layer}.{cfg.output_hook}", partial(replace, layer=layer)))
    return hooks


@torch.no_grad()
def replacement_logits(model, clt, tokens: Tensor, add_error: bool = False,
                       bos_id: int | None = None, return_store: bool = False):
    """Logits [B, P, V] of the replacement model on ``tokens`` [B, P] (see the module doc).
    With ``return_store``, also a dict with per-layer ``acts`` [B, P, F], ``recon`` and
    ``mlp_out`` [B, P, d] of the replacement forward pass."""
    clt.eval()
    keep = bos_mask(tokens, _bos_id(model, bos_id)).to(tokens.device)
    store = {} if return_store else None
    hooks = _replacement_hooks(model, clt, keep, "replace+error" if add_error else "replace", store)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
    return (logits, store) if return_store else logits


@torch.no_grad()
def zero_ablation_logits(model, tokens: Tensor, clt=None, bos_id: int | None = None) -> Tensor:
    """Logits with every MLP output set to 0 (except at BOS positions, like the replacement)."""
    n_layers = model.cfg.n_layers
    keep = bos_mask(tokens, _bos_id(model, bos_id))[..., None]
    hook_name = clt.cfg.output_hook if clt is not None else "hook_mlp_out"

    def zero(y, hook):
        return torch.where(keep, y, torch.zeros_like(y))

    hooks = [(f"blocks.{l}.{hook_name}", zero) for l in range(n_layers)]
    return model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")


class ReplacementStats:
    """Streaming sums of the replacement-model metrics over scored positions."""

    def __init__(self):
        self.n = 0
        self.ce = {"original": 0.0, "replacement": 0.0, "zero_ablation": 0.0}
        self.kl = 0.0
        self.agree = 0.0

    def update(self, targets: Tensor, scored: Tensor, original: Tensor, replacement: Tensor,
               zero: Tensor) -> None:
        lp = {name: F.log_softmax(t[scored].float(), -1)
              for name, t in (("original", original), ("replacement", replacement),
                              ("zero_ablation", zero))}
        tgt = targets[scored]
        self.n += int(tgt.numel())
        for name, v in lp.items():
            self.ce[name] += float(-v.gather(-1, tgt[:, None]).double().sum())
        p = lp["original"].exp()
        self.kl += float((p * (lp["original"] - lp["replacement"])).sum(-1).double().sum())
        self.agree += float((lp["original"].argmax(-1) == lp["replacement"].argmax(-1)).sum())

    def row(self) -> dict:
        n = max(self.n, 1)
        ce = {k: v / n for k, v in self.ce.items()}
        gap = ce["zero_ablation"] - ce["original"]
        recovered = (ce["zero_ablation"] - ce["replacement"]) / gap if gap != 0 else math.nan
        return {"n_tokens": self.n, "ce_original": ce["original"],
                "ce_replacement": ce["replacement"], "ce_zero_ablation": ce["zero_ablation"],
                "ce_recovered": recovered, "kl": self.kl / n, "top1_agreement": self.agree / n}


@torch.no_grad()
def replacement_metrics(model, clt, tokens_by_lang: Mapping[str, Tensor], batch_size: int = 16,
                        add_error: bool = False, bos_id: int | None = None, pooled: bool = True):
    """Per-language replacement-model metrics (DataFrame, one row per language and, with
    ``pooled``, a row ``"all"`` over every scored token): n_tokens, ce_original,
    ce_replacement, ce_zero_ablation, ce_recovered, kl (original || replacement, nats per
    token), top1_agreement. ``tokens_by_lang``: ``{lang: LongTensor [M, n_ctx]}``."""
    import pandas as pd

    clt.eval()
    bos = _bos_id(model, bos_id)
    device = next(model.parameters()).device
    rows, total = [], ReplacementStats()
    for lang, tokens in tokens_by_lang.items():
        stats = ReplacementStats()
        for chunk in _row_chunks(tokens, batch_size):
            chunk = chunk.to(device)
            mask = bos_mask(chunk, bos)
            scored = ~mask[:, :-1] & ~mask[:, 1:]
            original = model(chunk, return_type="logits")[:, :-1]
            replaced = replacement_logits(model, clt, chunk, add_error=add_error, bos_id=bos)[:, :-1]
            zero = zero_ablation_logits(model, chunk, clt, bos_id=bos)[:, :-1]
            for s in (stats, total):
                s.update(chunk[:, 1:], scored, original, replaced, zero)
        rows.append({"language": lang, **stats.row()})
    if pooled and len(rows) > 1:
        rows.append({"language": "all", **total.row()})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ stage ---------------

def _find_clt_folder(path):
    from .formats import CONFIG_FILE, WEIGHTS_FILE

    for folder in (path, path / "clt", path / "final"):
        if (folder / WEIGHTS_FILE).exists() and (folder / CONFIG_FILE).exists():
            return folder
    raise FileNotFoundError(f"no CLT ({WEIGHTS_FILE} + {CONFIG_FILE}) in {path}")


def _eval_sets(data, split: str) -> dict:
    sets = data[split] if isinstance(data, Mapping) else data[1][split]
    return dict(sets)


def evaluate_clt_stage(run: str, model_name: str, root=None, cross_layer: bool = True,
                       device: str = "cpu", split: str = "validation",
                       max_tokens_per_language: int | None = None, batch_size: int = 16,
                       force: bool = False, activation: str = "jumprelu") -> dict:
    """Evaluate the CLT (``cross_layer=True``, stage ``clt/<model>``) or per-layer
    transcoder (stage ``plt/<model>``) of ``model_name`` on the ``split`` eval sets of its
    mixture. Writes ``metrics_layers.csv`` (per language and ``all``: per-layer FVU, L0,
    dead features) and ``metrics_languages.csv`` (replacement-model metrics per language)
    to the stage ``clt_eval/<model>`` (or ``plt_eval/<model>``), whose manifest records the
    CLT, model and data stages it read. Returns ``{"layers": df, "languages": df}``; a
    stage already built from the same config and inputs is read back unless ``force``.

    ``max_tokens_per_language``: default the CLT stage's ``eval_tokens`` when its config
    has one, else every row.
    """
    import pandas as pd

    from ..models import load_model, parse_model_name
    from ..presets import mixture_name
    from .formats import load_clt

    from .train import stage_name

    kind = stage_name(model_name, cross_layer, activation).split("/")[0]
    clt_stage = Stage(run, f"{kind}/{model_name}", root)
    clt_manifest = clt_stage.require()
    model_stage = Stage(run, f"models/{model_name}", root)
    _, share = parse_model_name(model_name)
    data_stage = Stage(run, f"data/{mixture_name(share)}", root)
    if max_tokens_per_language is None:
        cfg = clt_manifest.get("config", {})
        section = cfg.get("clt") if isinstance(cfg.get("clt"), Mapping) else {}
        max_tokens_per_language = cfg.get("eval_tokens", section.get("eval_tokens"))
    config = {"model_name": model_name, "kind": kind, "split": split,
              "max_tokens_per_language": max_tokens_per_language, "batch_size": batch_size}
    stage = Stage(run, f"{kind}_eval/{model_name}", root)
    if stage.matches(config) and not force:
        return {"layers": pd.read_csv(stage.file("metrics_layers.csv")),
                "languages": pd.read_csv(stage.file("metrics_languages.csv"))}

    from ..corpus import load_data_stage

    t0 = time.time()
    clt = load_clt(_find_clt_folder(clt_stage.path), device=device)
    model = load_model(run, model_name, root=root, device=device)
    sets = _eval_sets(load_data_stage(run, share, root), split)
    if max_tokens_per_language:
        sets = {lang: t[:max(1, math.ceil(max_tokens_per_language / t.shape[1]))]
                for lang, t in sets.items()}

    cfg = clt.cfg
    pooled = ReconstructionStats(cfg.n_layers, cfg.d_model, cfg.d_features)
    per_lang = _reconstruction_stats(model, clt, sets, batch_size, pooled=pooled)
    layers = pd.concat([s.frame().assign(language=lang) for lang, s in
                        {**per_lang, "all": pooled}.items()], ignore_index=True)
    layers = layers[["language"] + [c for c in layers.columns if c != "language"]]
    t1 = time.time()
    languages = replacement_metrics(model, clt, sets, batch_size=batch_size)
    t2 = time.time()

    stage.start()
    for name, df in (("metrics_layers.csv", layers), ("metrics_languages.csv", languages)):
        with atomic_path(stage.file(name)) as tmp:
            df.to_csv(tmp, index=False)
    stage.finish(config, inputs=[s for s in (clt_stage, model_stage, data_stage) if s.is_complete()],
                 timings={"reconstruction_seconds": t1 - t0, "replacement_seconds": t2 - t1})
    return {"layers": layers, "languages": languages}


def load_clt_eval(run: str, model_name: str, root=None, cross_layer: bool = True,
                  activation: str = "jumprelu") -> dict:
    """The tables written by ``evaluate_clt_stage``."""
    import pandas as pd

    from .train import stage_name

    kind = stage_name(model_name, cross_layer, activation).split("/")[0]
    stage = Stage(run, f"{kind}_eval/{model_name}", root)
    stage.require()
    return {"layers": pd.read_csv(stage.file("metrics_layers.csv")),
            "languages": pd.read_csv(stage.file("metrics_languages.csv"))}


# ------------------------------------------------------------------ feature examples ----

def _decode(model, ids: list[int]) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(str(i) for i in ids)
    return tok.decode(ids)


def _marked_context(model, ids: list[int], pos: int) -> str:
    """The text of ``ids`` with token ``pos`` in [[ ]]. With a fast tokenizer the mark comes
    from re-encoding the text with character offsets, so a byte-level token that is only part
    of a character (common in Chinese) marks that whole character instead of printing
    replacement characters; the text is marked piecewise when re-encoding does not give
    ``ids`` back (a window cut inside a character)."""
    tok = getattr(model, "tokenizer", None)
    if getattr(tok, "is_fast", False):
        text = tok.decode(ids)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == ids:
            a, b = enc["offset_mapping"][pos]
            return f"{text[:a]}[[{text[a:b]}]]{text[b:]}"
    return f"{_decode(model, ids[:pos])}[[{_decode(model, [ids[pos]])}]]{_decode(model, ids[pos + 1:])}"


@torch.no_grad()
def top_activating_examples(model, clt, tokens_by_lang: Mapping[str, Tensor], layer: int,
                            feature: int, k: int = 10, per_language: bool = True,
                            window: int | None = 12, after: int | None = 2, batch_size: int = 16,
                            bos_id: int | None = None, pad_id: int | None = PAD_ID):
    """Top activating token positions of feature ``feature`` of layer ``layer``, read on the
    original model's MLP inputs (BOS and ``pad_id`` positions excluded, so rows of
    ``corpus.verse_rows`` work: one verse per row).

    Returns a DataFrame sorted by activation (descending) with columns language, row,
    position, activation, token, context; ``k`` rows per language (``per_language``) or
    ``k`` overall. ``context`` shows up to ``window`` tokens before the position, the token
    itself in [[ ]], and ``after`` tokens after it (None: the rest of the row on that side).
    Features that never fire give no rows.
    """
    import pandas as pd

    clt.eval()
    bos = _bos_id(model, bos_id)
    device = next(model.parameters()).device
    name = f"blocks.{layer}.{clt.cfg.input_hook}"
    found = []
    for lang, tokens in tokens_by_lang.items():
        best_v = torch.empty(0)
        best_i = torch.empty(0, dtype=torch.long)
        for start in range(0, tokens.shape[0], batch_size):
            chunk = tokens[start:start + batch_size].to(device)
            _, cache = model.run_with_cache(chunk, names_filter=[name], stop_at_layer=layer + 1)
            x = cache[name].to(clt.W_enc.dtype)
            acts = encode_layer(clt, x, layer)[..., feature]
            skip = bos_mask(chunk, bos)
            if pad_id is not None:
                skip |= chunk == pad_id
            acts = acts.masked_fill(skip, 0.0).flatten().cpu()
            idx = torch.arange(acts.numel()) + start * tokens.shape[1]
            best_v, order = torch.cat([best_v, acts]).topk(min(k, best_v.numel() + acts.numel()))
            best_i = torch.cat([best_i, idx])[order]
        for v, i in zip(best_v.tolist(), best_i.tolist()):
            if v > 0:
                row, pos = divmod(i, tokens.shape[1])
                found.append((lang, row, pos, v))
    found.sort(key=lambda r: -r[3])
    if not per_language:
        found = found[:k]
    out = []
    for lang, row, pos, v in found:
        ids = tokens_by_lang[lang][row].tolist()
        left = ids[:pos] if window is None else ids[max(0, pos - window):pos]
        right = ids[pos + 1:] if after is None else ids[pos + 1:pos + 1 + after]
        left, right = ([t for t in side if t not in (bos, pad_id)] for side in (left, right))
        token = _decode(model, [ids[pos]])
        context = _marked_context(model, left + [ids[pos]] + right, len(left))
        out.append({"language": lang, "row": row, "position": pos, "activation": v,
                    "token": token, "context": context})
    return pd.DataFrame(out, columns=["language", "row", "position", "activation", "token",
                                      "context"])


__all__ = [
    "encode_layer", "decode_contributions", "bos_mask", "ReconstructionStats",
    "reconstruction_metrics", "replacement_logits", "zero_ablation_logits",
    "replacement_metrics", "evaluate_clt_stage", "load_clt_eval", "top_activating_examples",
]

"""Token-level activations for language probes (claim 3 of the multilingual-CLT study).

:func:`token_activations` streams token rows of each language (``LongTensor [M, n_ctx]``,
e.g. a data stage's ``"validation"`` or ``"test"`` sets) through the model once per batch
and keeps, for every unit source (residual stream, CLT features, ...) and layer, the
activations of the kept tokens: BOS and padding are removed, and each language stops at
``max_tokens_per_language`` tokens, taken in row order (the first rows of the set; no
sampling, so the pass ends as soon as every language has its tokens). All sources share one
forward pass.

The result holds ``X[kind][layer]`` ``[tokens, units]`` (float32), the language label of
every token (``y``), its id, row and position, so a probe fitted on one set can be scored on
another (:func:`probe_by_layer` in ``features.probe`` takes ``(X_train, y_train, X_test,
y_test)`` per layer).

:func:`late_layers` fixes what "late" means for a model of ``n_layers`` layers: the last
third, at least one layer. :func:`feature_probe_correlation` correlates, over tokens, the
summed activation of a language's late-layer language features with an early probe's
probability for that language.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from ..languages import check_languages
from ..tokenizer import BOS_ID, PAD_ID
from .activations import UnitSource, kept_positions


@dataclass
class TokenActivations:
    X: dict[str, list[Tensor]]     # per source kind, per layer [tokens, units] float32
    y: np.ndarray                  # [tokens] language codes
    token_ids: Tensor              # [tokens]
    rows: Tensor                   # [tokens] row index within its language's set
    positions: Tensor              # [tokens] position within the row

    @property
    def n_tokens(self) -> int:
        return len(self.y)

    def layer(self, kind: str, layer: int) -> np.ndarray:
        return self.X[kind][layer].numpy()


def _as_sources(sources) -> dict[str, UnitSource]:
    if isinstance(sources, UnitSource):
        return {sources.kind: sources}
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError("sources must be a UnitSource or a non-empty {kind: UnitSource} mapping")
    models = {id(s.model) for s in sources.values()}
    if len(models) != 1:
        raise ValueError("every source must read the same model (one forward pass serves all)")
    return dict(sources)


@torch.no_grad()
def token_activations(sources, rows_by_lang: Mapping[str, Tensor], max_tokens_per_language: int,
                      batch_size: int = 16, bos_id: int = BOS_ID,
                      pad_id: int | None = PAD_ID) -> TokenActivations:
    """Per-token activations of every source and layer on ``rows_by_lang`` (see the module
    docstring). ``sources``: a ``UnitSource`` or ``{kind: UnitSource}`` on one model."""
    sources = _as_sources(sources)
    if not isinstance(rows_by_lang, Mapping) or not rows_by_lang:
        raise ValueError("rows_by_lang must map at least one language code to token rows")
    check_languages(list(rows_by_lang))
    if isinstance(max_tokens_per_language, bool) or not isinstance(max_tokens_per_language, int) \
            or max_tokens_per_language < 1:
        raise ValueError(f"max_tokens_per_language is {max_tokens_per_language!r}; it must be an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size!r}; it must be an integer >= 1")
    first = next(iter(sources.values()))
    model, n_layers = first.model, first.n_layers
    device = next(model.parameters()).device
    hooks = {kind: [s.hook(layer) for layer in range(n_layers)] for kind, s in sources.items()}
    names = sorted({h for hs in hooks.values() for h in hs})
    X = {kind: [[] for _ in range(n_layers)] for kind in sources}
    labels, ids, row_idx, pos_idx = [], [], [], []
    for lang, rows in rows_by_lang.items():
        rows = torch.as_tensor(rows)
        if rows.ndim != 2:
            raise ValueError(f"token rows of {lang!r} must be [rows, positions], got shape {tuple(rows.shape)}")
        left = max_tokens_per_language
        for start in range(0, rows.shape[0], batch_size):
            if left <= 0:
                break
            chunk = rows[start:start + batch_size].long()
            keep = kept_positions(chunk, bos_id, pad_id)
            if not keep.any():
                continue
            r, p = keep.nonzero(as_tuple=True)          # row-major: row order, then position
            r, p = r[:left], p[:left]
            _, cache = model.run_with_cache(chunk.to(device), names_filter=names)
            for kind, source in sources.items():
                for layer, name in enumerate(hooks[kind]):
                    a = cache[name][r.to(device), p.to(device)].float()
                    X[kind][layer].append(source.transform(a, layer).float().cpu())
            labels += [lang] * len(r)
            ids.append(chunk[r, p])
            row_idx.append(r + start)
            pos_idx.append(p)
            left -= len(r)
        if left == max_tokens_per_language:
            raise ValueError(f"the rows of {lang!r} hold no token besides BOS and padding")
    return TokenActivations(X={k: [torch.cat(v) for v in layers] for k, layers in X.items()},
                            y=np.array(labels), token_ids=torch.cat(ids), rows=torch.cat(row_idx),
                            positions=torch.cat(pos_idx))


def late_layers(n_layers: int) -> list[int]:
    """The last third of the layers, at least one: 2 -> [1], 4 -> [3], 12 -> [8, ..., 11]."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers is {n_layers!r}; it must be an integer >= 1")
    return list(range(n_layers - max(1, n_layers // 3), n_layers))


def top_tokens(acts: Tensor, token_ids: Tensor, k: int = 5, min_count: int = 2) -> list[list[int]]:
    """For each column of ``acts`` [tokens, units]: the ``k`` token ids with the largest
    mean activation over their occurrences (ids seen fewer than ``min_count`` times are
    skipped), among ids on which the unit fires; an empty list for a unit that never fires."""
    out = []
    ids = token_ids.long()
    vocab = int(ids.max()) + 1 if len(ids) else 1
    occurrences = torch.bincount(ids, minlength=vocab).double()
    for u in range(acts.shape[1]):
        a = acts[:, u].double()
        total = torch.zeros(vocab, dtype=torch.double).index_add_(0, ids, a)
        fires = torch.zeros(vocab, dtype=torch.double).index_add_(0, ids, (a > 0).double())
        mean = torch.where((occurrences >= min_count) & (fires > 0), total / occurrences.clamp(min=1),
                           torch.full_like(total, -np.inf))
        best = torch.argsort(mean, descending=True)[:k]
        out.append([int(i) for i in best if np.isfinite(float(mean[i]))])
    return out


def feature_probe_correlation(tokens, languages):
    """Per language X: Pearson and Spearman correlation over all tokens of the table
    ``tokens`` between ``late_<X>`` (summed activation of X's late-layer language features)
    and ``p0_<X>`` (the first-layer probe's probability of X). Languages without late-layer
    language features, or with a constant column, get NaN."""
    import pandas as pd

    rows = []
    for lang in languages:
        late, prob = tokens.get(f"late_{lang}"), tokens.get(f"p0_{lang}")
        if late is None or prob is None:
            raise ValueError(f"the token table lacks late_{lang} or p0_{lang}")
        ok = late.std() > 0 and prob.std() > 0
        rows.append({"language": lang,
                     "pearson": float(np.corrcoef(late, prob)[0, 1]) if ok else np.nan,
                     "spearman": float(late.rank().corr(prob.rank())) if ok else np.nan,
                     "tokens firing": int((late > 0).sum()), "tokens": int(len(late))})
    return pd.DataFrame(rows)


__all__ = ["TokenActivations", "token_activations", "late_layers", "top_tokens",
           "feature_probe_correlation"]

"""Top activating examples of a unit: where a CLT feature fires most, with its context.

Written so that any unit with per-token activations can use it; chapters 04, 05, 09 and
10 describe CLT features, SAE latents and neurons through this home.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..clt.activations import _bos_id
from ..clt.evaluate import encode_layer
from ..tokenizer import PAD_ID
from .activations import kept_positions


def _decode(model, ids: list[int]) -> str:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return " ".join(str(i) for i in ids)
    return tok.decode(ids)


def marked_context(tokenizer, ids: list[int], pos: int) -> str:
    """The text of ``ids`` with token ``pos`` in [[ ]]. With a fast tokenizer the mark comes
    from re-encoding the text with character offsets, so a byte-level token that is only part
    of a character (common in Chinese and Japanese) marks that whole character instead of
    printing replacement characters; the text is marked piecewise when re-encoding does not
    give ``ids`` back (a window cut inside a character). Without a tokenizer: the ids."""
    if tokenizer is None:
        return " ".join(str(i) for i in ids[:pos]) + f"[[{ids[pos]}]]" + " ".join(str(i) for i in ids[pos + 1:])
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.decode(ids)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if enc["input_ids"] == ids:
            a, b = enc["offset_mapping"][pos]
            return f"{text[:a]}[[{text[a:b]}]]{text[b:]}"
    return f"{tokenizer.decode(ids[:pos])}[[{tokenizer.decode([ids[pos]])}]]{tokenizer.decode(ids[pos + 1:])}"


@torch.no_grad()
def feature_activations(model, clt, tokens: Tensor, layer: int, feature: int, batch_size: int = 16,
                        bos_id: int | None = None, pad_id: int | None = PAD_ID) -> Tensor:
    """[rows, positions]: the activation of feature ``feature`` of layer ``layer`` at every
    token of ``tokens``, read on the original model's MLP inputs; 0 at BOS and ``pad_id``
    positions. One feature of a whole text set is small; the dense activations of all
    features are only ever held for one batch."""
    clt.eval()
    bos = _bos_id(model, bos_id)
    device = next(model.parameters()).device
    name = f"blocks.{layer}.{clt.cfg.input_hook}"
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size].to(device)
        _, cache = model.run_with_cache(chunk, names_filter=[name], stop_at_layer=layer + 1)
        acts = encode_layer(clt, cache[name].to(clt.W_enc.dtype), layer)[..., feature]
        out.append(acts.masked_fill(~kept_positions(chunk, bos, pad_id), 0.0).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, tokens.shape[1])


@torch.no_grad()
def top_activating_examples(model, clt, tokens_by_lang: Mapping[str, Tensor], layer: int,
                            feature: int, k: int = 10, per_language: bool = True,
                            window: int | None = 12, after: int | None = 2, batch_size: int = 16,
                            bos_id: int | None = None, pad_id: int | None = PAD_ID,
                            activations: Mapping[str, Tensor] | None = None):
    """Top activating token positions of feature ``feature`` of layer ``layer``, read on the
    original model's MLP inputs (BOS and ``pad_id`` positions excluded, so rows of
    ``corpus.verse_rows`` work: one verse per row).

    Returns a DataFrame sorted by activation (descending) with columns language, row,
    position, activation, token, context; ``k`` rows per language (``per_language``) or
    ``k`` overall. ``context`` shows up to ``window`` tokens before the position, the token
    itself in [[ ]], and ``after`` tokens after it (None: the rest of the row on that side).
    Features that never fire give no rows. ``activations``: the feature's activations per
    language from ``feature_activations``, when the caller already has them.
    """
    import pandas as pd

    bos = _bos_id(model, bos_id)
    found = []
    for lang, tokens in tokens_by_lang.items():
        acts = (activations[lang] if activations is not None else
                feature_activations(model, clt, tokens, layer, feature, batch_size, bos, pad_id))
        flat = acts.flatten()
        best_v, best_i = flat.topk(min(k, flat.numel()))
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
        context = marked_context(getattr(model, "tokenizer", None), left + [ids[pos]] + right, len(left))
        out.append({"language": lang, "row": row, "position": pos, "activation": v,
                    "token": token, "context": context})
    return pd.DataFrame(out, columns=["language", "row", "position", "activation", "token",
                                      "context"])


def parallel_verse_examples(model, clt, corpus, layer: int, features: list[int], k: int = 2,
                            max_verses: int = 500, fallback_rows: Mapping[str, Tensor] | None = None):
    """Top activating examples of ``features`` (of ``layer``) on whole verses of the
    corpus's parallel set: the same verses in every language, one verse per row, so each
    example shows the whole verse and its key (``book:chapter:verse``).

    A corpus without a parallel set uses ``fallback_rows`` (token rows per language, e.g. a
    data stage's test split) and shows windows of 12 tokens before and 2 after instead.
    Returns a DataFrame indexed by feature with columns language, activation, context
    (and verse).
    """
    import pandas as pd

    from ..data.datasets import verse_rows

    if corpus.has_parallel:
        keys = corpus.parallel["keys"][:max_verses]
        sets = {lang: verse_rows(model.tokenizer, corpus.parallel[lang][:len(keys)], model.cfg.n_ctx)
                for lang in corpus.languages}
        window = after = None
    elif fallback_rows is not None:
        sets, window, after = dict(fallback_rows), 12, 2
    else:
        raise ValueError("the corpus has no parallel set; pass fallback_rows (token rows per language)")
    examples = pd.concat({f: top_activating_examples(model, clt, sets, layer, f, k=k,
                                                     window=window, after=after)
                          for f in features}, names=["feature"])
    columns = ["language", "activation", "context"]
    if corpus.has_parallel:
        examples["verse"] = [keys[r] for r in examples["row"]]
        columns.append("verse")
    return examples[columns]

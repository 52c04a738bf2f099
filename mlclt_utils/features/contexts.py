"""Top activating contexts of every unit, and the language of a unit read from them.

:func:`top_contexts` streams a :class:`~mlclt_utils.features.activations.UnitSource` over
token rows and keeps, per layer, each unit's ``top`` largest activations and where they
occurred (a running top-k merged batch by batch: never more than one batch of dense
activations in memory). BOS and padding positions never count.

:func:`unit_languages` labels units by the language of their contexts (the bilingual-SAE
study, paper B): a unit's contexts are its top activations of at least ``ratio`` x its
maximum (up to ``top``); each context's language is the language of the token it fires on,
from the book's one token classifier (:class:`~mlclt_utils.features.language.TokenLanguages`).
A unit is language X when more than ``share`` of its contexts are X, ``bilingual`` when it is
neither and each of the two languages has at least ``1 - share`` of them, ``shared`` when
its contexts are mostly tokens no language owns (punctuation, digits, names), and ``dead``
when it never fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .activations import UnitSource, kept_positions

BILINGUAL, SHARED_TOKENS, DEAD = "bilingual", "shared", "dead"


@dataclass
class TopContexts:
    values: Tensor       # [top, units] activations, descending (-inf where fewer were seen)
    positions: Tensor    # [top, units] flat positions row * T + t into the rows


@torch.no_grad()
def top_contexts(source: UnitSource, rows: Tensor, top: int = 50, batch_size: int = 16) -> list[TopContexts]:
    """Per layer of ``source``, every unit's ``top`` largest activations over ``rows`` [N, T]
    and their flat positions (see the module docstring)."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty [N, T] tensor of token ids, got shape {tuple(rows.shape)}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    device = next(source.model.parameters()).device
    T = rows.shape[1]
    best: list[TopContexts] | None = None
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start:start + batch_size].to(device)
        keep = kept_positions(chunk).reshape(-1)
        flat_pos = (torch.arange(chunk.shape[0], device=device)[:, None] * T
                    + torch.arange(chunk.shape[1], device=device)[None, :] + start * T).reshape(-1)
        acts = source.activations(chunk)
        if best is None:
            best = [TopContexts(torch.full((0, a.shape[-1]), -float("inf")), torch.zeros((0, a.shape[-1]), dtype=torch.long))
                    for a in acts]
        for i, a in enumerate(acts):
            a = a.reshape(-1, a.shape[-1]).float().cpu()
            a[~keep.cpu()] = -float("inf")
            pos = flat_pos.cpu()[:, None].expand_as(a)
            vals = torch.cat([best[i].values, a])
            poss = torch.cat([best[i].positions, pos])
            k = min(top, vals.shape[0])
            v, idx = vals.topk(k, dim=0)
            best[i] = TopContexts(v, poss.gather(0, idx))
    return best


def unit_languages(contexts: TopContexts, rows: Tensor, token_languages, languages: Sequence[str],
                   ratio: float = 0.7, share: float = 0.9) -> pd.DataFrame:
    """Language label of every unit from its top contexts (see the module docstring).

    Columns: ``unit, label, contexts, max_activation``, ``position_share`` (share of the
    contexts at the unit's most common position in the row) and ``share_<lang>`` for each of
    ``languages`` (share of the unit's contexts whose token is of that language)."""
    if not 0 < ratio <= 1 or not 0.5 <= share < 1:
        raise ValueError(f"ratio must be in (0, 1] and share in [0.5, 1), got {ratio}, {share}")
    languages = list(languages)
    labels = np.array(token_languages.labels())
    flat = rows.reshape(-1).numpy()
    values, positions = contexts.values.numpy(), contexts.positions.numpy()
    top_value = values[0] if len(values) else np.zeros(values.shape[1])
    alive = np.isfinite(top_value) & (top_value > 0)
    chosen = np.isfinite(values) & (values > 0) & (values >= ratio * np.where(alive, top_value, np.inf))
    token_lang = labels[flat[positions]]                       # [top, units]
    n = chosen.sum(0)
    shares = {lang: np.divide(((token_lang == lang) & chosen).sum(0), n, out=np.zeros(len(n)), where=n > 0)
              for lang in languages}
    label = np.full(len(n), SHARED_TOKENS, dtype=object)
    both = np.ones(len(n), dtype=bool)
    for lang in languages:
        both &= shares[lang] >= 1 - share
    label[both] = BILINGUAL
    for lang in languages:
        label[shares[lang] > share] = lang
    label[~alive] = DEAD
    # share of the contexts at the unit's most common position in the row: near 1 for a unit
    # that tracks position rather than content (common in barely trained models)
    T = rows.shape[1]
    at = np.where(chosen, positions % T, -1)
    top_position = np.array([np.bincount(at[chosen[:, u], u], minlength=T).max() if n[u] else 0
                             for u in range(len(n))])
    out = pd.DataFrame({"unit": np.arange(len(n)), "label": label, "contexts": n,
                        "max_activation": np.where(alive, top_value, 0.0),
                        "position_share": np.divide(top_position, n, out=np.zeros(len(n)), where=n > 0)})
    for lang in languages:
        out[f"share_{lang}"] = shares[lang]
    return out


def label_shares(labels: pd.DataFrame, languages: Sequence[str]) -> dict[str, float]:
    """Share of the live units (not dead) carrying each label: the languages, bilingual and
    shared; they add up to 1."""
    live = labels[labels["label"] != DEAD]
    total = max(len(live), 1)
    return {lab: float((live["label"] == lab).sum() / total)
            for lab in [*languages, BILINGUAL, SHARED_TOKENS]}


def context_text(tokenizer, rows: Tensor, position: int, before: int = 30, after: int = 10) -> str:
    """The text around flat ``position`` of ``rows``: ``before`` and ``after`` characters
    around the token, which is marked ``[[ ]]`` (the book's convention, see ``viz.text``).
    The whole row is decoded and marked first, so a byte piece of a character marks the
    whole character; special tokens are left out."""
    from .examples import marked_context
    from .language import N_SPECIAL

    T = rows.shape[1]
    r, t = divmod(int(position), T)
    ids = rows[r].tolist()
    kept = [i for i, tok in enumerate(ids) if tok >= N_SPECIAL or i == t]
    window, at = [ids[i] for i in kept], kept.index(t)
    # a row cut from a token stream can start or end inside a character, and then its text
    # does not re-encode to its ids; drop up to three byte pieces at either end
    if getattr(tokenizer, "is_fast", False):
        for a, b in ((a, b) for a in range(min(4, at + 1)) for b in range(4)):
            part = window[a:len(window) - b]
            if at - a < len(part) and tokenizer(tokenizer.decode(part), add_special_tokens=False, verbose=False)["input_ids"] == part:
                window, at = part, at - a
                break
    text = marked_context(tokenizer, window, at)
    a, b = text.index("[["), text.index("]]") + 2
    return cut_words(text[:a], before, keep="end") + text[a:b] + cut_words(text[b:], after, keep="start")


def cut_words(text: str, n: int, keep: str) -> str:
    """The last (``keep="end"``) or first (``"start"``) ``n`` characters of ``text``, cut where
    a word ends when the text has spaces (a cut word is dropped, "…" marks the cut; text
    without spaces, as Japanese or Chinese, is cut between characters) and without the
    replacement character that a byte piece cut from its character decodes to."""
    text = text.strip("\ufffd")
    if len(text) <= n:
        return text.lstrip() if keep == "end" else text.rstrip()
    if keep == "end":
        part = text[-n:]
        if not text[-n - 1].isspace() and not part[0].isspace() and " " in part.strip():
            part = part[part.index(" ", len(part) - len(part.lstrip())):]       # drop the cut word
        return "…" + part.strip().strip("\ufffd")
    part = text[:n]
    if not text[n].isspace() and not part[-1].isspace() and " " in part.strip():
        part = part[:part.rstrip().rindex(" ")]
    return part.strip().strip("\ufffd") + "…"

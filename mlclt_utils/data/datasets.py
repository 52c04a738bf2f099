"""Language mixtures and token data sets.

:func:`mixture_budgets` turns an English share into token budgets per language;
:func:`build_mixture_dataset` turns a corpus and a tokenizer into fixed-length training
sequences, each monolingual and starting with BOS; :func:`build_eval_dataset` cuts the
held-out splits the same way; :func:`verse_rows` makes one padded row per text (the
parallel verses). The stages that store them are ``data/<mixture>``
(see ``mlclt_utils.stages``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..languages import check_languages, language_rng
from ..tokenizer import BOS_ID, EOS_ID, PAD_ID, check_special_ids, encode_texts
from .corpus import SPLITS, Corpus

# --------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------

def _largest_remainder(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Integers proportional to ``weights`` that sum to ``total`` exactly."""
    s = float(sum(weights.values()))
    exact = {k: total * w / s for k, w in weights.items()}
    out = {k: int(np.floor(v)) for k, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(weights, key=lambda k: (-(exact[k] - out[k]), list(weights).index(k)))
    for k in order[:left]:
        out[k] += 1
    return out


def mixture_budgets(languages, english_share: float, total_tokens: int,
                    weights: Mapping[str, float] | None = None) -> dict[str, int]:
    """Token budget per language: English gets ``english_share`` of ``total_tokens``, the
    other languages share the rest evenly (or in proportion to ``weights``). The budgets
    sum to ``total_tokens`` exactly."""
    langs = check_languages(languages)
    p = english_share
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"English share {english_share!r} is outside [0, 1]")
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, (int, np.integer)) or total_tokens < 0:
        raise ValueError(f"total_tokens must be a non-negative integer, got {total_tokens!r}")
    total_tokens = int(total_tokens)
    others = [lang for lang in langs if lang != "en"]
    if p > 0 and "en" not in langs:
        raise ValueError(f"English share {p} > 0 but 'en' is not among the languages {langs}")
    if p < 1 and not others:
        raise ValueError(f"English share {p} < 1 needs a language besides English; languages: {langs}")
    budgets = {lang: 0 for lang in langs}
    english = int(round(p * total_tokens)) if "en" in langs else 0
    if "en" in langs:
        budgets["en"] = english
    rest = total_tokens - english
    if others:
        if weights is None:
            w = {lang: 1.0 for lang in others}
        else:
            missing = [lang for lang in others if lang not in weights]
            if missing:
                raise ValueError(f"mixture weights lack {missing}; give a weight for every "
                                 f"non-English language {others}")
            w = {lang: float(weights[lang]) for lang in others}
            bad = {k: v for k, v in w.items() if not np.isfinite(v) or v < 0}
            if bad or sum(w.values()) <= 0:
                raise ValueError(f"mixture weights must be non-negative with a positive sum, got {dict(weights)}")
        budgets.update(_largest_remainder(rest, w))
    return budgets


# --------------------------------------------------------------------------------------
# Token streams and data sets
# --------------------------------------------------------------------------------------

def verse_rows(tokenizer, texts: list[str], n_ctx: int) -> torch.Tensor:
    """One row per text: BOS + its tokens, cut to ``n_ctx``, right-padded with PAD
    (``LongTensor [len(texts), longest row]``). Padding after the text cannot change what a
    causal model computes on the text, so a row gives the text's own activations."""
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 (BOS plus one token), got {n_ctx}")
    if not texts:
        raise ValueError("no texts to turn into rows")
    check_special_ids(tokenizer)
    ids = [e[:n_ctx - 1] for e in encode_texts(tokenizer, texts)]
    rows = torch.full((len(ids), 1 + max(len(e) for e in ids)), PAD_ID, dtype=torch.long)
    rows[:, 0] = BOS_ID
    for i, e in enumerate(ids):
        rows[i, 1:1 + len(e)] = torch.from_numpy(e)
    return rows


class _LanguageStream:
    """Documents of one language as a token stream (documents joined by EOS), encoded
    lazily in batches and cached, so a small budget only tokenizes what it uses."""

    def __init__(self, tokenizer, docs: list[str], batch: int = 128):
        self.tokenizer, self.docs, self.batch = tokenizer, docs, batch
        self.cache: dict[int, np.ndarray] = {}

    def _ensure(self, idx) -> None:
        missing = [i for i in idx if i not in self.cache]
        if missing:
            for i, ids in zip(missing, encode_texts(self.tokenizer, [self.docs[i] for i in missing])):
                self.cache[i] = np.append(ids, EOS_ID)

    def take(self, n_tokens: int, order_for_epoch, cycle: bool) -> tuple[np.ndarray, dict]:
        """The first ``n_tokens`` of the stream; documents come in ``order_for_epoch(e)``.
        With ``cycle`` the stream starts over (new order) when the documents run out."""
        pieces, got, epoch, used = [], 0, 0, set()
        docs_in_last_epoch = 0
        while got < n_tokens:
            order = order_for_epoch(epoch)
            added = 0
            docs_in_last_epoch = 0
            for start in range(0, len(order), self.batch):
                chunk = [int(i) for i in order[start:start + self.batch]]
                self._ensure(chunk)
                for i in chunk:
                    ids = self.cache[i][: n_tokens - got]
                    pieces.append(ids)
                    got += len(ids)
                    added += len(ids)
                    used.add(i)
                    docs_in_last_epoch += 1
                    if got >= n_tokens:
                        break
                if got >= n_tokens:
                    break
            epoch += 1
            if added == 0 or not cycle:
                break
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        n_docs = max(len(self.docs), 1)
        epochs = (epoch - 1) + docs_in_last_epoch / n_docs if epoch else 0.0
        return tokens, {"documents": len(used), "epochs": round(epochs, 4)}


def _to_sequences(stream: np.ndarray, n_seq: int, n_ctx: int) -> np.ndarray:
    body = stream[: n_seq * (n_ctx - 1)].reshape(n_seq, n_ctx - 1)
    bos = np.full((n_seq, 1), BOS_ID, dtype=np.int64)
    return np.concatenate([bos, body], axis=1)


def build_mixture_dataset(corpus: Corpus, tokenizer, english_share: float, total_tokens: int,
                          n_ctx: int, seed: int, weights: Mapping[str, float] | None = None):
    """Monolingual training sequences for one mixture.

    The number of sequences is ``total_tokens // n_ctx``; :func:`mixture_budgets` splits
    them over the languages, so every language's budget is a whole number of sequences.
    A sequence is BOS followed by ``n_ctx - 1`` tokens of one language's stream
    (train documents joined with EOS). Each language reads its documents in a seeded
    order that depends only on the seed and the language (so a bigger budget extends a
    smaller one), reshuffled for every further pass when the budget exceeds the data.
    Finally all sequences are shuffled with the seed.

    Returns ``({"tokens": LongTensor [N, n_ctx], "language": LongTensor [N]}, report)``
    where ``language`` indexes ``corpus.languages`` and ``report[lang]`` has the
    requested and realised token counts (BOS included), sequences, documents used and
    passes over the data (``epochs``, fractional).
    """
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 (BOS plus one token), got {n_ctx}")
    check_special_ids(tokenizer)
    langs = corpus.languages
    requested = mixture_budgets(langs, english_share, total_tokens, weights)
    seq_budget = mixture_budgets(langs, english_share, total_tokens // n_ctx, weights)
    for lang in langs:
        if seq_budget[lang] and not corpus.texts[lang]["train"]:
            raise ValueError(f"language {lang!r} has no train documents but its budget is "
                             f"{seq_budget[lang] * n_ctx} tokens")
    seqs, labels, report = [], [], {}
    for li, lang in enumerate(langs):
        n_seq = seq_budget[lang]
        docs = corpus.texts[lang]["train"]
        info = {"documents": 0, "epochs": 0.0}
        if n_seq:
            stream = _LanguageStream(tokenizer, docs)
            tokens, info = stream.take(
                n_seq * (n_ctx - 1),
                lambda e, lang=lang: language_rng(seed, lang, e).permutation(len(docs)),
                cycle=True)
            seqs.append(_to_sequences(tokens, n_seq, n_ctx))
            labels.append(np.full(n_seq, li, dtype=np.int64))
        report[lang] = {
            "requested_tokens": requested[lang],
            "budget_tokens": n_seq * n_ctx,
            "realised_tokens": n_seq * n_ctx,
            "sequences": n_seq,
            "train_documents": len(docs),
            **info,
        }
    if seqs:
        all_seqs, all_labels = np.concatenate(seqs), np.concatenate(labels)
    else:
        all_seqs, all_labels = np.zeros((0, n_ctx), np.int64), np.zeros(0, np.int64)
    perm = np.random.default_rng([int(seed), 7]).permutation(len(all_seqs))
    tensors = {"tokens": torch.from_numpy(all_seqs[perm]), "language": torch.from_numpy(all_labels[perm])}
    counts = torch.bincount(tensors["language"], minlength=len(langs))
    for li, lang in enumerate(langs):  # realised = what the tensor really holds
        report[lang]["realised_tokens"] = int(counts[li]) * n_ctx
    return tensors, report


def build_eval_dataset(corpus: Corpus, tokenizer, split: str, n_ctx: int,
                       tokens_per_language: int) -> dict[str, torch.Tensor]:
    """Evaluation sequences per language from ``split``: documents in their stored order,
    joined with EOS, cut into BOS + ``n_ctx - 1`` tokens; at most
    ``tokens_per_language // n_ctx`` sequences (fewer when the split is smaller)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 (BOS plus one token), got {n_ctx}")
    check_special_ids(tokenizer)
    out = {}
    for lang in corpus.languages:
        docs = corpus.texts[lang][split]
        n_max = tokens_per_language // n_ctx
        stream = _LanguageStream(tokenizer, docs, batch=32)
        tokens, _ = stream.take(n_max * (n_ctx - 1), lambda e: np.arange(len(docs)), cycle=False)
        n_seq = min(n_max, len(tokens) // (n_ctx - 1))
        out[lang] = torch.from_numpy(_to_sequences(tokens, n_seq, n_ctx))
    return out

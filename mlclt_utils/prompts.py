"""Prompts the run's own models can answer, for attribution graphs (chapter 06) and
interventions (chapter 07).

* ``mine_concepts``: a concept table (one word per concept and language) found by
  co-occurrence over aligned units of text (the corpus's training chapters, aligned by their
  ``book:chapter`` ids), seeded by a short list of words in one language. No hand
  translation is needed, so any language pair of the corpus works. The statistic is the
  correlation, across the units, of the words' relative frequencies (counts from
  scikit-learn's ``CountVectorizer``). Written by hand: word alignment toolkits (fast_align,
  eflomal) are not Python packages and need sentence-aligned text, which the training
  chapters are not.
* ``cloze_prompts``: test verses cut just before a concept's word, preferring those where
  the model's greedy next token is the first token of that word in that language.
* A JSON-lines prompt format (``read_prompts`` / ``write_prompts``) with validation that
  names the bad line and field.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .languages import NO_SPACE_LANGUAGES, check_languages

# Concepts frequent in the Bible, by seed language. A run whose corpus lacks the first
# language with seeds uses the next one.
SEEDS: dict[str, dict[str, str]] = {
    "en": {"God": "God", "Jesus": "Jesus", "Moses": "Moses", "Israel": "Israel",
           "David": "David", "Jerusalem": "Jerusalem", "Egypt": "Egypt", "king": "king",
           "water": "water", "day": "day", "land": "land", "father": "father",
           "son": "son", "house": "house", "heaven": "heaven", "earth": "earth"},
    "fr": {"God": "Dieu", "Jesus": "Jésus", "Moses": "Moïse", "Israel": "Israël",
           "David": "David", "Jerusalem": "Jérusalem", "Egypt": "Égypte", "king": "roi",
           "water": "eau", "day": "jour", "land": "pays", "father": "père",
           "son": "fils", "house": "maison", "heaven": "ciel", "earth": "terre"},
}

_WORD = re.compile(r"\w+", re.UNICODE)


def _rates(texts: Sequence[str], lang: str, max_chars: int, min_units: int):
    """Per unit, the relative frequency of every candidate word (occurrences / unit length),
    as a sparse [units, words] matrix, for the words found in at least ``min_units`` units.
    Candidates are lower-cased word tokens, or for languages written without spaces every
    run of 1..``max_chars`` word characters."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer

    if lang in NO_SPACE_LANGUAGES:
        vec = CountVectorizer(analyzer="char", ngram_range=(1, max_chars), lowercase=False,
                              min_df=min_units)
    else:
        vec = CountVectorizer(token_pattern=r"(?u)\b\w+\b", lowercase=True, min_df=min_units)
    try:
        counts = vec.fit_transform(texts).tocsc().astype(np.float64)
    except ValueError:                          # no word occurs in min_units units
        return None, np.array([], dtype=object)
    words = vec.get_feature_names_out()
    keep = np.array([bool(_WORD.fullmatch(w)) for w in words])
    counts, words = counts[:, keep], words[keep]
    lengths = np.array([max(1, len(t) if lang in NO_SPACE_LANGUAGES else len(_WORD.findall(t)))
                        for t in texts], dtype=np.float64)
    from scipy.sparse import diags

    return diags(1.0 / lengths) @ counts, words


def _correlations(x, M):
    """Pearson correlation of the dense vector ``x`` [units] with every column of ``M``."""
    import numpy as np

    n = M.shape[0]
    mean = np.asarray(M.mean(0)).ravel()
    var = np.asarray(M.multiply(M).mean(0)).ravel() - mean ** 2
    xc = x - x.mean()
    cov = np.asarray(M.T @ xc).ravel() / n
    den = np.sqrt(np.clip(var, 0, None)) * x.std()
    return np.where(den > 0, cov / np.where(den > 0, den, 1), 0.0)


def mine_concepts(units: Mapping[str, Sequence[str]], seeds: Mapping[str, str] | None = None,
                  seed_language: str | None = None, min_units: int = 3, max_chars: int = 4,
                  longer_within: float = 0.95):
    """The word of each seed concept in every language of ``units``.

    ``units[lang]``: texts aligned across languages (same length, unit i of every language
    has the same meaning). ``seeds``: concept -> word in ``seed_language`` (default: the
    first language of ``SEEDS`` present in ``units``). For each concept and language the
    chosen word is the one whose relative frequency across the units correlates best
    (Pearson) with the seed word's; relative frequencies rather than presence, so that a
    function word found in every unit does not match a frequent name. For languages without
    spaces, among candidates within ``longer_within`` of the best correlation the longest is
    taken (a word and its first character occur together). Concepts whose seed word is in
    fewer than ``min_units`` units are dropped.

    Returns a DataFrame indexed by concept with one column per language (the word, as most
    often spelled in the text) and one ``score_<lang>`` column per language (the
    correlation; 1 for the seed language).
    """
    import numpy as np
    import pandas as pd

    langs = check_languages(list(units))
    n = {lang: len(units[lang]) for lang in langs}
    if len(set(n.values())) != 1:
        raise ValueError(f"units must be aligned (the same number per language), got {n}")
    if seeds is None:
        seed_language = seed_language or next((l for l in SEEDS if l in units), None)
        if seed_language is None:
            raise ValueError(f"no seed list for the languages {langs}; pass seeds= and "
                             f"seed_language= (seed lists exist for {sorted(SEEDS)})")
        seeds = SEEDS[seed_language]
    if seed_language not in units:
        raise ValueError(f"seed_language {seed_language!r} is not among the languages {langs}")
    rates = {lang: _rates(units[lang], lang, max_chars, min_units) for lang in langs}
    seed_M, seed_words = rates[seed_language]
    where = {w: i for i, w in enumerate(seed_words)}
    rows = {}
    for concept, word in seeds.items():
        key = word if seed_language in NO_SPACE_LANGUAGES else word.lower()
        if key not in where:
            continue
        x = seed_M[:, where[key]].toarray().ravel()
        row = {}
        for lang in langs:
            if lang == seed_language:
                row[lang], row[f"score_{lang}"] = word, 1.0
                continue
            M, words = rates[lang]
            if M is None or not len(words):
                row[lang], row[f"score_{lang}"] = None, 0.0
                continue
            r = _correlations(x, M)
            best = float(r.max())
            if lang in NO_SPACE_LANGUAGES:
                pool = np.flatnonzero(r >= longer_within * best)
                j = max(pool, key=lambda i: (len(words[i]), r[i]))
            else:
                j = int(r.argmax())
            row[lang], row[f"score_{lang}"] = _surface(units[lang], str(words[j]), lang), float(r[j])
        rows[concept] = row
    cols = langs + [f"score_{lang}" for lang in langs]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=cols)
    table.index.name = "concept"
    return table


def _surface(texts: Sequence[str], word: str, lang: str) -> str:
    """The most frequent spelling of a lower-cased word in ``texts`` (``dieu`` -> ``Dieu``)."""
    if lang in NO_SPACE_LANGUAGES:
        return word
    forms = Counter(m for t in texts for m in _WORD.findall(t) if m.lower() == word)
    return forms.most_common(1)[0][0] if forms else word


def _find_word(text: str, word: str, lang: str) -> int:
    """Character index of the first occurrence of ``word`` as a whole word (case-insensitive
    for cased scripts); -1 if absent."""
    if lang in NO_SPACE_LANGUAGES:
        return text.find(word)
    m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE)
    return m.start() if m else -1


def cloze_candidates(concepts, verses: Mapping[str, Sequence[str]], keys: Sequence[str],
                     min_chars: int = 12) -> list[dict]:
    """Every (concept, language, verse) where the concept's word appears after at least
    ``min_chars`` characters: the prompt is the verse up to the word (without the space
    before it), the target is the word as it appears in the verse (with that space)."""
    out = []
    for concept, row in concepts.iterrows():
        for lang, texts in verses.items():
            word = row.get(lang)
            if not isinstance(word, str) or not word:
                continue
            for key, text in zip(keys, texts):
                i = _find_word(text, word, lang)
                if i < min_chars:
                    continue
                cut = len(text[:i].rstrip())
                out.append({"concept": concept, "language": lang, "verse": key,
                            "prompt": text[:cut], "target": text[cut:i + len(word)]})
    return out


def context_ids(tokenizer, ids: Sequence[int], max_len: int) -> list[int]:
    """BOS followed by ``ids``, cut from the front so that the whole fits ``max_len`` tokens
    (the end of a prompt is what the model answers)."""
    if max_len < 2:
        raise ValueError(f"max_len is {max_len}; a context needs room for BOS and one token")
    return [tokenizer.bos_token_id] + list(ids)[-(max_len - 1):]


def cloze_prompts(model, concepts, verses: Mapping[str, Sequence[str]], keys: Sequence[str],
                  per_concept: int = 3, min_chars: int = 12, max_candidates: int = 20,
                  max_tokens: int | None = None, same_verse: bool = False):
    """Cloze prompts for the model: for each concept and language, up to ``max_candidates``
    candidates from ``cloze_candidates`` (earliest verses first) are scored by the model,
    and the ``per_concept`` best are kept: first those it answers (its greedy next token
    after BOS + prompt is the first token of the target), then the others by the
    probability of that token. With ``same_verse``, the ``per_concept`` verses kept per concept
    are those whose candidates cover the most languages (then the most answered), and every
    language's prompt is cut from the same verse. Returns a DataFrame with columns concept,
    language, verse, prompt, target, target_token (id), p_target and answered."""
    import pandas as pd
    import torch

    tok = model.tokenizer
    max_tokens = max_tokens or model.cfg.n_ctx - 1
    scored: dict[tuple, list[dict]] = {}
    for c in cloze_candidates(concepts, verses, keys, min_chars):
        group = scored.setdefault((c["concept"], c["language"]), [])
        if len(group) >= max_candidates:
            continue
        ids = tok.encode(c["prompt"], add_special_tokens=False)
        whole = tok.encode(c["prompt"] + c["target"], add_special_tokens=False)
        if whole[:len(ids)] != ids or len(whole) == len(ids):
            continue                        # the word merges with the prompt's last token
        first = whole[len(ids)]
        context = context_ids(tok, ids, max_tokens)
        with torch.no_grad():
            logits = model(torch.tensor([context], device=model.cfg.device))[0, -1].float()
        group.append({**c, "target_token": first, "p_target": float(torch.softmax(logits, -1)[first]),
                      "answered": int(logits.argmax()) == first})
    kept = []
    if same_verse:
        # one verse per concept (per_concept of them) holding the word in as many languages as
        # any verse does, so the languages' graphs compare translations of one sentence
        for concept in dict.fromkeys(k[0] for k in scored):
            by_verse: dict[str, list[dict]] = {}
            for (c, _), group in scored.items():
                if c == concept:
                    for r in group:
                        by_verse.setdefault(r["verse"], []).append(r)
            ranked = sorted(by_verse.values(), key=lambda rs: (-len(rs), -sum(r["answered"] for r in rs),
                                                               -sum(r["p_target"] for r in rs)))
            for rs in ranked[:per_concept]:
                if len(rs) >= 2:
                    kept += sorted(rs, key=lambda r: r["language"])
    else:
        for group in scored.values():
            kept += sorted(group, key=lambda r: (not r["answered"], -r["p_target"]))[:per_concept]
    return pd.DataFrame(kept, columns=["concept", "language", "verse", "prompt", "target",
                                       "target_token", "p_target", "answered"])


def scored_prompts(model, records: Sequence[Mapping[str, Any]], languages: Sequence[str]):
    """Given prompts (a prompt file's or dataset's records, each with ``prompt``,
    ``language``, ``target`` and ``concept``) in ``cloze_prompts``' table, scored by the model
    in the same way: ``target_token`` is the first token of the target as it follows the
    prompt. Records in other languages are left out; a record without a target or concept,
    or whose target merges into the prompt's last token, is refused with its index.
    Returns (prompts, concepts): the table and the concept x language table of targets."""
    import pandas as pd
    import torch

    tok = model.tokenizer
    rows = []
    for i, r in enumerate(records):
        if r["language"] not in languages:
            continue
        missing = [f for f in ("target", "concept") if not r.get(f)]
        if missing:
            raise ValueError(f"prompt record {i}: field {missing[0]!r} is missing; graphs of given "
                             "prompts need a target and a concept (the same concept across languages)")
        ids = tok.encode(r["prompt"], add_special_tokens=False)
        whole = tok.encode(r["prompt"] + r["target"], add_special_tokens=False)
        if whole[:len(ids)] != ids or len(whole) == len(ids):
            raise ValueError(f"prompt record {i}: the target {r['target']!r} merges with the prompt's "
                             "last token; end the prompt where the target's first token begins")
        first = whole[len(ids)]
        with torch.no_grad():
            logits = model(torch.tensor([context_ids(tok, ids, model.cfg.n_ctx - 1)],
                                        device=model.cfg.device))[0, -1].float()
        rows.append({"concept": r["concept"], "language": r["language"], "verse": r.get("id", str(i)),
                     "prompt": r["prompt"], "target": r["target"].strip(), "target_token": first,
                     "p_target": float(torch.softmax(logits, -1)[first]),
                     "answered": int(logits.argmax()) == first})
    if not rows:
        raise ValueError(f"no given prompt is in this run's languages {list(languages)}")
    prompts = pd.DataFrame(rows)
    concepts = prompts.pivot_table(index="concept", columns="language", values="target", aggfunc="first")
    return prompts, concepts.reindex(columns=list(languages))


def load_given_prompts(where: str, columns: Mapping[str, str] | None = None,
                       split: str = "train") -> list[dict]:
    """Prompt records from a JSON-lines prompt file (``read_prompts``) or, for
    ``"hf:NAME"``, a Hugging Face dataset (hub name or saved folder) whose ``columns`` map the
    prompt fields to its columns (``prompts_from_hf``)."""
    if where.startswith("hf:"):
        if not columns:
            raise ValueError(f"prompts {where!r} come from a dataset: give graphs.prompt_columns, "
                             "e.g. {'prompt': 'sentence', 'language': 'lang', 'target': 'answer', "
                             "'concept': 'pair_id'}")
        return prompts_from_hf(where[3:], columns, split=split)
    return read_prompts(where)


# --------------------------------------------------------------- prompt files -----------

PROMPT_FIELDS = {"prompt": str, "language": str}
OPTIONAL_FIELDS = {"target": str, "concept": str, "id": str}


def check_prompt(record: Any, where: str) -> dict:
    """One prompt record, checked: a JSON object with a non-empty ``prompt`` and a known
    ``language``; optional ``target``, ``concept``, ``id`` strings. ``where`` names the
    record in errors (e.g. ``prompts.jsonl line 4``)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a prompt must be a JSON object, got {type(record).__name__}")
    for name, kind in PROMPT_FIELDS.items():
        if name not in record:
            raise ValueError(f"{where}: field {name!r} is missing (required: {sorted(PROMPT_FIELDS)})")
    for name, kind in {**PROMPT_FIELDS, **OPTIONAL_FIELDS}.items():
        if name in record and not isinstance(record[name], kind):
            raise ValueError(f"{where}: field {name!r} must be a string, got {record[name]!r}")
    if not record["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty")
    try:
        check_languages([record["language"]])
    except ValueError as err:
        raise ValueError(f"{where}: field 'language': {err}") from None
    return record


def read_prompts(path) -> list[dict]:
    """Prompts from a JSON-lines file, one object per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name} line {n}: not valid JSON ({err.msg})") from None
            out.append(check_prompt(record, f"{path.name} line {n}"))
    if not out:
        raise ValueError(f"prompt file {path} holds no prompt")
    return out


def write_prompts(path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write checked prompt records as JSON lines (written to a temporary name first)."""
    path = Path(path)
    rows = [check_prompt(dict(r), f"record {i}") for i, r in enumerate(records)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def prompts_from_hf(name: str, columns: Mapping[str, str], language: str | None = None,
                    split: str = "train", config: str | None = None, data_files=None) -> list[dict]:
    """Prompt records from a Hugging Face dataset, such as the multilingual prompt sets of
    the multilingual-CLT study (``CausalNLP/multilingual_antonym_completion``,
    ``..._category_completion``, ``multilingual_ioi``), for users who load the paper's models.

    ``name``: a hub name, a folder written by ``save_to_disk``, or a builder such as
    ``"json"`` with ``data_files``. ``columns`` maps the prompt fields (``prompt``, and
    optionally ``language``, ``target``, ``concept``, ``id``) to the dataset's column
    names; the datasets' own column names are not fixed here, so they are always given.
    ``language``: the language of every row, for a dataset (or config) in one language and
    no language column. Every row is checked like a prompt file line; a bad row is named.
    """
    if "prompt" not in columns:
        raise ValueError(f"columns must map 'prompt' to a column, got {dict(columns)}")
    unknown = sorted(set(columns) - set(PROMPT_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"columns has unknown fields {unknown}; allowed: "
                         f"{sorted(set(PROMPT_FIELDS) | set(OPTIONAL_FIELDS))}")
    if ("language" in columns) == (language is not None):
        raise ValueError("give the language either as a column (columns['language']) or as "
                         "language= for every row, not both and not neither")
    from .features.parallel import open_hf_dataset

    ds, where = open_hf_dataset(name, split, config, data_files)
    missing = sorted(c for c in columns.values() if c not in ds.column_names)
    if missing:
        raise ValueError(f"{where} has no column {missing}; its columns: {ds.column_names}")
    out = []
    for i, row in enumerate(ds):
        record = {field: row[col] for field, col in columns.items()}
        if language is not None:
            record["language"] = language
        out.append(check_prompt(record, f"{where} row {i}"))
    return out

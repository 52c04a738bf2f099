"""Parallel text sets: every source gives the same complete, aligned rows."""

import json

import pytest

from mlclt_utils.data.corpus import Corpus
from mlclt_utils.features.parallel import (ParallelSet, load_parallel, parallel_from_corpus,
                                           parallel_from_hf, parallel_from_jsonl)

ROWS = [  # (key, en, fr, de); None: the language is missing from the row
    ("a", "In the beginning", "Au commencement", "Im Anfang"),
    ("b", "God created", "Dieu créa", None),            # no German
    ("c", "the heaven", "", "den Himmel"),              # empty French
    ("d", "and  the earth ", "et la terre", "und die Erde"),
]
COMPLETE_EN_FR_DE = [("a", "In the beginning", "Au commencement", "Im Anfang"),
                     ("d", "and the earth", "et la terre", "und die Erde")]


def make_corpus(parallel=True):
    texts = {lang: {s: ["doc"] for s in ("train", "validation", "test")} for lang in ("en", "fr", "de")}
    if parallel:
        par = {"keys": [r[0] for r in ROWS], "en": [r[1] for r in ROWS], "fr": [r[2] for r in ROWS],
               "de": [r[3] or "" for r in ROWS]}
    else:
        par = {"keys": [], "en": [], "fr": [], "de": []}
    return Corpus(["en", "fr", "de"], texts, par, "constructed")


def write_jsonl(path, rows=ROWS, key_field="key"):
    with open(path, "w", encoding="utf-8") as f:
        for key, en, fr, de in rows:
            obj = {key_field: key, "en": en, "fr": fr}
            if de is not None:
                obj["de"] = de
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.write("\n")                      # a blank line is skipped
    return path


def assert_rows(ps, expected, langs=("en", "fr", "de")):
    assert ps.keys == [r[0] for r in expected]
    for j, lang in enumerate(langs):
        assert ps.rows(lang) == [r[1 + j] for r in expected]


# ------------------------------------------------------------------ the dataclass ------

def test_parallel_set_len_subset_rows_and_select():
    ps = ParallelSet(["en", "fr"], ["1", "2", "3"], {"en": ["a", "b", "c"], "fr": ["x", "y", "z"]},
                     dropped=2, source="s")
    assert len(ps) == 3
    sub = ps.subset(2)
    assert len(sub) == 2 and sub.rows("fr") == ["x", "y"] and sub.dropped == 2 and sub.source == "s"
    assert len(ps.subset(10)) == 3 and len(ps.subset(None)) == 3
    assert ps.select(["fr"]).languages == ["fr"]
    assert ps.summary().loc["en", "rows"] == 3
    with pytest.raises(ValueError, match="subset size"):
        ps.subset(0)
    with pytest.raises(ValueError, match="'de' is not in this parallel set"):
        ps.rows("de")


def test_parallel_set_refuses_misaligned_or_unknown_input():
    with pytest.raises(ValueError, match="one text per key"):
        ParallelSet(["en", "fr"], ["1", "2"], {"en": ["a", "b"], "fr": ["x"]})
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        ParallelSet(["en", "xx"], ["1"], {"en": ["a"], "xx": ["b"]})
    with pytest.raises(ValueError, match="repeats keys"):
        ParallelSet(["en"], ["1", "1"], {"en": ["a", "b"]})


# ------------------------------------------------------------------ corpus ------------

def test_from_corpus_drops_rows_with_an_empty_language():
    ps = parallel_from_corpus(make_corpus())
    assert_rows(ps, COMPLETE_EN_FR_DE)
    assert ps.dropped == 2
    en_fr = parallel_from_corpus(make_corpus(), ["en", "fr"])      # only "c" lacks French
    assert en_fr.keys == ["a", "b", "d"] and en_fr.dropped == 1


def test_from_corpus_without_parallel_set_or_language_is_refused():
    with pytest.raises(ValueError, match="has no parallel set"):
        parallel_from_corpus(make_corpus(parallel=False))
    with pytest.raises(ValueError, match=r"no texts for \['ar'\]"):
        parallel_from_corpus(make_corpus(), ["en", "ar"])


# ------------------------------------------------------------------ JSON lines --------

def test_from_jsonl_keeps_complete_rows_and_counts_the_others(tmp_path):
    ps = parallel_from_jsonl(write_jsonl(tmp_path / "p.jsonl"), ["en", "fr", "de"])
    assert_rows(ps, COMPLETE_EN_FR_DE)
    assert ps.dropped == 2


def test_from_jsonl_uses_id_or_line_number_as_key(tmp_path):
    ps = parallel_from_jsonl(write_jsonl(tmp_path / "p.jsonl", key_field="id"), ["en", "fr"])
    assert ps.keys == ["a", "b", "d"]
    path = tmp_path / "nokey.jsonl"
    path.write_text('{"en": "one", "fr": "un"}\n\n{"en": "two", "fr": "deux"}\n', encoding="utf-8")
    assert parallel_from_jsonl(path, ["en", "fr"]).keys == ["1", "3"]


def test_indonesian_field_id_is_a_text_not_a_key(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"key": "k1", "en": "one", "id": "satu"}\n', encoding="utf-8")
    ps = parallel_from_jsonl(path, ["en", "id"])
    assert ps.keys == ["k1"] and ps.rows("id") == ["satu"]


def test_json_list_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"en": "one", "fr": "un"}, {"en": "two"}]), encoding="utf-8")
    ps = load_parallel(path, ["en", "fr"])
    assert ps.rows("fr") == ["un"] and ps.dropped == 1


@pytest.mark.parametrize("line, message", [
    ('{"en": "one", "fr": ', r"line 2: not valid JSON"),
    ('["en", "fr"]', r"line 2: expected a JSON object"),
    ('{"en": "one", "fr": 3}', r"line 2: field 'fr' is int"),
])
def test_bad_jsonl_line_names_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"en": "fine", "fr": "bien"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        parallel_from_jsonl(path, ["en", "fr"])


def test_jsonl_errors_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown language code 'english'"):
        parallel_from_jsonl(tmp_path / "p.jsonl", ["english"])
    with pytest.raises(FileNotFoundError):
        parallel_from_jsonl(tmp_path / "missing.jsonl", ["en"])
    path = write_jsonl(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="none of the 4 rows"):
        parallel_from_jsonl(path, ["en", "ar"])        # no row has Arabic
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"key": 1, "en": "a"}\n{"key": 1, "en": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: key '1' was already used by line 1"):
        parallel_from_jsonl(dup, ["en"])


# ------------------------------------------------------------------ Hugging Face ------

def test_from_hf_local_folder_with_custom_columns(tmp_path):
    from datasets import Dataset, DatasetDict

    data = {"id": [r[0] for r in ROWS], "english": [r[1] for r in ROWS],
            "fr": [r[2] for r in ROWS], "de": [r[3] for r in ROWS]}
    Dataset.from_dict(data).save_to_disk(str(tmp_path / "flat"))
    ps = parallel_from_hf(str(tmp_path / "flat"), ["en", "fr", "de"], columns={"en": "english"})
    assert_rows(ps, COMPLETE_EN_FR_DE)
    assert ps.dropped == 2
    DatasetDict({"test": Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "dict"))
    ps = load_parallel(f"hf:{tmp_path / 'dict'}", ["en", "fr"], columns={"en": "english"}, split="test")
    assert ps.keys == ["a", "b", "d"] and ps.dropped == 1
    with pytest.raises(ValueError, match="no split 'train'"):
        parallel_from_hf(str(tmp_path / "dict"), ["en"], columns={"en": "english"})
    with pytest.raises(ValueError, match="no column 'en'"):
        parallel_from_hf(str(tmp_path / "flat"), ["en"])


def test_from_hf_json_builder_and_nested_translation_column(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for key, en, fr, _ in ROWS:
            f.write(json.dumps({"translation": {"en": en, "fr": fr}}) + "\n")
    ps = load_parallel("hf:json", ["en", "fr"], data_files=str(path))
    assert ps.keys == ["0", "1", "3"]                       # row index as key
    assert ps.rows("fr") == ["Au commencement", "Dieu créa", "et la terre"]
    assert ps.dropped == 1
    assert "translation.en" in ps.source


# ------------------------------------------------------------------ entry point --------

def test_load_parallel_dispatch_and_bad_specs(tmp_path):
    corpus = make_corpus()
    assert load_parallel(None, corpus=corpus).keys == ["a", "d"]
    assert load_parallel("corpus", ["en", "fr"], corpus=corpus).keys == ["a", "b", "d"]
    assert load_parallel(str(write_jsonl(tmp_path / "p.jsonl")), ["en", "fr"]).dropped == 1
    with pytest.raises(ValueError, match="no corpus was given"):
        load_parallel("corpus", ["en"])
    with pytest.raises(ValueError, match="is not understood"):
        load_parallel("verses.csv", ["en"])
    with pytest.raises(ValueError, match="names no dataset"):
        load_parallel("hf:", ["en"])
    with pytest.raises(ValueError, match="only apply to 'hf:NAME'"):
        load_parallel("corpus", corpus=corpus, split="test")
    with pytest.raises(ValueError, match="needs the list of languages"):
        load_parallel("hf:x")

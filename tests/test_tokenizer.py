"""The byte-level BPE tokenizer: exact round trips in every script, fixed special ids,
loading by folder, TransformerLens BOS handling, fertility."""

import math
import sqlite3

import pytest

from mlclt_utils.data.corpus import SPLITS, Corpus, bible_db_path, clean_verse
from mlclt_utils.languages import LANGUAGES, bible_code
from mlclt_utils.tokenizer import (BOS_ID, SPECIAL_IDS, fertility_table, load_tokenizer, save_tokenizer,
                                   train_tokenizer)

# one language per script of languages.py (kana for Japanese, Han for Chinese)
SCRIPT_LANGS = ["en", "fr", "de", "vi", "tr", "ru", "ar", "hi", "bn", "zh", "ja", "ko"]
EXTRA_TEXTS = [
    "Ça déjà vu — naïve façade; Größe, ñandú, Łódź, İstanbul, Đà Nẵng.",
    "Съешь же ещё этих мягких французских булок.",
    "ひらがな カタカナ 漢字、ｆｕｌｌ－ｗｉｄｔｈ and   spaces\t\n tabs",
    "emoji 🙂 and symbols ∑ ≤ ∞ ‰ €",
]


def _verses(con, lang, where, args=()):
    rows = con.execute(f"SELECT vText FROM bible WHERE bbName = ? AND {where} "
                       "ORDER BY bNumber, cNumber, vNumber", (bible_code(lang), *args)).fetchall()
    return [v for v in (clean_verse(r[0], lang) for r in rows) if v]


@pytest.fixture(scope="module")
def small():
    """A small multi-script corpus straight from the Bible database: Genesis 1-2 to
    train on, John 3:16 and Jonah 1:1-3 as aligned texts."""
    con = sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True)
    texts, aligned = {}, {}
    for lang in SCRIPT_LANGS:
        train = " ".join(_verses(con, lang, "bNumber = 1 AND cNumber <= 2"))
        texts[lang] = {s: [train] for s in SPLITS}
        aligned[lang] = (_verses(con, lang, "bNumber = 43 AND cNumber = 3 AND vNumber = 16")
                         + _verses(con, lang, "bNumber = 32 AND cNumber = 1 AND vNumber <= 3"))
    con.close()
    corpus = Corpus(SCRIPT_LANGS, texts, {"keys": []}, "test")
    return corpus, aligned


@pytest.fixture(scope="module")
def tok(small):
    corpus, _ = small
    return train_tokenizer(corpus, {"vocab_size": 600, "sample_chars_per_language": 3000,
                                    "min_frequency": 2}, seed=0, model_max_length=64)


def test_scripts_cover_languages_module():
    scripts = {LANGUAGES[lang][2] for lang in SCRIPT_LANGS}
    assert scripts == {s for _, _, s in LANGUAGES.values()}


def test_round_trip_every_script(small, tok):
    _, aligned = small
    texts = [t for lang in SCRIPT_LANGS for t in aligned[lang]] + EXTRA_TEXTS
    for text in texts:
        ids = tok.encode(text)
        assert 1 not in ids  # never <unk>: byte-level BPE covers every byte
        assert tok.decode(ids) == text
    for lang in SCRIPT_LANGS:
        assert len(aligned[lang]) == 4


def test_special_ids(tok):
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 3, 4)
    assert tok.encode("hello")[0] != BOS_ID  # BOS is added by the data sets / TransformerLens
    assert len(tok) == 600


def test_training_is_seeded(small, tok):
    corpus, _ = small
    again = train_tokenizer(corpus, {"vocab_size": 600, "sample_chars_per_language": 3000,
                                     "min_frequency": 2}, seed=0, model_max_length=64)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, {"vocab_size": 100, "sample_chars_per_language": 3000,
                                 "min_frequency": 2}, seed=0)


def test_folder_loads_with_autotokenizer(tmp_path, small, tok):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path / "tok")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    _, aligned = small
    for lang in ("en", "ar", "zh", "ko"):
        assert auto.encode(aligned[lang][0]) == tok.encode(aligned[lang][0])
        assert auto.decode(auto.encode(aligned[lang][0])) == aligned[lang][0]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (3, 4, 0)
    assert auto.model_max_length == 64
    assert load_tokenizer(tmp_path / "tok").get_vocab() == tok.get_vocab()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path)


def test_transformer_lens_prepends_bos(tmp_path, tok):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    # TransformerLens reloads the tokenizer from its folder, so give it a loaded one
    tok = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=64, d_head=8, n_heads=2, d_mlp=32,
                                  d_vocab=len(tok), act_fn="gelu")
    model = HookedTransformer(cfg, tokenizer=tok)
    text = "Now the word of the LORD came unto Jonah"
    tokens = model.to_tokens(text, prepend_bos=True)
    assert tokens[0, 0].item() == BOS_ID == 3
    assert tokens[0, 1:].tolist() == tok.encode(text)
    assert model.to_str_tokens(text)[0] == "<bos>"


def test_fertility_table(small, tok):
    _, aligned = small
    table = fertility_table(tok, {lang: aligned[lang] for lang in ("en", "fr", "ar", "zh", "ja")})
    assert list(table.index) == ["en", "fr", "ar", "zh", "ja"]
    assert table.loc["en", "ratio_to_reference"] == pytest.approx(1.0)
    assert table.loc["zh", "unit"] == "character" and table.loc["en", "unit"] == "word"
    assert (table["tokens_per_unit"] > 0).all()
    assert ((table["multi_piece_share"] >= 0) & (table["multi_piece_share"] <= 1)).all()
    assert table.loc["en", "tokens_per_unit"] >= 1.0
    # Arabic was trained on as much text as English but its words are rarer: more pieces
    assert table.loc["ar", "multi_piece_share"] > table.loc["en", "multi_piece_share"]
    # lists of different lengths are not aligned: no ratio
    loose = fertility_table(tok, {"en": aligned["en"], "fr": aligned["fr"][:2]})
    assert math.isnan(loose.loc["fr", "ratio_to_reference"])


def test_marked_context_marks_whole_characters(tok):
    from mlclt_utils.features.examples import marked_context

    text = "emoji 🙂 and 漢字"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    part = next(p for p, s in enumerate(pieces) if "\ufffd" in s)   # a byte of a character
    marked = marked_context(tok, ids, part)
    assert "\ufffd" not in marked and marked.replace("[[", "").replace("]]", "") == text
    inner = marked[marked.index("[[") + 2:marked.index("]]")]
    assert inner in ("🙂", "漢", "字")
    # a window cut inside a character cannot be re-encoded: marked piece by piece instead
    cut = ids[part + 1:]
    assert tok.encode(tok.decode(cut), add_special_tokens=False) != cut
    assert marked_context(tok, cut, 0) == f"[[{pieces[part + 1]}]]{tok.decode(cut[1:])}"


def test_token_texts_show_each_character_once(tok):
    from mlclt_utils.viz.explore import token_texts

    text = "emoji 🙂 and 漢字"
    ids = tok.encode(text, add_special_tokens=False)
    shown = token_texts(tok, ids)
    assert len(shown) == len(ids) and "".join(shown) == text
    assert not any("\ufffd" in s for s in shown)
    assert "" in shown                     # the later byte pieces of a character show nothing

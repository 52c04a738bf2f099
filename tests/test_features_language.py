"""Token and span language classifier: known answers on constructed streams and strings."""

import json
import math

import numpy as np
import pytest
import torch

from mlclt_utils.features.language import (SpanClassifier, TokenLanguages, script_counts,
                                           span_language, validate_span_classifier)
from mlclt_utils.tokenizer import BOS_ID, PAD_ID, SPECIAL_TOKENS, wrap_tokenizer

V = 20


def rows_from(counts: dict[int, int], n_ctx=8) -> torch.Tensor:
    """Token rows holding each id ``counts[id]`` times, after BOS, right-padded with PAD."""
    ids = [t for t, c in counts.items() for _ in range(c)]
    n_rows = math.ceil(len(ids) / (n_ctx - 1))
    rows = torch.full((n_rows, n_ctx), PAD_ID, dtype=torch.long)
    rows[:, 0] = BOS_ID
    for i, t in enumerate(ids):
        rows[i // (n_ctx - 1), 1 + i % (n_ctx - 1)] = t
    return rows


# en: 11 tokens, fr: 11 tokens (so raw counts are already normalised counts).
EN = {10: 6, 11: 5}
FR = {11: 5, 13: 6}


def test_token_labels_on_constructed_streams():
    tl = TokenLanguages.from_token_rows({"en": rows_from(EN), "fr": rows_from(FR)}, V, min_count=1)
    assert tl.language_of(10) == "en"          # only in English
    assert tl.language_of(13) == "fr"          # only in French
    assert tl.language_of(11) == "shared"      # evenly in both
    assert tl.language_of(14) == "unknown"     # never seen
    assert [tl.language_of(i) for i in range(len(SPECIAL_TOKENS))] == ["special"] * 5
    labels = tl.labels()
    assert len(labels) == V and labels[10] == "en"
    assert tl.tokens_of("en") == [10] and tl.tokens_of("shared") == [11]
    assert tl.summary().loc["unknown", "tokens"] == V - 5 - 3


def test_counts_are_normalised_by_each_language_total():
    # English has 10x more text. Token 15: 6 times in English (6 / 100 of its tokens), 3 times
    # in French (3 / 10): more often in English, but three times as frequent in French.
    en = {15: 6, 10: 94}
    fr = {15: 3, 13: 7}
    share_fr = (3 / 10) / (3 / 10 + 6 / 100)             # 0.833
    tl = TokenLanguages.from_token_rows({"en": rows_from(en), "fr": rows_from(fr)}, V, min_count=1)
    assert tl.language_of(15) == "fr"
    strict = TokenLanguages.from_token_rows({"en": rows_from(en), "fr": rows_from(fr)}, V,
                                            shared_share=share_fr + 0.01, min_count=1)
    assert strict.language_of(15) == "shared"


def test_shared_share_boundary_and_min_count():
    # token 12: 3 in en, 2 in fr with equal totals -> share 0.6 exactly: en at 0.6, shared above
    en, fr = {12: 3, 10: 7}, {12: 2, 13: 8}
    rows = {"en": rows_from(en), "fr": rows_from(fr)}
    assert TokenLanguages.from_token_rows(rows, V, shared_share=0.6, min_count=1).language_of(12) == "en"
    assert TokenLanguages.from_token_rows(rows, V, shared_share=0.61, min_count=1).language_of(12) == "shared"
    assert TokenLanguages.from_token_rows(rows, V, min_count=6).language_of(12) == "unknown"  # 5 < 6


def test_round_trip_through_json():
    tl = TokenLanguages.from_token_rows({"en": rows_from(EN), "fr": rows_from(FR)}, V, min_count=2)
    back = TokenLanguages.from_dict(json.loads(json.dumps(tl.to_dict())))
    assert back.labels() == tl.labels() and back.languages == ["en", "fr"]
    assert np.array_equal(back.counts, tl.counts)


def test_token_languages_refuses_bad_input():
    good = {"en": rows_from(EN), "fr": rows_from(FR)}
    with pytest.raises(ValueError, match="contain id 25, outside 0..19"):
        TokenLanguages.from_token_rows({"en": torch.tensor([[3, 25]]), "fr": rows_from(FR)}, V)
    with pytest.raises(ValueError, match="unknown language code 'english'"):
        TokenLanguages.from_token_rows({"english": rows_from(EN)}, V)
    with pytest.raises(ValueError, match="shared_share is 1.5"):
        TokenLanguages.from_token_rows(good, V, shared_share=1.5)
    with pytest.raises(ValueError, match="vocab_size is 4"):
        TokenLanguages.from_token_rows(good, 4)
    with pytest.raises(ValueError, match=r"languages \['fr'\] have no"):
        TokenLanguages.from_token_rows({"en": rows_from(EN), "fr": torch.tensor([[BOS_ID, PAD_ID]])}, V)
    tl = TokenLanguages.from_token_rows(good, V)
    with pytest.raises(ValueError, match="token id 20 is not an integer in 0..19"):
        tl.language_of(20)


# ------------------------------------------------------------------ spans: scripts -----

@pytest.mark.parametrize("text, expected", [
    ("Bonjour", "fr"), ("مرحبا", "ar"), ("你好", "zh"), ("こんにちは", "ja"),
    ("日本語です", "ja"),                 # Han and kana: Japanese
    ("Привет", "unknown"),               # Cyrillic: no candidate writes it
    ("123 !", "unknown"),                # no letters and no frequencies
])
def test_script_rule_on_real_strings(text, expected):
    assert span_language(text, languages=["fr", "ar", "zh", "ja"]) == expected


def test_script_counts():
    assert script_counts("Ça va? 你好こんにちは") == {"latin": 4, "han": 2, "kana": 5}
    assert script_counts("سلام, мир") == {"arabic": 4, "cyrillic": 3}


def test_languages_sharing_a_script_need_frequencies():
    assert span_language("Bonjour", languages=["en", "fr", "ar"]) == "unknown"


# ------------------------------------------------------------------ spans: frequencies -

def reference_log_likelihood(counts: dict[int, int], span, alpha, n_ids):
    total = sum(counts.values())
    return sum(math.log((counts.get(t, 0) + alpha) / (total + alpha * n_ids)) for t in span)


@pytest.mark.parametrize("span", [[10], [13], [10, 11, 13, 13], [10, 10, 13, 14], [11]])
def test_frequency_rule_between_two_latin_languages(span):
    en, fr = {10: 6, 11: 5, 12: 9}, {11: 5, 13: 6}        # totals 20 and 11
    tl = TokenLanguages.from_token_rows({"en": rows_from(en), "fr": rows_from(fr)}, V)
    clf = SpanClassifier(tl)                               # no tokenizer: ids by frequency
    alpha, n_ids = 0.5, V - len(SPECIAL_TOKENS)
    ref = {lang: reference_log_likelihood(c, span, alpha, n_ids) for lang, c in (("en", en), ("fr", fr))}
    assert clf(span) == max(ref, key=ref.get)
    assert clf([BOS_ID] + span + [PAD_ID]) == clf(span)   # special ids are ignored
    assert clf(torch.tensor(span)) == clf(span)


def word_tokenizer():
    """A word-level tokenizer over a fixed vocabulary (special tokens first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["the", "and", "of", "le", "et", "de", "في", "من", "的", "是", "の", "は"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
    return wrap_tokenizer(tok), vocab


def test_script_then_frequency_with_a_tokenizer():
    tok, vocab = word_tokenizer()
    rows = {"en": [np.array([vocab[w] for w in "the and of the and of".split()])],
            "fr": [np.array([vocab[w] for w in "le et de le et de the".split()])],
            "ar": [np.array([vocab["في"], vocab["من"]])],
            "zh": [np.array([vocab["的"], vocab["是"]])],
            "ja": [np.array([vocab["の"], vocab["は"], vocab["的"]])]}
    tl = TokenLanguages.from_token_rows(rows, len(tok), min_count=1)
    clf = SpanClassifier(tl, tok)
    assert clf("the and") == "en"
    assert clf("le et the") == "fr"                        # Latin: frequencies decide
    assert clf([vocab["في"], vocab["من"]]) == "ar"         # ids decoded, Arabic script
    assert clf("的 是") == "zh"                            # Han without kana
    assert clf("的 の") == "ja"                            # kana present
    assert clf("<unk>") == "unknown"                       # only a special token


def test_validate_span_classifier_on_a_known_classifier():
    tok, vocab = word_tokenizer()
    texts = {"en": ["the and of", "the", "of and"], "fr": ["le et de le", "de"]}

    def always_english(ids):
        return "en"

    df = validate_span_classifier(always_english, texts, tok, lengths=(1, 2, 4))
    row = df.set_index(["language", "span_tokens"])
    assert row.loc[("en", 1), "n_spans"] == 3 and row.loc[("en", 1), "accuracy"] == 1.0
    assert row.loc[("en", 2), "n_spans"] == 2                       # "the" is too short
    assert row.loc[("en", 4), "n_spans"] == 0 and math.isnan(row.loc[("en", 4), "accuracy"])
    assert row.loc[("fr", 1), "accuracy"] == 0.0 and row.loc[("fr", 1), "confused_with"] == "en"
    assert row.loc[("fr", 4), "n_spans"] == 1
    assert row.loc[("all", 1), "accuracy"] == 0.5 and row.loc[("all", 1), "n_spans"] == 5
    with pytest.raises(ValueError, match="lengths is"):
        validate_span_classifier(always_english, texts, tok, lengths=(0,))


def test_validate_span_classifier_with_the_classifier():
    tok, vocab = word_tokenizer()
    train = {"en": ["the and of the of"], "fr": ["le et de de le"]}
    tl = TokenLanguages.from_texts(train, tok, min_count=1)
    held_out = {"en": ["of the", "and"], "fr": ["de le", "et"]}
    df = validate_span_classifier(SpanClassifier(tl, tok), held_out, tok, lengths=(1, 2))
    assert df["accuracy"].tolist() == [1.0] * len(df)


def test_span_classifier_refuses_bad_input():
    tl = TokenLanguages.from_token_rows({"en": rows_from(EN), "fr": rows_from(FR)}, V)
    with pytest.raises(ValueError, match="unknown language code 'ar'"):
        SpanClassifier(tl, languages=["en", "ar"])        # no frequencies for Arabic
    with pytest.raises(ValueError, match="no tokenizer"):
        SpanClassifier(tl)("Bonjour")
    with pytest.raises(ValueError, match="token id 99 is outside"):
        SpanClassifier(tl)([99])
    with pytest.raises(ValueError, match="give the candidate languages"):
        SpanClassifier()

"""Word pieces on constructed tokenisations."""

import numpy as np
import pytest

from mlclt_utils.features.words import (continues_word, language_has_words, pieces_per_word,
                                        reassembly_features)


def test_continuing_pieces_on_a_constructed_tokenisation():
    pieces = ["And", " he", " remem", "bered", " the", " coven", "ant", ",", " d'", "Abra", "ham"]
    assert continues_word(pieces).tolist() == [False, False, False, True, False, False, True, False,
                                               False, False, True]
    # "Abra" follows an apostrophe: a new word; Arabic letters are letters too
    assert continues_word(["وَ", "قَالَ", " الله"]).tolist() == [False, True, False]
    assert pieces_per_word(pieces) == pytest.approx(10 / 7)      # 10 lettered tokens, 7 words (d' is one)
    assert pieces_per_word([",", "."]) != pieces_per_word([",", "."])  # no word: NaN


def test_reassembly_features_fire_mostly_on_continuing_pieces():
    rng = np.random.default_rng(0)
    continues = rng.random(2000) < 0.3
    fired = np.zeros((2000, 4), dtype=bool)
    fired[:, 0] = continues & (rng.random(2000) < 0.5)           # only on pieces
    fired[:, 1] = rng.random(2000) < 0.2                          # anywhere: at the base rate
    fired[:5, 2] = True
    continues_5 = continues.copy()
    continues_5[:5] = True                                        # on pieces, but too rare
    fired[:, 3] = ~continues & (rng.random(2000) < 0.5)          # never on pieces
    assert reassembly_features(fired, continues_5).tolist() == [0]
    with pytest.raises(ValueError, match="tokens, features"):
        reassembly_features(fired[:, 0], continues)
    assert not language_has_words("zh") and language_has_words("fr")


def test_continuing_character_pieces_of_a_byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mlclt_utils.features.words import continues_character, continues_unit, unit_name

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["起初神创造天地"] * 20 + ["神"] * 50,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = tok.encode("神龘神").ids                      # 龘 never seen: its three bytes stay apart
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[0] == "神" and pieces[-1] == "神" and len(pieces) == 5
    assert continues_character(pieces).tolist() == [False, False, True, True, False]
    assert continues_unit(pieces, "zh").tolist() == continues_character(pieces).tolist()
    assert continues_unit([" the", "re"], "en").tolist() == [False, True]
    assert (unit_name("zh"), unit_name("fr")) == ("character", "word")

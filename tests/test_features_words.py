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

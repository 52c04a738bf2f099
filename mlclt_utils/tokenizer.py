"""One byte-level BPE tokenizer per run, shared by every model of the run.

The tokenizer is trained with the Hugging Face ``tokenizers`` library (byte-level
pre-tokenizer and decoder, so any text round-trips exactly) on a language-balanced
sample: the same number of characters from each language's train split. Special
tokens come first, so their ids are fixed: ``<pad>`` 0, ``<unk>`` 1, ``<sep>`` 2,
``<bos>`` 3, ``<eos>`` 4 (BOS 3 and EOS 4 as in the paper's released models; BOS is
never 0, which circuit-tracer needs).

The saved tokenizer does not insert BOS by itself: TransformerLens prepends
``tokenizer.bos_token`` when asked (``prepend_bos=True``), and the data sets of
``corpus`` put BOS at the start of every sequence. Give TransformerLens a tokenizer
loaded from its folder (``load_tokenizer``, or ``stages.load("tokenizer", ...)``): it reloads the
tokenizer by its ``name_or_path``, which a freshly trained, unsaved one lacks.

It is saved as a Hugging Face tokenizer folder, loadable with
``transformers.AutoTokenizer.from_pretrained(folder)`` (circuit-tracer takes the folder
path as ``tokenizer_name``).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .data.corpus import Corpus
from .languages import NO_SPACE_LANGUAGES, language_rng

# Fixed special-token ids: the tokenizer is trained with these tokens first, in this order.
PAD_ID, UNK_ID, SEP_ID, BOS_ID, EOS_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ["<pad>", "<unk>", "<sep>", "<bos>", "<eos>"]
# Byte-level BPE needs the 256 bytes plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
SPECIAL_IDS = {"<pad>": PAD_ID, "<unk>": UNK_ID, "<sep>": SEP_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
DEFAULT_MAX_LENGTH = 1024


def training_sample(corpus: Corpus, chars_per_language: int, seed: int) -> list[str]:
    """About ``chars_per_language`` characters of train documents from every language,
    documents taken in a seeded order (the last one cut to fit)."""
    sample = []
    for lang in corpus.languages:
        docs = corpus.texts[lang]["train"]
        left = chars_per_language
        for i in language_rng(seed, lang, 0xB0E).permutation(len(docs)):
            if left <= 0:
                break
            doc = docs[int(i)][:left]
            sample.append(doc)
            left -= len(doc)
    return sample


def _check_tok_cfg(tok_cfg: Mapping[str, Any]) -> None:
    for key in ("vocab_size", "sample_chars_per_language", "min_frequency"):
        value = tok_cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"tokenizer.{key} is {value!r}; it must be a positive integer")
    check_vocab_size(tok_cfg["vocab_size"])


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"tokenizer.vocab_size {vocab_size} is too small: byte-level BPE needs at "
                         f"least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")


def wrap_tokenizer(tok, model_max_length: int | None = None):
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", sep_token="<sep>",
        model_max_length=model_max_length or DEFAULT_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    _check_ids(fast)
    return fast


def _check_ids(tokenizer) -> None:
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if got != SPECIAL_IDS:
        raise ValueError(f"special token ids are {got}, expected {SPECIAL_IDS}")


def check_special_ids(tokenizer) -> None:
    """Refuse a tokenizer whose BOS/EOS ids are not the fixed ones every stage assumes."""
    for name, expected in (("bos", BOS_ID), ("eos", EOS_ID)):
        got = getattr(tokenizer, f"{name}_token_id", expected)
        if got != expected:
            raise ValueError(f"the tokenizer's {name.upper()} id is {got}, expected {expected}; "
                             "train it with mlclt_utils.tokenizer.train_tokenizer")


def check_run_tokenizer(tokenizer, where: str = "the tokenizer") -> None:
    """Refuse a tokenizer (the book's own or a loaded model's) whose ids break what every
    stage assumes: BOS 3 and EOS 4, and id 0 a special token (padding is left out of every
    statistic by that id)."""
    for name, expected in (("bos", BOS_ID), ("eos", EOS_ID)):
        got = getattr(tokenizer, f"{name}_token_id", None)
        if got != expected:
            raise ValueError(f"{where}: the {name.upper()} id is {got}, expected {expected} "
                             f"(the book's special ids: {SPECIAL_IDS})")
    first = tokenizer.convert_ids_to_tokens(PAD_ID)
    if first not in tokenizer.all_special_tokens:
        raise ValueError(f"{where}: id {PAD_ID} is the ordinary token {first!r}; the book reserves "
                         f"it for padding (special ids: {SPECIAL_IDS})")


def encode_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), with the fast tokenizer's batch encoder."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # the Rust tokenizer
    encs = backend.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encs]


def train_tokenizer(corpus: Corpus, tok_cfg: Mapping[str, Any], seed: int,
                    model_max_length: int | None = None):
    """Train a byte-level BPE on a language-balanced sample of ``corpus``'s train split.

    ``tok_cfg`` holds ``vocab_size``, ``sample_chars_per_language`` and ``min_frequency``
    (the preset's ``tokenizer`` section). Returns a ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_tok_cfg(tok_cfg)
    sample = training_sample(corpus, tok_cfg["sample_chars_per_language"], seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tok_cfg["vocab_size"],
        min_frequency=tok_cfg["min_frequency"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return wrap_tokenizer(tok, model_max_length)


def save_tokenizer(tokenizer, folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(folder):
    """Load a tokenizer folder written by :func:`save_tokenizer` (checks the special ids)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; build the tokenizer stage first")
    tok = AutoTokenizer.from_pretrained(str(folder))
    check_run_tokenizer(tok, str(folder.name))
    return tok


# --------------------------------------------------------------------------------------
# Fertility
# --------------------------------------------------------------------------------------

def _strip_punct(word: str) -> str:
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start])[0] in "PS":
        start += 1
    while end > start and unicodedata.category(word[end - 1])[0] in "PS":
        end -= 1
    return word[start:end]


def _is_text_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LMN"


def fertility_table(tokenizer, texts_by_lang: Mapping[str, list[str]], reference: str = "en"):
    """How finely the tokenizer cuts each language. One row per language:

    * ``unit``: ``word`` (whitespace-split, punctuation stripped from the ends) or, for
      languages written without spaces (zh, ja), ``character`` (letters and digits only).
    * ``tokens_per_unit``: tokens of the running texts divided by the number of units
      (tokens per word; tokens per character for zh/ja).
    * ``multi_piece_share``: share of word occurrences cut into two or more tokens when
      tokenized as they appear mid-sentence (with their leading space, which byte-level
      BPE marks). For zh/ja: share of character occurrences that the vocabulary cannot
      hold as one token (the character alone needs two or more byte tokens), i.e. the
      characters the model has to reassemble from bytes.
    * ``ratio_to_reference``: total tokens of the language over total tokens of the
      reference language (English) on the same aligned texts (pairs where both are
      non-empty), so the ratio compares the same meaning. It is computed when all
      lists have the same length (taken as aligned, e.g. ``corpus.parallel``), else NaN.
    * ``chars_per_token``.
    """
    import pandas as pd

    lengths = {len(v) for v in texts_by_lang.values()}
    aligned = len(lengths) == 1 and reference in texts_by_lang
    counts = {lang: np.array([len(ids) for ids in encode_texts(tokenizer, [t or "" for t in texts])])
              for lang, texts in texts_by_lang.items()}
    rows = []
    for lang, texts in texts_by_lang.items():
        texts = [t for t in texts if t]
        n_tokens = int(counts[lang].sum())
        n_chars = sum(len(t) for t in texts)
        if lang in NO_SPACE_LANGUAGES:
            unit = "character"
            units = Counter(ch for t in texts for ch in t if _is_text_char(ch))
            pieces_of = {u: len(ids) for u, ids in zip(units, encode_texts(tokenizer, list(units)))}
        else:
            unit = "word"
            units = Counter(w for t in texts for w in (_strip_punct(x) for x in t.split()) if w)
            pieces_of = {u: len(ids) for u, ids in
                         zip(units, encode_texts(tokenizer, [" " + u for u in units]))}
        n_units = sum(units.values())
        multi = sum(c for u, c in units.items() if pieces_of[u] >= 2)
        ratio = math.nan
        if aligned:
            both = np.array([bool(a) and bool(b) for a, b in zip(texts_by_lang[lang], texts_by_lang[reference])])
            ref_total = counts[reference][both].sum() if both.any() else 0
            if ref_total:
                ratio = float(counts[lang][both].sum() / ref_total)
        rows.append({
            "language": lang,
            "unit": unit,
            "units": n_units,
            "tokens": n_tokens,
            "tokens_per_unit": n_tokens / n_units if n_units else math.nan,
            "multi_piece_share": multi / n_units if n_units else math.nan,
            "ratio_to_reference": ratio,
            "chars_per_token": n_chars / n_tokens if n_tokens else math.nan,
        })
    return pd.DataFrame(rows).set_index("language")


__all__ = [
    "SPECIAL_TOKENS", "SPECIAL_IDS", "training_sample", "train_tokenizer", "wrap_tokenizer",
    "save_tokenizer", "load_tokenizer", "fertility_table", "encode_texts", "check_special_ids",
    "PAD_ID", "UNK_ID", "SEP_ID", "BOS_ID", "EOS_ID", "MIN_VOCAB_SIZE",
]

"""Helper package of the multilingual CLT book: corpus, tokenizer, models, CLTs, metrics."""

__version__ = "0.1.0"

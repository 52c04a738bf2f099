"""Multilingual text in the book: token-highlighted contexts as HTML, tidy continuations.

A context marks its activating token with ``[[ ]]`` in plain text (what
``features.examples`` returns, fit for CSV files). For the book it becomes
``<mark class="mlclt-token">`` inside a span with ``dir="auto"``, so Arabic lays out right
to left and the mark never splits a word or drifts; the book's CSS declares a CJK-capable
font stack, so Chinese and Japanese render without a downloaded font.
"""

from __future__ import annotations

import html

from ..languages import NO_SPACE_LANGUAGES

OPEN, CLOSE = "[[", "]]"


def context_html(context: str) -> str:
    """``'a [[b]] c'`` -> ``<span class="mlclt-context" dir="auto">a <mark ...>b</mark> c</span>``."""
    i = context.find(OPEN)
    j = context.find(CLOSE, i + len(OPEN)) if i >= 0 else -1
    if i < 0 or j < 0:
        inner = html.escape(context)
    else:
        inner = (html.escape(context[:i]) + '<mark class="mlclt-token">'
                 + html.escape(context[i + len(OPEN):j]) + "</mark>"
                 + html.escape(context[j + len(CLOSE):]))
    return f'<span class="mlclt-context" dir="auto">{inner}</span>'


def trim_to_words(text: str, lang: str) -> str:
    """A generated continuation cut after its last whole word (languages written with
    spaces), with an ellipsis when something was cut, so no word is shown half."""
    text = text.strip()
    if lang in NO_SPACE_LANGUAGES or " " not in text:
        return text
    head = text.rsplit(" ", 1)[0]
    return head + " …" if head != text else text


def findings(items: list[str]):
    """A chapter's closing "What this run shows": one bullet per finding, each written from
    numbers the chapter computed (Markdown, rendered as text in the book)."""
    from IPython.display import Markdown

    return Markdown("\n".join(f"- {item}" for item in items))

"""How the book shows results. Authors of chapters use these and nothing else:

* ``table(df)`` (``viz.table``): every table; rounding, readable headers, no meaningless
  index, fitting the text column, colour scales per column;
* ``figures``: the chapters' figures, built on ``viz.style`` (text-column sizes, fixed
  language colours and order, ``panels``, ``colour_bar``, ``zoom_to_data``);
* ``viz.text``: token-highlighted contexts as HTML (``context_html``), whole-word
  continuations (``trim_to_words``), and ``findings`` for a chapter's closing section.

The conventions are written for chapter authors in ``book/contributing.md``.
"""

from .table import table

__all__ = ["table"]

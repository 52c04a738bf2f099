"""How the book shows results: figures (``figures``) and tables (``tables``)."""

"""Corpora (sources, cleaning, splits, the parallel set) and the token data sets built
from them (mixtures, evaluation sets, verse rows)."""

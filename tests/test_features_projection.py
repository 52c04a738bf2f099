"""The concept map groups what is alike, and measures it."""

import pandas as pd
import torch

from mlclt_utils.features.activations import UnitStats
from mlclt_utils.features.projection import concept_map, translation_neighbours


def _stats(means):
    rows = means.shape[0]
    return UnitStats([means > 0], [torch.zeros(means.shape[1], dtype=torch.long)], [means], 1,
                     torch.ones(rows, dtype=torch.long))


def test_verses_shared_across_languages_are_neighbours_and_language_clusters_are_not():
    g = torch.Generator().manual_seed(0)
    meaning = torch.randn(40, 32, generator=g) * 3
    shared = {lang: _stats(meaning + 0.05 * torch.randn(40, 32, generator=g)) for lang in ("en", "fr")}
    points = concept_map(shared, 0, seed=0)
    assert len(points) == 80 and set(points["language"]) == {"en", "fr"}
    near = translation_neighbours(shared, 0)
    assert near["share"] > 0.9 and near["low"] > near["chance"]

    offset = torch.randn(32, generator=g) * 20     # each language far from the other, rows random
    apart = {"en": _stats(torch.randn(40, 32, generator=g) + offset),
             "fr": _stats(torch.randn(40, 32, generator=g) - offset)}
    far = translation_neighbours(apart, 0)
    assert far["share"] < 0.2 and far["chance"] == 1 / 79


def test_translation_neighbours_known_answer():
    # two verses, two languages: verse 0 points along x in both, verse 1 along y
    same = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    stats = {"en": _stats(same), "fr": _stats(same * 2)}
    out = translation_neighbours(stats, 0)
    assert out["share"] == 1.0 and out["chance"] == 1 / 3 and out["points"] == 4
    swapped = {"en": _stats(same), "fr": _stats(same.flip(0))}      # fr's verse 0 looks like en's verse 1
    assert translation_neighbours(swapped, 0)["share"] == 0.0

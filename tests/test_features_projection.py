"""The concept map groups what is alike, and measures it."""

import pandas as pd
import torch

from mlclt_utils.features.activations import UnitStats
from mlclt_utils.features.projection import concept_map, meaning_neighbours


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
    assert meaning_neighbours(points) > 0.9

    offset = torch.randn(32, generator=g) * 20     # each language far from the other, rows random
    apart = {"en": _stats(torch.randn(40, 32, generator=g) + offset),
             "fr": _stats(torch.randn(40, 32, generator=g) - offset)}
    assert meaning_neighbours(concept_map(apart, 0, seed=0)) < 0.2


def test_meaning_neighbours_known_answer():
    pts = pd.DataFrame({"row": [0, 0, 1, 1], "language": ["en", "fr", "en", "fr"],
                        "x": [0.0, 0.1, 5.0, 5.1], "y": [0.0, 0.0, 0.0, 0.0]})
    assert meaning_neighbours(pts) == 1.0
    pts["row"] = [0, 1, 0, 1]
    assert meaning_neighbours(pts) == 0.0

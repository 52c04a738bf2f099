"""Feature-by-feature diff of two CLTs: exactly nothing against itself, a planted change
found at its layer and feature and nowhere else above the noise floor."""

import copy

import numpy as np
import pytest
import torch

from mlclt_utils.clt.diff import changed_features, feature_diff, noise_floor

from test_clt_formats import F, L, tiny_clt


def test_a_clt_against_itself_is_unchanged_everywhere():
    clt = tiny_clt()
    d = feature_diff(clt, copy.deepcopy(clt))
    assert len(d) == L * F
    for col in ("encoder_cosine", "decoder_cosine", "decoder_norm_ratio", "threshold_ratio"):
        np.testing.assert_allclose(d[col], 1.0, atol=1e-12)
    assert not changed_features(d, d).changed.any()


def test_a_change_of_scaling_alone_is_not_a_change_of_a_feature():
    clt = tiny_clt()
    other = copy.deepcopy(clt)
    with torch.no_grad():                     # the same raw maps, expressed with other scalings
        other.output_scale.mul_(2.0)
        for W in other.W_dec:
            W.mul_(2.0)
    d = feature_diff(clt, other)
    np.testing.assert_allclose(d["decoder_norm_ratio"], 1.0, atol=1e-12)


def _floor(clt, seed):
    """The base CLT with small noise on every decoder and encoder: a stand-in for training it
    further on the base model."""
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(clt)
    with torch.no_grad():
        for W in other.W_dec:
            W.add_(0.01 * W.abs().mean() * torch.randn(W.shape, generator=g))
        other.W_enc.add_(0.01 * other.W_enc.abs().mean() * torch.randn(other.W_enc.shape, generator=g))
    return other


def test_a_planted_change_is_found_at_its_feature_and_elsewhere_only_at_the_floors_rate():
    from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder

    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=8, d_features=400),
                               generator=torch.Generator().manual_seed(3))
    floor = feature_diff(clt, _floor(clt, 1))
    moved = _floor(clt, 2)
    with torch.no_grad():
        moved.W_dec[1][5].mul_(2.0)                       # feature 5 of layer 1 writes twice as much
        moved.W_dec[0][7] = torch.randn(moved.W_dec[0][7].shape, generator=torch.Generator().manual_seed(9))
    got = changed_features(feature_diff(clt, moved), floor, quantile=0.99)
    flagged = set(map(tuple, got.loc[got["changed"], ["layer", "feature"]].to_numpy().tolist()))
    assert {(1, 5), (0, 7)} <= flagged
    # unchanged features pass a 99 % floor about 1 % of the time per statistic (two of them)
    assert len(flagged) - 2 <= 0.04 * L * 400
    row = got.set_index(["layer", "feature"]).loc[(1, 5)]
    assert row["decoder_norm_ratio"] == pytest.approx(2.0, rel=0.05) and row["decoder_cosine"] > 0.99
    lim = noise_floor(floor)
    assert list(lim.columns) == ["turn", "growth"] and len(lim) == L


def test_clts_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        feature_diff(tiny_clt(), tiny_clt(cross_layer=False))

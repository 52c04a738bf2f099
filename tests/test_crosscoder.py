"""The crosscoder on a planted pair of models: latents both use read about 0.5 on the
relative decoder norm, latents only one uses near 0 or 1, and latent scaling tells a truly
model-specific latent from one the other model carries too."""

import numpy as np
import pytest
import torch

from mlclt_utils.sae.crosscoder import Crosscoder, CrosscoderConfig, latent_scaling, train_crosscoder

D = 24


def planted(n=12_000, seed=0):
    """Activations of two models built from sparse directions: 10 both use, 3 only a uses,
    3 only b uses (unit directions, activations exponential, each on for 8 % of tokens)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T[:16]           # orthonormal
    on = torch.rand(n, 16, generator=g) < 0.08
    act = torch.where(on, torch.empty(n, 16).exponential_(generator=g) + 0.5, torch.zeros(()))
    shared, a_only, b_only = slice(0, 10), slice(10, 13), slice(13, 16)
    a = act[:, shared] @ dirs[shared] + act[:, a_only] @ dirs[a_only]
    b = act[:, shared] @ dirs[shared] + act[:, b_only] @ dirs[b_only]
    return a, b, dirs


@pytest.fixture(scope="module")
def trained():
    a, b, dirs = planted()
    cfg = CrosscoderConfig(d_in=D, d_latent=48, k=2, lr=3e-3, train_tokens=600_000, batch_tokens=256,
                           dead_tokens=5_000)
    return train_crosscoder(a, b, cfg), a, b, dirs


def _match(cc, direction, model):
    """The latent whose decoder vector in ``model`` points most along ``direction``."""
    w = cc.W_dec.detach()[:, model]
    cos = (w @ direction) / w.norm(dim=-1).clamp_min(1e-12)
    j = int(cos.argmax())
    return j, float(cos[j])


def test_relative_norms_sort_shared_and_model_only_latents(trained):
    cc, a, b, dirs = trained
    rel = cc.relative_norms()
    for i in range(10):                                   # shared
        j, cos = _match(cc, dirs[i], 1)
        assert cos > 0.9 and 0.3 < float(rel[j]) < 0.7, (i, cos, float(rel[j]))
    for i in range(13, 16):                               # only b
        j, cos = _match(cc, dirs[i], 1)
        assert cos > 0.9 and float(rel[j]) > 0.85, (i, cos, float(rel[j]))
    for i in range(10, 13):                               # only a
        j, cos = _match(cc, dirs[i], 0)
        assert cos > 0.9 and float(rel[j]) < 0.15, (i, cos, float(rel[j]))
    x = torch.stack([a[:2000], b[:2000]], 1)
    with torch.no_grad():
        fvu = (x - cc(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(fvu) < 0.2


def test_latent_scaling_tells_a_real_b_only_latent_from_a_shared_one(trained):
    cc, a, b, dirs = trained
    b_only = [_match(cc, dirs[i], 1)[0] for i in range(13, 16)]
    shared = [_match(cc, dirs[i], 1)[0] for i in range(3)]
    got = latent_scaling(cc, a, b, b_only + shared).set_index("latent")
    assert (got.loc[b_only, "nu_error"].abs() < 0.2).all()
    assert (got.loc[shared, "nu_reconstruction"].between(0.7, 1.3)).all()


def test_eval_mode_uses_one_threshold_and_bad_input_is_refused(trained):
    cc, a, b, _ = trained
    x = torch.stack([a[:500], b[:500]], 1)
    z_all = cc.encode(x)
    torch.testing.assert_close(cc.encode(x[:7]), z_all[:7])          # a token's latents ignore its batch
    assert 0.5 < float((z_all > 0).sum(-1).float().mean()) < 6
    with pytest.raises(ValueError, match=r"\[n, 2, 24\]"):
        cc.encode(torch.zeros(3, 24))
    with pytest.raises(ValueError, match="k 99 is larger"):
        CrosscoderConfig(d_in=4, d_latent=8, k=99)


def test_a_crosscoder_of_a_model_with_itself_finds_nothing_model_specific():
    a, _, _ = planted(n=6000, seed=1)
    cc = train_crosscoder(a, a.clone(), CrosscoderConfig(d_in=D, d_latent=32, k=2, lr=3e-3,
                                                         train_tokens=200_000, batch_tokens=256))
    live = (cc.encode(torch.stack([a, a], 1)) > 0).any(0)
    rel = cc.relative_norms()[live]
    assert float((rel - 0.5).abs().max()) < 0.05

"""Tests of the cross-layer transcoder model: interface, exactness, sparse path, gradients."""

import math

import pytest
import torch

import mlclt_utils.clt.model as clt_model
from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder


def _clt(L=3, d=8, F=24, dtype=torch.float64, seed=0, **kw):
    clt = CrossLayerTranscoder(CLTConfig(L, d, F, **kw), generator=torch.Generator().manual_seed(seed))
    return clt.to(dtype)


def _data(n=64, L=3, d=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, L, d, generator=g, dtype=dtype) * 3.0,
            torch.randn(n, L, d, generator=g, dtype=dtype) * 0.5)


def test_config_round_trip_and_validation():
    cfg = CLTConfig(4, 16, 32, activation="topk", cross_layer=False, k=5)
    assert CLTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="activation"):
        CLTConfig(2, 4, 8, activation="relu")
    with pytest.raises(ValueError, match="unknown"):
        CLTConfig.from_dict({**cfg.to_dict(), "typo": 1})


def test_shapes_and_interface():
    clt = _clt(L=3, d=8, F=24)
    assert clt.W_enc.shape == (3, 8, 24) and clt.b_enc.shape == (3, 24)
    assert clt.log_threshold.shape == (3, 24) and clt.b_dec.shape == (3, 8)
    assert [tuple(W.shape) for W in clt.W_dec] == [(24, 3, 8), (24, 2, 8), (24, 1, 8)]
    assert clt.target_layers(0) == [0, 1, 2] and clt.target_layers(2) == [2]
    assert clt.input_scale.shape == clt.output_scale.shape == (3,)
    assert torch.allclose(clt.threshold, torch.full((3, 24), 0.03, dtype=torch.float64))
    x, y = _data()
    x5 = x.view(4, 16, 3, 8)
    assert clt.pre_activations(x5).shape == (4, 16, 3, 24)
    recon, acts = clt(x5)
    assert recon.shape == (4, 16, 3, 8) and acts.shape == (4, 16, 3, 24)
    # decode returns RAW outputs: dividing by the output scale
    with torch.no_grad():
        clt.output_scale.fill_(2.0)
    assert torch.allclose(clt.decode(acts), recon / 2)
    norms = clt.decoder_norms()
    assert norms.shape == (3, 24)
    assert torch.allclose(norms[1], clt.W_dec[1].reshape(24, -1).norm(dim=1))
    out = clt.loss(x, y, 0.5)
    for key in ("total", "mse", "sparsity", "preact", "l0"):
        assert out[key].dim() == 0
    assert out["fvu"].shape == out["l0_per_layer"].shape == (3,)
    assert out["fire_counts"].shape == (3, 24)


def test_initialisation_uses_the_reference_scales():
    """Encoder uniform in +/- 1/sqrt(F), decoders in +/- 1/sqrt(L d) (circuit-tracer,
    featflow), thresholds at threshold_init, biases 0."""
    L, d, F = 3, 16, 400
    clt = _clt(L=L, d=d, F=F)
    enc, dec = 1 / math.sqrt(F), 1 / math.sqrt(L * d)
    assert clt.W_enc.abs().max() <= enc and clt.W_enc.abs().max() > 0.95 * enc
    for W in clt.W_dec:
        assert W.abs().max() <= dec and W.abs().max() > 0.95 * dec
    assert clt.b_enc.abs().max() == 0 and clt.b_dec.abs().max() == 0
    assert clt.cfg.bandwidth == 0.1


def test_scales_normalise_to_sqrt_d():
    clt = _clt(L=3, d=8)
    x, y = _data()
    clt.set_scales_from(x, y)
    xt = x * clt.input_scale[:, None]
    yt = y * clt.output_scale[:, None]
    assert torch.allclose(xt.norm(dim=-1).mean(0), torch.full((3,), math.sqrt(8), dtype=x.dtype))
    assert torch.allclose(yt.norm(dim=-1).mean(0), torch.full((3,), math.sqrt(8), dtype=x.dtype))


def test_per_layer_mode_has_no_cross_layer_decoders():
    clt = _clt(L=3, d=8, F=24, cross_layer=False)
    assert all(W.shape[1] == 1 for W in clt.W_dec)
    assert clt.target_layers(0) == [0]
    acts = torch.zeros(5, 3, 24, dtype=torch.float64)
    acts[:, 0, :] = torch.rand(5, 24, dtype=torch.float64)
    out = clt.decode(acts) - clt.decode(torch.zeros_like(acts))
    assert out[:, 0].abs().sum() > 0 and out[:, 1:].abs().sum() == 0
    # the cross-layer CLT does write to later layers
    cross = _clt(L=3, d=8, F=24)
    out = cross.decode(acts) - cross.decode(torch.zeros_like(acts))
    assert out[:, 2].abs().sum() > 0


def test_linear_mlp_is_reconstructed_exactly():
    """A TransformerLens model whose MLPs are made linear (identity activation): each MLP
    output is affine in the MLP input, so 2d features per layer (+/- each basis direction,
    thresholds ~0) with decoders set to the linear map reproduce it with FVU 0."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from mlclt_utils.clt.activations import collect_mlp_io

    cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=12, d_head=4, n_heads=2, d_mlp=16,
                                  d_vocab=40, act_fn="relu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))          # non-trivial LN weights and biases
    for block in model.blocks:
        block.mlp.act_fn = lambda t: t
    tokens = torch.randint(5, 40, (6, 12))
    tokens[:, 0] = 3
    x, y = collect_mlp_io(model, tokens, batch_size=4, bos_id=3)
    L, d = 2, 8
    clt = CrossLayerTranscoder(CLTConfig(L, d, 2 * d, threshold_init=1e-12))
    clt.set_scales_from(x, y)
    eye = torch.eye(d)
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            mlp, ln = block.mlp, block.ln2
            M = (ln.w[:, None] * mlp.W_in) @ mlp.W_out                  # n -> y, [d, d]
            c = (ln.b @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
            s_in, s_out = clt.input_scale[l], clt.output_scale[l]
            clt.W_enc[l] = torch.cat([eye, -eye], dim=1)
            clt.b_enc[l] = 0
            clt.W_dec[l].zero_()
            clt.W_dec[l][:d, 0] = s_out * M / s_in
            clt.W_dec[l][d:, 0] = -s_out * M / s_in
            clt.b_dec[l] = s_out * c
    recon, _ = clt(x)
    assert torch.allclose(recon, y, atol=1e-5)
    out = clt.loss(x, y, 0.0)
    assert out["fvu"].max() < 1e-9


def _reference_loss(clt, x, y, lam, tanh_c, preact_coeff):
    """The JumpReLU CLT loss written out in plain torch, independently of the module.

    a = h * 1[h > theta] in value; the two-sided straight-through estimator is built from
    detached masks: a = h * fired + K * (theta0 / eps) * (theta0 - theta) with theta0 =
    theta detached and K = 1[|h - theta| < eps / 2], whose second term is 0 in value and
    has d/dtheta = -(theta / eps) K on both sides of theta, fired or not."""
    cfg = clt.cfg
    L, d, eps = cfg.n_layers, cfg.d_model, cfg.bandwidth
    n = x.shape[0]
    xt = x * clt.input_scale[:, None]
    yt = y * clt.output_scale[:, None]
    theta = clt.log_threshold.exp()
    h = torch.einsum("nld,ldf->nlf", xt, clt.W_enc) + clt.b_enc
    theta0 = theta.detach()
    fired = (h > theta0).to(h.dtype).detach()
    kernel = ((h - theta0).abs() < eps / 2).to(h.dtype).detach()
    a = h * fired + kernel * (theta0 / eps) * (theta0 - theta)
    outs = [clt.b_dec[k].expand(n, d) for k in range(L)]
    for l in range(L):
        for j, k in enumerate(clt.target_layers(l)):
            outs[k] = outs[k] + a[:, l] @ clt.W_dec[l][:, j, :]
    y_hat = torch.stack(outs, dim=1)
    norms = torch.stack([W.pow(2).sum((1, 2)).sqrt() for W in clt.W_dec])
    mse = (y_hat - yt).pow(2).sum(-1).mean(0).sum()
    sparsity = torch.tanh(tanh_c * a * norms).sum() / n
    preact = (torch.relu(theta - h) * norms).sum() / n
    return {"total": mse + lam * sparsity + preact_coeff * preact, "mse": mse,
            "sparsity": sparsity, "preact": preact, "h": h.detach(), "theta": theta0}


@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("thresholds", [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (1.0, None)],
                         ids=["dense-mode", "sparse-mode", "sparse-mode-dense-decoders",
                              "sparse-mode-dense-window-decoders"])
def test_fast_and_autograd_paths_equal_an_independent_two_sided_reference(monkeypatch, cross,
                                                                         thresholds):
    """Every JumpReLU path (plain autograd, the fused dense mode, the sparse mode with sparse
    or dense decoder products) gives the values and gradients of ``_reference_loss``,
    including the threshold gradient from positions in the window below theta."""
    monkeypatch.setattr(clt_model, "DENSE_ABOVE", thresholds[0])
    clt = _clt(L=3, d=8, F=24, cross_layer=cross, threshold_init=0.5, bandwidth=0.9)
    x, y = _data()
    clt.set_scales_from(x, y)
    kw = dict(lam=0.7, tanh_c=4.0, preact_coeff=0.3)
    clt.zero_grad()
    ref = _reference_loss(clt, x, y, **kw)
    ref["total"].backward()
    g_ref = {n: p.grad.clone() for n, p in clt.named_parameters()}
    h, theta = ref["h"], ref["theta"]
    active = (h > theta).double().mean((0, 2))                       # per layer
    below = ((h <= theta) & (h > theta - 0.45)).double().mean((0, 2))
    assert active.min() > 0.05 and below.min() > 0.05                # both sides occur
    decoder = thresholds[1]
    if decoder is None:                   # window pairs decoded densely, active ones not
        decoder = float(active.max() + below.min()) / 2
        assert active.max() < decoder < below.min()
    monkeypatch.setattr(clt_model, "DECODER_DENSE_ABOVE", decoder)
    for sparse in (False, True):
        clt.zero_grad()
        out = clt.loss(x, y, kw["lam"], tanh_c=kw["tanh_c"], preact_coeff=kw["preact_coeff"],
                       sparse=sparse)
        out["total"].backward()
        for key in ("total", "mse", "sparsity", "preact"):
            assert torch.allclose(out[key], ref[key], rtol=1e-10, atol=1e-12), (sparse, key)
        assert torch.equal(out["fire_counts"], (h > theta).sum(0))
        for name, p in clt.named_parameters():
            assert torch.allclose(p.grad, g_ref[name], rtol=1e-9, atol=1e-12), (sparse, name)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_mode_is_decided_before_the_pairs_are_listed(monkeypatch, mode):
    """When the fired and window pairs together exceed the budget but might fit at the
    window pairs' cost, the mode is decided from the count of fired pairs: the pair lists
    are built only when the sparse mode will use them, and both modes give the reference."""
    clt = _clt(L=3, d=8, F=24, threshold_init=0.5, bandwidth=0.9)
    x, y = _data()
    clt.set_scales_from(x, y)
    kw = dict(lam=0.7, tanh_c=4.0, preact_coeff=0.3)
    ref = _reference_loss(clt, x, y, **kw)
    h, theta = ref["h"], ref["theta"]
    fired = int((h > theta).sum())
    window = int(((h <= theta) & (h > theta - 0.45)).sum())
    cost = fired + clt_model.WINDOW_PAIR_COST * window
    assert cost < fired + window                          # the undecided zone exists
    # a budget just above (sparse) or below (dense) the cost, in the undecided zone
    budget = cost * (1.02 if mode == "sparse" else 0.98)
    assert clt_model.WINDOW_PAIR_COST * (fired + window) <= budget < fired + window
    monkeypatch.setattr(clt_model, "DENSE_ABOVE", budget / h.numel())
    calls = []
    split = clt_model._split_pairs
    monkeypatch.setattr(clt_model, "_split_pairs", lambda *a: calls.append(1) or split(*a))
    out = clt.loss(x, y, kw["lam"], tanh_c=kw["tanh_c"], preact_coeff=kw["preact_coeff"], sparse=True)
    assert len(calls) == (1 if mode == "sparse" else 0)
    for key in ("total", "mse", "sparsity", "preact"):
        assert torch.allclose(out[key], ref[key], rtol=1e-10, atol=1e-12), key


def test_sparse_path_float32_matches_dense():
    clt = _clt(L=2, d=16, F=256, dtype=torch.float32)
    x, y = _data(n=256, L=2, d=16, dtype=torch.float32)
    clt.set_scales_from(x, y)
    with torch.no_grad():
        clt.b_enc.fill_(-1.0)
    grads = []
    for sparse in (False, True):
        clt.zero_grad()
        clt.loss(x, y, 1.0, sparse=sparse)["total"].backward()
        grads.append([p.grad.clone() for p in clt.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _smoothed_jumprelu(eps):
    """JumpReLU whose step is smoothed by the rectangle kernel: z * ramp((z - theta) / eps)."""
    def fn(z, theta, bandwidth):
        return z * torch.clamp((z - theta) / eps + 0.5, 0.0, 1.0)
    return fn


@pytest.mark.parametrize("sparse", [False, True])
def test_threshold_gradient_matches_finite_difference_of_smoothed_loss(monkeypatch, sparse):
    """The straight-through gradient of log theta against a central finite difference of
    the loss in which the JumpReLU step is replaced by its rectangle-kernel smoothing.

    The construction makes the two equal up to O(eps / theta): theta = 1, eps = 1e-3;
    features 0-3 have pre-activations just below the top of the kernel window
    (h = theta + eps/2 - 1e-7, so they are active and the smoothed step is 1 - 1e-4),
    features 4-5 just above its bottom (h = theta - eps/2 + 1e-7: they do not fire, the
    smoothed step is 1e-4), features 6-7 are far above theta and features 8-9 far below
    (where only the pre-activation term depends on theta). The smoothed loss then has
    d/dtheta = -(h/eps) * dL/da at window positions on both sides, the STE gives
    -(theta/eps) * dL/da."""
    eps, L, d, F = 1e-3, 2, 4, 10
    clt = _clt(L=L, d=d, F=F, bandwidth=eps, threshold_init=1.0)
    x, y = _data(n=32, L=L, d=d)
    y = y + 2.0     # a mean far from the reconstruction: dL/da does not cancel over tokens
    clt.set_scales_from(x, y)
    levels = torch.tensor([1 + eps / 2 - 1e-7] * 4 + [1 - eps / 2 + 1e-7] * 2 + [2.0] * 2 + [0.2] * 2,
                          dtype=torch.float64)
    with torch.no_grad():
        clt.W_enc.mul_(1e-11)                # tiny per-token variation, inside the window
        clt.b_enc.copy_(levels.expand(L, F))
    kw = dict(lambda_sparsity=0.3, tanh_c=4.0, preact_coeff=0.05)
    out = clt.loss(x, y, sparse=sparse, **kw)
    assert out["l0"] == 6.0
    clt.zero_grad()
    out["total"].backward()
    ste = clt.log_threshold.grad.clone()

    monkeypatch.setattr(clt_model, "jumprelu", _smoothed_jumprelu(eps))
    step = 1e-9
    fd = torch.zeros_like(ste)
    with torch.no_grad():
        for l in range(L):
            for f in range(F):
                vals = []
                for sign in (1, -1):
                    clt.log_threshold[l, f] += sign * step
                    vals.append(clt.loss(x, y, sparse=False, **kw)["total"])
                    clt.log_threshold[l, f] -= sign * step
                fd[l, f] = (vals[0] - vals[1]) / (2 * step)
    assert ste[:, :6].abs().min() > 1.0                    # the window term, both sides
    assert ste[:, 6:8].abs().max() == 0                    # far above: no gradient
    assert ste[:, 8:].abs().min() > 0                      # far below: pre-activation term
    assert torch.allclose(ste, fd, rtol=5e-3, atol=1e-6)


def test_topk_keeps_exactly_k_per_token():
    clt = _clt(L=3, d=8, F=24, activation="topk", k=5)
    x, _ = _data()
    acts = clt.encode(x)
    nonzero = (acts != 0).sum(-1)
    assert nonzero.max() <= 5
    # pre-activations are mostly positive here, so exactly k fire
    with torch.no_grad():
        clt.b_enc.fill_(10.0)
    acts = clt.encode(x)
    assert ((acts != 0).sum(-1) == 5).all()
    h = clt.pre_activations(x)
    kth = h.topk(5, dim=-1).values[..., -1:]
    assert torch.equal(acts != 0, h >= kth)


def test_batchtopk_keeps_k_on_average_and_has_an_inference_threshold():
    clt = _clt(L=3, d=8, F=24, activation="batchtopk", k=4)
    x, y = _data(n=50)
    with torch.no_grad():
        clt.b_enc.fill_(10.0)
    clt.train()
    acts = clt.encode(x)
    per_layer = (acts != 0).sum((0, 2))
    assert per_layer.tolist() == [4 * 50] * 3                 # k per token on average
    assert (acts != 0).sum(-1).float().std() > 0              # but not k for every token
    assert (clt.batchtopk_threshold > 0).all()                # the running threshold moved
    clt.eval()
    with torch.no_grad():
        clt.batchtopk_threshold.fill_(10.0)
    h = clt.pre_activations(x)
    assert torch.equal(clt.encode(x) != 0, h > 10.0)
    # TopK modes train on the reconstruction alone
    clt.train()
    out = clt.loss(x, y, 5.0)
    assert torch.equal(out["total"], out["mse"])

"""TopK SAEs trained with SAELens's MultiSAETrainer on the project's own activation stream."""

import math

import numpy as np
import pytest
import torch

from mlclt_utils.models.config import build_model, model_config
from mlclt_utils.sae.train import (SAETrainingConfig, hook_name, load_sae, sae_quality, save_sae,
                                   stream_activations, train_saes)
from mlclt_utils.tokenizer import BOS_ID, PAD_ID

SIZE = {"n_layers": 3, "d_model": 32, "n_heads": 2, "d_mlp": 128}
N_CTX, D_VOCAB = 16, 64
LAYERS = [0, 1, 2]
# lr above the default: 20k tokens are only ~160 steps
CFG = dict(d_sae=128, k=8, train_tokens=20_000, batch_tokens=128, lr=3e-3, model_batch_rows=16)


def make_rows(n, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, D_VOCAB, (n, N_CTX), generator=g)
    rows[:, 0] = BOS_ID
    if pad:
        for i in range(0, n, 5):                     # every fifth row ends in padding
            rows[i, N_CTX - 1 - i % 7:] = PAD_ID
    return rows


def kept_mask_by_hand(rows):
    keep = (rows != BOS_ID) & (rows != PAD_ID)
    keep[:, 0] = False
    return keep


@pytest.fixture(scope="module")
def model():
    return build_model(model_config(SIZE, N_CTX, D_VOCAB, seed=1))


@pytest.fixture(scope="module")
def rows():
    return make_rows(160, seed=2)


@pytest.fixture(scope="module")
def eval_acts(model):
    """Held-out activations per layer, from rows the SAEs never saw."""
    chunks = list(stream_activations(model, make_rows(64, seed=99), LAYERS, batch_rows=16))
    return {l: torch.cat([c[hook_name(l)] for c in chunks]) for l in LAYERS}


@pytest.fixture(scope="module")
def trained(model, rows):
    return train_saes(model, rows, LAYERS, SAETrainingConfig(**CFG), progress=False)


def test_trained_saes_reconstruct_better_than_fresh_ones(trained, eval_acts):
    from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE, TopKTrainingSAEConfig

    assert sorted(trained) == LAYERS
    for layer in LAYERS:
        sae = trained[layer]
        assert isinstance(sae, TopKSAE)
        assert sae.cfg.d_sae == 128 and sae.cfg.k == 8 and sae.cfg.normalize_activations == "none"
        assert sae.cfg.metadata.hook_name == hook_name(layer)
        torch.manual_seed(layer)
        fresh = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=SIZE["d_model"], d_sae=128, k=8,
                                                      normalize_activations="none"))
        acts = eval_acts[layer]
        q, q0 = sae_quality(sae, acts), sae_quality(fresh, acts)
        assert q["n_tokens"] == acts.shape[0]
        assert q["fvu"] < 0.5, q                      # measured ~0.18
        assert q["fvu"] < 0.5 * q0["fvu"], (q, q0)    # fresh ones: FVU > 1
        assert q["l0"] == 8
        z = sae.encode(acts)
        assert ((z != 0).sum(-1) == 8).all()          # TopK: exactly k active on every token
        assert 0 <= q["dead_share"] < 1


def test_save_load_round_trip(trained, eval_acts, tmp_path):
    from sae_lens import SAE

    for layer in LAYERS:
        sae, path = trained[layer], tmp_path / f"layer_{layer}"
        save_sae(sae, path)
        assert (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists()
        back = SAE.load_from_disk(path)
        assert type(back) is type(sae)
        assert back.cfg.d_sae == sae.cfg.d_sae and back.cfg.k == sae.cfg.k
        acts = eval_acts[layer]
        with torch.no_grad():
            assert torch.equal(back.encode(acts), sae.encode(acts))
            assert torch.equal(load_sae(path).encode(acts), sae.encode(acts))


def test_training_sae_saves_as_inference_model(model, rows, eval_acts, tmp_path):
    cfg = SAETrainingConfig(**{**CFG, "train_tokens": 2_000})
    saes = train_saes(model, rows, [1], cfg, progress=False, return_training=True)
    sae = saes[1]
    save_sae(sae, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    acts = eval_acts[1]
    with torch.no_grad():
        assert torch.allclose(back.encode(acts), sae.encode(acts), atol=1e-5)
        assert torch.allclose(back(acts), sae(acts), atol=1e-5)


def test_normalised_saes_see_every_token_at_one_norm(model, rows, eval_acts, tmp_path):
    """``constant_norm_rescale``: the trained SAE rescales raw input itself, so a token's
    latents do not depend on its norm, its reconstruction scales with it, the stitched
    output of every latent is the SAE's reconstruction, and the setting survives a reload."""
    from mlclt_utils.sae.stitch import latent_output
    from mlclt_utils.sae.train import normalise

    cfg = SAETrainingConfig(**{**CFG, "normalize_activations": "constant_norm_rescale"})
    sae = train_saes(model, rows, [1], cfg, progress=False)[1]
    assert sae.cfg.normalize_activations == "constant_norm_rescale"
    acts = eval_acts[1]
    with torch.no_grad():
        z = sae.encode(acts)
        torch.testing.assert_close(sae.encode(3.0 * acts), z)
        recon = sae.decode(sae.encode(acts))
        torch.testing.assert_close(sae.decode(sae.encode(3.0 * acts)), 3.0 * recon)
        torch.testing.assert_close(latent_output(sae, acts, range(cfg.d_sae), bias=True), recon)
        # its decoder bias started at the mean of rescaled vectors: inside the sqrt(d) ball
        assert float(sae.b_dec.norm()) <= SIZE["d_model"] ** 0.5 * 1.01
        assert normalise(acts).norm(dim=-1).sub(SIZE["d_model"] ** 0.5).abs().max() < 1e-3
    q = sae_quality(sae, acts)
    assert q["fvu"] < 0.5, q
    save_sae(sae, tmp_path / "n")
    back = load_sae(tmp_path / "n")
    assert back.cfg.normalize_activations == "constant_norm_rescale"
    with torch.no_grad():
        assert torch.equal(back.encode(acts), z)
    with pytest.raises(ValueError, match="normalize_activations"):
        SAETrainingConfig(**{**CFG, "normalize_activations": "layer_norm"})


def test_stream_leaves_out_bos_and_pad(model, rows):
    keep = kept_mask_by_hand(rows)
    assert (rows == PAD_ID).any() and keep.sum() < rows.numel() - rows.shape[0]
    chunks = list(stream_activations(model, rows, LAYERS, batch_rows=16))
    _, cache = model.run_with_cache(rows)
    for layer in LAYERS:
        got = torch.cat([c[hook_name(layer)] for c in chunks])
        assert got.shape == (int(keep.sum()), SIZE["d_model"])
        assert torch.allclose(got, cache[hook_name(layer)][keep], atol=1e-5)


def test_model_runs_once_per_batch_for_all_layers(model):
    calls = {"embed": 0, **{hook_name(l): 0 for l in LAYERS}}

    def counter(key):
        def hook(x, hook):
            calls[key] += 1
        return hook

    hooks = [("hook_embed", counter("embed"))] + [(hook_name(l), counter(hook_name(l))) for l in LAYERS]
    rows = make_rows(112, seed=3, pad=False)          # every forward: 16 x 15 kept tokens
    with model.hooks(fwd_hooks=hooks):
        chunks = list(stream_activations(model, rows, LAYERS, batch_rows=16))
    assert len(chunks) == calls["embed"] == 112 // 16
    assert all(set(c) == {hook_name(l) for l in LAYERS} for c in chunks)

    for key in calls:
        calls[key] = 0
    cfg = SAETrainingConfig(**CFG, init_tokens=0)     # (the decoder-bias start reads one more batch)
    with model.hooks(fwd_hooks=hooks):
        train_saes(model, rows, LAYERS, cfg, progress=False)
    assert all(calls[hook_name(l)] == calls["embed"] for l in LAYERS)
    per_forward = 16 * (N_CTX - 1)
    served = math.ceil(cfg.train_tokens / cfg.batch_tokens) * cfg.batch_tokens
    buffer = max(4 * cfg.batch_tokens, 2 * 16 * N_CTX)
    lower = math.ceil(served / per_forward)
    upper = math.ceil((served + buffer + per_forward) / per_forward)
    assert lower <= calls["embed"] <= upper < 2 * lower   # one forward per batch, not one per layer


def test_training_is_seeded(model, rows):
    cfg = SAETrainingConfig(**{**CFG, "train_tokens": 3_000})
    state = torch.random.get_rng_state()
    a = train_saes(model, rows, [0, 2], cfg, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)   # global RNG left alone
    b = train_saes(model, rows, [0, 2], cfg, progress=False)
    c = train_saes(model, rows, [0, 2], SAETrainingConfig(**{**CFG, "train_tokens": 3_000, "seed": 1}),
                   progress=False)
    for layer in (0, 2):
        assert torch.equal(a[layer].W_enc, b[layer].W_enc)
        assert torch.equal(a[layer].W_dec, b[layer].W_dec)
        assert not torch.equal(a[layer].W_enc, c[layer].W_enc)


def test_rows_are_cycled_when_tokens_exceed_them(model):
    rows = make_rows(8, seed=4, pad=False)            # 120 kept tokens, trained on 1000
    saes = train_saes(model, rows, [0], SAETrainingConfig(**{**CFG, "train_tokens": 1_000}),
                      progress=False)
    assert torch.isfinite(saes[0].W_enc).all()


def test_sae_quality_matches_numpy(trained):
    sae = trained[1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, SIZE["d_model"], generator=g) * 2 + 1
    q = sae_quality(sae, x, batch_size=7)

    # independent reference: the inference TopK SAE written out in numpy
    X = x.double().numpy()
    W_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    W_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    norms = np.linalg.norm(W_dec, axis=1) if sae.cfg.rescale_acts_by_decoder_norm else np.ones(len(W_dec))
    pre = ((X - b_dec) @ W_enc + b_enc) * norms
    top = np.argsort(-pre, axis=1)[:, :sae.cfg.k]
    Z = np.zeros_like(pre)
    np.put_along_axis(Z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    X_hat = (Z / norms) @ W_dec + b_dec
    fvu = ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()

    assert q["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert q["l0"] == pytest.approx((Z != 0).sum(1).mean())
    assert q["dead_share"] == pytest.approx((~(Z != 0).any(0)).mean())
    assert q["n_tokens"] == 37
    # FVU uses the variance about the mean, not the raw second moment
    assert q["fvu"] != pytest.approx(((X - X_hat) ** 2).sum() / (X ** 2).sum(), rel=1e-3)


def test_progress_bar_and_dead_window(model, rows, capfd):
    small = {**CFG, "train_tokens": 1_000}
    train_saes(model, rows, [0], SAETrainingConfig(**small), progress=True)
    assert "Training Multi-SAE" in capfd.readouterr().err
    quiet = train_saes(model, rows, [0], SAETrainingConfig(**small), progress=False)
    assert "Training Multi-SAE" not in capfd.readouterr().err
    # SAELens's own dead-latent count, saved in the metadata: none with its default window
    # (1000 steps) after 8 steps, many with a window of 128 tokens (one step)
    assert quiet[0].cfg.metadata.num_dead_features == 0
    short = train_saes(model, rows, [0], SAETrainingConfig(**small, dead_window_tokens=128), progress=False)
    assert short[0].cfg.metadata.num_dead_features > 0


def test_decoder_bias_starts_at_the_mean_activation(model, rows):
    """With no training step the SAE is its initial state: its decoder bias is the mean of
    the first init_tokens kept activations, computed here independently."""
    cfg = SAETrainingConfig(**{**CFG, "train_tokens": 1, "batch_tokens": 1, "lr": 1e-12, "init_tokens": 100})
    sae = train_saes(model, rows, [1], cfg, progress=False, return_training=True)[1]
    _, cache = model.run_with_cache(rows[:16])
    keep = kept_mask_by_hand(rows[:16])
    want = cache[hook_name(1)][keep][:100].mean(0)
    torch.testing.assert_close(sae.b_dec.detach(), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="init_tokens"):
        SAETrainingConfig(d_sae=8, k=2, init_tokens=-1)

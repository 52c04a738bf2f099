"""Logit lift through the final LayerNorm and W_U, on tiny random models and CLTs."""

import numpy as np
import pandas as pd
import pytest
import torch

from mlclt_utils.features.lift import clt_decoder_directions, logit_lift

from test_clt_formats import D, F, L, V, tiny_clt

# A wide model, so that random unembedding columns are nearly orthogonal: a token's own
# column then stands far above the chance overlap with the other columns of its language.
DM = 512

# ids 0-4 special, then 10 tokens each of en, fr and de, the rest shared
LABELS = (["special"] * 5 + ["en"] * 10 + ["fr"] * 10 + ["de"] * 10
          + ["shared"] * (V - 35))


def lift_model(normalization="LN", seed=0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=DM, n_heads=4, d_head=DM // 4, d_mlp=32,
                                  n_ctx=8, d_vocab=V, act_fn="gelu_new",
                                  normalization_type=normalization, seed=seed, device="cpu")
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ln = getattr(model, "ln_final", None)
        if hasattr(ln, "w"):                          # a non-trivial final gain and bias
            ln.w.copy_(1 + 0.5 * torch.rand(DM, generator=g))
        if hasattr(ln, "b"):
            ln.b.copy_(0.3 * torch.randn(DM, generator=g))
        model.unembed.W_U.copy_(torch.randn(DM, V, generator=g))
    return model.eval()


def reference_lift(u, model, labels, centre):
    """Through the model's own final-norm module: ln_final(u) minus its bias, times the
    scale it divided by, is the linear part of the norm; then W_U and a pandas group-by."""
    ln = model.ln_final
    with torch.no_grad():
        x = u - u.mean() if centre else u
        scale = (x.pow(2).mean() + ln.eps).sqrt()
        lin = (ln(u[None, None])[0, 0] - getattr(ln, "b", 0)) * scale
        logits = (lin @ model.unembed.W_U).double().numpy()
    s = pd.Series(logits, index=labels)
    s = s[s.index != "special"]
    return pd.Series({lang: s[lang].mean() - s[s.index != lang].mean() for lang in ("en", "fr", "de")})


@pytest.mark.parametrize("normalization, centre", [("LN", True), ("RMS", False)])
def test_lift_matches_the_models_own_final_norm(normalization, centre):
    model = lift_model(normalization)
    u = torch.randn(DM, generator=torch.Generator().manual_seed(5))
    got = logit_lift(u, model, LABELS, ["en", "fr", "de"])
    pd.testing.assert_series_equal(got, reference_lift(u, model, LABELS, centre), check_names=False,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalization", ["LN", "RMS", "LNPre", None])
@pytest.mark.parametrize("token", [7, 18, 31])
def test_the_unembedding_of_a_token_lifts_its_language_most(normalization, token):
    model = lift_model(normalization)
    w = getattr(getattr(model, "ln_final", None), "w", torch.ones(DM))
    u = model.unembed.W_U[:, token].detach() / w.detach()     # undo the final gain
    lift = logit_lift(u, model, LABELS, ["en", "fr", "de"])
    assert lift.idxmax() == LABELS[token]
    assert lift[LABELS[token]] > 0


def test_several_directions_and_token_languages_object():
    from mlclt_utils.features.language import TokenLanguages

    model = lift_model()
    counts = np.zeros((3, V), dtype=np.int64)
    for i in range(5, 35):
        counts[(i - 5) // 10, i] = 10                       # the same labels as LABELS
    counts[:, 35:] = 10
    tl = TokenLanguages(["en", "fr", "de"], counts, min_count=1)
    assert tl.labels() == LABELS
    u = model.unembed.W_U[:, [6, 16, 26]].T.detach() / model.ln_final.w.detach()
    df = logit_lift(u, model, tl)
    assert list(df.columns) == ["en", "fr", "de"] and len(df) == 3
    assert df.idxmax(axis=1).tolist() == ["en", "fr", "de"]
    single = logit_lift(u[1], model, tl)
    np.testing.assert_allclose(single.to_numpy(), df.iloc[1].to_numpy(), rtol=1e-5)


def test_lift_refuses_bad_input():
    model = lift_model()
    u = torch.randn(DM)
    with pytest.raises(ValueError, match=f"{V - 1} labels but the model's vocabulary has {V}"):
        logit_lift(u, model, LABELS[:-1], ["en"])
    with pytest.raises(ValueError, match=f"d_model = {DM}, got shape \\(3,\\)"):
        logit_lift(torch.randn(3), model, LABELS, ["en"])
    with pytest.raises(ValueError, match=r"no vocabulary id is labelled \['ar'\]"):
        logit_lift(u, model, LABELS, ["en", "ar"])
    with pytest.raises(ValueError, match="unknown language code 'english'"):
        logit_lift(u, model, LABELS, ["english"])


# ------------------------------------------------------------------ CLT decoders -------

@pytest.mark.parametrize("cross_layer", [True, False])
def test_decoder_directions_equal_the_decode_of_a_unit_activation(cross_layer):
    clt = tiny_clt(cross_layer)
    layer, features = 1, [0, 5, F - 1]
    got = clt_decoder_directions(clt, layer, features)
    assert got.shape == (3, D)
    with torch.no_grad():
        acts = torch.zeros(3, L, F)
        acts[torch.arange(3), layer, torch.tensor(features)] = 1.0
        # the CLT's own decoder, in raw units, bias removed, summed over target layers
        reference = (clt.decode(acts) - clt.decode(torch.zeros_like(acts))).sum(1)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_decoder_directions_refuse_bad_input():
    clt = tiny_clt()
    with pytest.raises(ValueError, match=f"layer is {L}; the CLT has layers 0..{L - 1}"):
        clt_decoder_directions(clt, L, [0])
    with pytest.raises(ValueError, match=f"feature {F} is outside"):
        clt_decoder_directions(clt, 0, [1, F])


def test_promoted_tokens_are_the_top_direct_logits_of_the_decoders_write():
    """The graph figure's feature labels: the tokens with the largest direct logits of the
    feature's total write (computed here through the CLT's own decode), specials skipped."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from mlclt_utils.graphs.attribution import promoted_tokens

    clt = tiny_clt()
    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=D, n_heads=1, d_head=D, d_mlp=8, n_ctx=8,
                                                      d_vocab=V, act_fn="relu", normalization_type=None, seed=3))

    class Words:
        def decode(self, ids):
            return "<bos>" if ids[0] == 3 else f" w{ids[0]}"

    keys = [(1, 0), (1, 5), (0, 2)]
    got = promoted_tokens(clt, model, Words(), keys, k=2)
    assert set(got) == set(keys)
    for layer, f in keys:
        with torch.no_grad():
            acts = torch.zeros(1, L, F)
            acts[0, layer, f] = 1.0
            write = (clt.decode(acts) - clt.decode(torch.zeros_like(acts))).sum(1)[0]
            order = [t for t in (write @ model.W_U).argsort(descending=True).tolist() if t != 3][:2]
        assert got[(layer, f)] == "↑ " + ", ".join(f"w{t}" for t in order)

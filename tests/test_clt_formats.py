"""CLT file formats and the circuit-tracer export, on a tiny random model and CLT."""

import pytest
import torch

from mlclt_utils.clt.formats import (load_clt, load_featflow_clt, save_clt, save_featflow_clt,
                                     triangle_pairs)
from mlclt_utils.graphs.circuit_tracer import build_replacement_model, to_circuit_tracer
from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder

L, D, F, V, CTX = 3, 16, 24, 40, 10
BOS = 3


def tiny_model(seed=0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=L, d_model=D, n_heads=2, d_head=D // 2, d_mlp=32,
                                  n_ctx=CTX, d_vocab=V, act_fn="gelu_new", normalization_type="LN",
                                  seed=seed, device="cpu")
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial LayerNorm gains and biases
        for block in model.blocks:
            for ln in (block.ln1, block.ln2):
                ln.w.copy_(1 + 0.3 * torch.randn(D, generator=g))
                ln.b.copy_(0.1 * torch.randn(D, generator=g))
    return model.eval()


def tiny_clt(cross_layer=True, activation="jumprelu", seed=0):
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=D, d_features=F, activation=activation,
                                         cross_layer=cross_layer, k=4), generator=g)
    with torch.no_grad():
        clt.b_enc.copy_(0.1 * torch.randn(L, F, generator=g))
        clt.b_dec.copy_(0.1 * torch.randn(L, D, generator=g))
        clt.log_threshold.copy_(torch.log(0.05 + 0.3 * torch.rand(L, F, generator=g)))
        clt.input_scale.copy_(0.5 + torch.rand(L, generator=g))
        clt.output_scale.copy_(0.5 + torch.rand(L, generator=g))
        clt.batchtopk_threshold.copy_(0.2 + 0.1 * torch.rand(L, generator=g))
    return clt.eval()


def random_inputs(n=20, seed=1):
    return torch.randn(n, L, D, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("cross_layer", [True, False])
def test_project_format_round_trip_is_bit_exact(tmp_path, cross_layer):
    clt = tiny_clt(cross_layer)
    save_clt(clt, tmp_path / "c")
    back = load_clt(tmp_path / "c")
    assert back.cfg == clt.cfg
    for (k, a), (k2, b) in zip(clt.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = random_inputs()
    r1, a1 = clt(x)
    r2, a2 = back(x)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)


@pytest.mark.parametrize("cross_layer", [True, False])
def test_featflow_round_trip(tmp_path, cross_layer):
    clt = tiny_clt(cross_layer)
    save_featflow_clt(clt, tmp_path / "ff")
    back = load_featflow_clt(tmp_path / "ff")
    assert back.cfg.cross_layer == cross_layer
    x = random_inputs()
    r1, a1 = clt(x)
    r2, a2 = back(x)
    torch.testing.assert_close(a2, a1, rtol=0, atol=1e-6)
    torch.testing.assert_close(r2, r1, rtol=0, atol=1e-6)


def test_featflow_layout_order_and_block_biases(tmp_path):
    """A hand-made checkpoint: block i of W_dec holds the number 10*l + k of its pair
    (l, k), and b_dec one bias per block, summed per target by the loader."""
    from safetensors.torch import save_file

    pairs = triangle_pairs(L)
    assert pairs[:L] == [(0, k) for k in range(L)] and pairs[-1] == (L - 1, L - 1)
    W_dec = torch.stack([torch.full((F, D), float(10 * l + k)) for l, k in pairs])
    b_dec = torch.randn(len(pairs), D)
    save_file({"W_enc": torch.randn(L, D, F), "b_enc": torch.zeros(L, F), "W_dec": W_dec,
               "b_dec": b_dec, "log_threshold": torch.zeros(L, F),
               "estimated_norm_scaling_factor_in": torch.ones(L),
               "estimated_norm_scaling_factor_out": torch.ones(L),
               "feature_count": torch.zeros(L, F, dtype=torch.long)},
              str(tmp_path / "clt_weights.safetensors"))
    (tmp_path / "clt_cfg.json").write_text('{"d_in": %d, "d_latent": %d}' % (D, F))
    clt = load_featflow_clt(tmp_path)
    for l in range(L):
        for j, k in enumerate(clt.target_layers(l)):
            assert torch.all(clt.W_dec[l][:, j, :] == 10 * l + k)
    for k in range(L):
        expected = sum(b_dec[i] for i, (_, t) in enumerate(pairs) if t == k)
        torch.testing.assert_close(clt.b_dec[k], expected)


def test_featflow_ln_affine_is_folded_into_the_encoder(tmp_path):
    """featflow CLTs read ln2's output after gain and bias; folded, ours read before them."""
    model = tiny_model()
    save_featflow_clt(tiny_clt(), tmp_path)
    plain = load_featflow_clt(tmp_path)
    folded = load_featflow_clt(tmp_path, model=model)
    x_norm = random_inputs()
    w = torch.stack([b.ln2.w.detach() for b in model.blocks])
    b = torch.stack([b.ln2.b.detach() for b in model.blocks])
    torch.testing.assert_close(folded.pre_activations(x_norm), plain.pre_activations(x_norm * w + b),
                               rtol=1e-5, atol=1e-5)


def _folded_models():
    """Two models whose ln2 has no gain or bias: one processed as
    ``HookedTransformer.from_pretrained`` does by default, one built with LNPre."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    processed = tiny_model()
    processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    cfg = HookedTransformerConfig(n_layers=L, d_model=D, n_heads=2, d_head=D // 2, d_mlp=32,
                                  n_ctx=CTX, d_vocab=V, act_fn="gelu_new",
                                  normalization_type="LNPre", seed=0, device="cpu")
    return {"processed": processed, "lnpre": HookedTransformer(cfg).eval()}


@pytest.mark.parametrize("convention", ["ln2", "resid_mid"])
@pytest.mark.parametrize("which", ["processed", "lnpre"])
def test_featflow_loader_refuses_models_with_folded_layer_norms(tmp_path, convention, which):
    model = _folded_models()[which]
    assert type(model.blocks[0].ln2).__name__ == "LayerNormPre"
    save_featflow_clt(tiny_clt(), tmp_path)
    with pytest.raises(ValueError, match="from_pretrained_no_processing"):
        load_featflow_clt(tmp_path, model=model, input_convention=convention)
    # hook_normalized is the same with or without folding: that convention loads
    clt = load_featflow_clt(tmp_path, model=model, input_convention="ln2_normalized")
    assert clt.cfg.input_hook == "ln2.hook_normalized"
    with pytest.raises(ValueError, match="input_convention"):
        load_featflow_clt(tmp_path, model=model, input_convention="ln1")


def _linear_mlp_featflow_clt(model, folder, s_in=0.7, s_out=1.3):
    """A featflow-layout per-layer CLT, reading ln2's output after gain and bias, that
    reproduces the MLPs of ``model`` once they are made linear (2d features per layer:
    +/- each input direction, decoders the MLP's linear map)."""
    from safetensors.torch import save_file

    eye = torch.eye(D)
    W_enc, W_dec, b_dec = [], [], []
    for block in model.blocks:
        block.mlp.act_fn = lambda t: t
        mlp = block.mlp
        M = (mlp.W_in @ mlp.W_out).detach()
        c = (mlp.b_in @ mlp.W_out + mlp.b_out).detach()
        W_enc.append(torch.cat([eye, -eye], dim=1))
        W_dec.append(torch.cat([M, -M]) * s_out / s_in)
        b_dec.append(c * s_out)
    save_file({"W_enc": torch.stack(W_enc), "b_enc": torch.zeros(L, 2 * D),
               "W_dec": torch.stack(W_dec), "b_dec": torch.stack(b_dec),
               "log_threshold": torch.full((L, 2 * D), -30.0),
               "estimated_norm_scaling_factor_in": torch.full((L,), s_in),
               "estimated_norm_scaling_factor_out": torch.full((L,), s_out)},
              str(folder / "clt_weights.safetensors"))
    (folder / "clt_cfg.json").write_text('{"cross_layer_decoders": false}')


def test_featflow_loader_checks_fidelity_and_warns_on_a_wrong_input_convention(tmp_path):
    import warnings

    model = tiny_model()
    _linear_mlp_featflow_clt(model, tmp_path)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, V, (12, CTX), generator=g)
    tokens[:, 0] = BOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the right convention: no warning
        right = load_featflow_clt(tmp_path, model=model, input_convention="ln2",
                                  check_tokens=tokens, check_batches=2, check_batch_size=4)
    assert max(right.fidelity["fvu"]) < 1e-6 and right.fidelity["n_tokens"] == 8 * (CTX - 1)
    with pytest.warns(UserWarning, match="input_convention='resid_mid'"):
        wrong = load_featflow_clt(tmp_path, model=model, input_convention="resid_mid",
                                  check_tokens=tokens)
    assert wrong.cfg.input_hook == "hook_resid_mid" and max(wrong.fidelity["fvu"]) > 0.5
    with pytest.raises(ValueError, match="check_tokens needs the model"):
        load_featflow_clt(tmp_path, check_tokens=tokens)


def _dense_ct_reconstruction(ct, acts):
    """Reconstruction [P, L, d] from circuit-tracer's CLT weights, summed densely."""
    out = ct.b_dec.expand(acts.shape[0], L, D).clone()
    for l in range(L):
        contrib = torch.einsum("pf,ftd->ptd", acts[:, l], ct.W_dec[l])
        out[:, l:] += contrib
    return out


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_circuit_tracer_export_matches_the_module(activation):
    clt = tiny_clt(activation=activation)
    ct = to_circuit_tracer(clt)
    assert ct.feature_input_hook == "ln2.hook_normalized" and ct.feature_output_hook == "hook_mlp_out"
    x = random_inputs()
    recon, acts = clt(x)
    ct_acts = ct.encode(x.transpose(0, 1)).transpose(0, 1)          # circuit-tracer: [L, P, F]
    torch.testing.assert_close(ct_acts, acts, rtol=1e-5, atol=1e-5)
    assert torch.equal(ct_acts > 0, acts > 0)
    torch.testing.assert_close(_dense_ct_reconstruction(ct, ct_acts), recon, rtol=1e-5, atol=1e-5)
    # and circuit-tracer's own sparse path (the one its attribution uses)
    assert (acts[-1] > 0).any()
    comp = ct.compute_attribution_components(x.transpose(0, 1), zero_positions=slice(0, 0))
    torch.testing.assert_close(comp["reconstruction"].transpose(0, 1), recon, rtol=1e-5, atol=1e-5)


def test_circuit_tracer_export_of_a_per_layer_transcoder():
    clt = tiny_clt(cross_layer=False)
    ts = to_circuit_tracer(clt)
    x = random_inputs()
    recon, acts = clt(x)
    ct_acts = ts.encode(x.transpose(0, 1))
    torch.testing.assert_close(ct_acts.transpose(0, 1), acts, rtol=1e-5, atol=1e-5)
    ct_recon = torch.stack([ts[l].decode(ct_acts[l]) for l in range(L)], dim=1)
    torch.testing.assert_close(ct_recon, recon, rtol=1e-5, atol=1e-5)


def test_topk_cannot_be_exported():
    with pytest.raises(ValueError, match="TopK"):
        to_circuit_tracer(tiny_clt(activation="topk"))


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary, BOS id 3 (circuit-tracer needs BOS != 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<bos>": BOS}
    vocab.update({f"w{i}": i for i in range(4, V)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_replacement_model_matches_the_project_model_and_attributes():
    """circuit-tracer's ReplacementModel built offline from our model + exported CLT: same
    logits, same features, error nodes = true MLP output - our reconstruction; and a full
    attribution graph runs (a few hundredths of a second at this size)."""
    from circuit_tracer import attribute

    model, clt = tiny_model(), tiny_clt()
    rm = build_replacement_model(model, clt, tokenizer=tiny_tokenizer())
    try:
        tokens = torch.tensor([BOS, 5, 9, 7, 11, 30, 6, 8])
        with torch.no_grad():
            torch.testing.assert_close(rm(tokens[None]), model(tokens[None]), rtol=0, atol=1e-6)
            names = [f"blocks.{l}.{n}" for l in range(L) for n in ("ln2.hook_normalized", "hook_mlp_out")]
            _, cache = model.run_with_cache(tokens[None], names_filter=names)
        x = torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"][0] for l in range(L)], dim=1)
        y = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(L)], dim=1)
        recon, acts = clt(x)
        acts[0] = 0                                        # circuit-tracer drops position 0
        _, ct_acts = rm.get_activations(tokens)
        torch.testing.assert_close(ct_acts.transpose(0, 1), acts, rtol=1e-5, atol=1e-5)
        ctx = rm.setup_attribution(tokens)
        err = (y - recon).transpose(0, 1)
        err[:, 0] = 0
        torch.testing.assert_close(ctx.error_vectors, err, rtol=1e-4, atol=1e-5)

        graph = attribute(tokens, rm, max_n_logits=3, batch_size=32)
        n_feat = int((acts > 0).sum())
        assert graph.active_features.shape == (n_feat, 3)
        assert graph.adjacency_matrix.shape[0] == n_feat + (L + 1) * len(tokens) + len(graph.logit_targets)
        assert torch.isfinite(graph.adjacency_matrix).all()
    finally:
        rm.reset_hooks(including_permanent=True)
        del rm

"""CLT evaluation: known answers on constructed data and on a tiny random model."""

import math

import pytest
import torch

from mlclt_utils.clt import evaluate as ev
from mlclt_utils.features.examples import _decode, top_activating_examples

from test_clt_formats import BOS, CTX, D, F, L, V, tiny_clt, tiny_model


def eval_tokens(rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(4, V, (rows, CTX), generator=g)
    t[:, 0] = BOS
    return t


# ------------------------------------------------------------ known answers on tensors ---

def test_fvu_is_zero_for_a_perfect_and_one_for_the_mean_prediction():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, L, D, generator=g) * 3 + 1
    acts = torch.zeros(50, L, F)
    perfect = ev.ReconstructionStats(L, D, F)
    perfect.update(y, y, acts)
    mean = ev.ReconstructionStats(L, D, F)
    for chunk in y.split(7):                       # streamed in uneven batches
        mean.update(chunk, y.mean(0).expand_as(chunk), acts[:len(chunk)])
    assert perfect.frame()["fvu"].abs().max() < 1e-12
    assert mean.frame()["fvu"].sub(1).abs().max() < 1e-9


def test_l0_and_dead_features_on_constructed_activations():
    acts = torch.zeros(4, L, F)
    acts[:, 0, 0] = 1.0        # layer 0: feature 0 on every token, feature 5 on one token
    acts[2, 0, 5] = 0.5
    acts[:, 1, :3] = 2.0       # layer 1: features 0..2 on every token; layer 2: nothing fires
    stats = ev.ReconstructionStats(L, D, F)
    y = torch.randn(4, L, D)
    stats.update(y[:2], y[:2], acts[:2])
    stats.update(y[2:], y[2:], acts[2:])
    df = stats.frame()
    assert df["l0"].tolist() == [1.25, 3.0, 0.0]
    assert df["n_dead"].tolist() == [F - 2, F - 3, F]
    assert df["dead_fraction"].tolist() == pytest.approx([(F - 2) / F, (F - 3) / F, 1.0])
    assert df["n_tokens"].tolist() == [4, 4, 4]


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "batchtopk"])
def test_encode_layer_matches_the_module(activation):
    clt = tiny_clt(activation=activation)
    x = torch.randn(2, 5, L, D)
    acts = clt.encode(x)
    for l in range(L):
        torch.testing.assert_close(ev.encode_layer(clt, x[..., l, :], l), acts[..., l, :],
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ replacement model ---------

def test_error_terms_reproduce_the_original_logits():
    model, clt = tiny_model(), tiny_clt()
    tokens = eval_tokens()
    with torch.no_grad():
        original = model(tokens)
    with_error = ev.replacement_logits(model, clt, tokens, add_error=True)
    without = ev.replacement_logits(model, clt, tokens)
    torch.testing.assert_close(with_error, original, rtol=0, atol=1e-5)
    assert (without - original).abs().max() > 1e-2          # the CLT alone is not exact


@pytest.mark.parametrize("cross_layer", [True, False])
def test_replacement_forward_is_the_clt_applied_to_its_own_inputs(cross_layer):
    """Inside the replacement forward, every MLP output equals the module's decode of the
    module's encode of the MLP inputs of that same forward (non-BOS positions)."""
    model, clt = tiny_model(), tiny_clt(cross_layer)
    tokens = eval_tokens(3)
    names = [f"blocks.{l}.{n}" for l in range(L) for n in ("ln2.hook_normalized", "hook_mlp_out")]
    cache = {}

    def save(t, hook):
        cache[hook.name] = t.detach().clone()

    keep = ev.bos_mask(tokens, BOS)
    hooks = ev._replacement_hooks(model, clt, keep, "replace")
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks + [(n, save) for n in names])
    x = torch.stack([cache[f"blocks.{l}.ln2.hook_normalized"] for l in range(L)], dim=2)
    out = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)], dim=2)
    recon, _ = clt(x)
    torch.testing.assert_close(out[:, 1:], recon[:, 1:], rtol=1e-5, atol=1e-5)
    # BOS positions keep the model's own MLP output
    with torch.no_grad():
        _, orig = model.run_with_cache(tokens[:, :1], names_filter=names)
    torch.testing.assert_close(out[:, 0], torch.stack(
        [orig[f"blocks.{l}.hook_mlp_out"][:, 0] for l in range(L)], dim=1))


def test_ce_recovered_is_one_with_error_terms_and_zero_for_zero_ablation():
    model = tiny_model()
    sets = {"en": eval_tokens(4, seed=1), "fr": eval_tokens(3, seed=2)}
    exact = ev.replacement_metrics(model, tiny_clt(), sets, batch_size=3, add_error=True)
    assert exact["language"].tolist() == ["en", "fr", "all"]
    assert exact["n_tokens"].tolist() == [4 * (CTX - 2), 3 * (CTX - 2), 7 * (CTX - 2)]
    assert exact["ce_recovered"].sub(1).abs().max() < 1e-4
    assert exact["kl"].abs().max() < 1e-5
    assert exact["top1_agreement"].min() == 1.0
    assert (exact["ce_replacement"] - exact["ce_original"]).abs().max() < 1e-5

    silent = tiny_clt()                      # reconstructs 0 everywhere: a zero ablation
    with torch.no_grad():
        for W in silent.W_dec:
            W.zero_()
        silent.b_dec.zero_()
    zero = ev.replacement_metrics(model, silent, sets)
    assert zero["ce_recovered"].abs().max() < 1e-6
    assert (zero["ce_zero_ablation"] - zero["ce_original"]).abs().min() > 1e-3
    row = zero.iloc[0]
    assert row["kl"] > 0 and row["ce_replacement"] == pytest.approx(row["ce_zero_ablation"])


def test_zero_ablation_removes_every_non_bos_mlp_output_and_keeps_the_same_bos_outputs():
    """The zero-ablation baseline: every layer's MLP output is 0 at every non-BOS position,
    and the BOS outputs are kept, exactly where the replacement keeps them."""
    model = tiny_model()
    tokens = eval_tokens(3)
    tokens[1, 4] = BOS                                        # a BOS inside a row too
    keep = ev.bos_mask(tokens, BOS)
    seen = {}

    def record(y, hook):
        seen[hook.name] = y.detach().clone()

    names = [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    zero = ev.zero_ablation_logits(model, tokens, bos_id=BOS)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    # the same ablation written out, recording the outputs the forward actually used
    hooks = [(n, lambda y, hook: torch.where(keep[..., None], y, torch.zeros_like(y))) for n in names]
    with torch.no_grad():
        manual = model.run_with_hooks(tokens, fwd_hooks=hooks + [(n, record) for n in names])
    torch.testing.assert_close(zero, manual, rtol=0, atol=0)
    for n in names:
        assert seen[n][~keep].abs().max() == 0                # removed everywhere else
    # at BOS positions the outputs are the model's own (position 0 sees no other token)
    torch.testing.assert_close(seen[names[0]][:, 0], cache[names[0]][:, 0])
    # a CLT that reconstructs 0 turns the replacement into exactly this ablation
    silent = tiny_clt()
    with torch.no_grad():
        for W in silent.W_dec:
            W.zero_()
        silent.b_dec.zero_()
    torch.testing.assert_close(ev.replacement_logits(model, silent, tokens, bos_id=BOS), zero,
                               rtol=0, atol=1e-6)
    # removing the BOS outputs as well would be a different (harsher) baseline
    with torch.no_grad():
        harsher = model.run_with_hooks(tokens, fwd_hooks=[(n, lambda y, hook: torch.zeros_like(y))
                                                          for n in names])
    assert (harsher - zero).abs().max() > 1e-3


def test_pooled_rows_cover_only_the_chosen_languages():
    model, clt = tiny_model(), tiny_clt()
    sets = {"en": eval_tokens(3, seed=1), "fr": eval_tokens(2, seed=2), "de": eval_tokens(2, seed=3)}
    every = ev.replacement_metrics(model, clt, sets, batch_size=2)
    seen = ev.replacement_metrics(model, clt, sets, batch_size=2, pooled_languages=["fr", "de"])
    alone = ev.replacement_metrics(model, clt, {k: sets[k] for k in ("fr", "de")}, batch_size=2)
    assert seen["language"].tolist() == ["en", "fr", "de", "all"]       # every language kept
    per_lang = seen.set_index("language").loc[["en", "fr", "de"]]
    for col in ("n_tokens", "ce_original", "ce_replacement", "ce_recovered", "kl"):
        assert per_lang[col].tolist() == pytest.approx(
            every.set_index("language").loc[["en", "fr", "de"], col].tolist())
        assert seen.iloc[-1][col] == pytest.approx(alone.iloc[-1][col])    # pooled: fr + de
    assert seen.iloc[-1]["n_tokens"] == 4 * (CTX - 2) < every.iloc[-1]["n_tokens"]
    # the reconstruction statistics pool the same way
    pooled = ev.ReconstructionStats(L, D, F)
    ev._reconstruction_stats(model, clt, sets, 2, pooled=pooled, pooled_languages=["fr", "de"])
    pooled_alone = ev.ReconstructionStats(L, D, F)
    ev._reconstruction_stats(model, clt, {k: sets[k] for k in ("fr", "de")}, 2, pooled=pooled_alone)
    assert pooled.frame()["fvu"].tolist() == pytest.approx(pooled_alone.frame()["fvu"].tolist())
    with pytest.raises(ValueError, match="pooled_languages"):
        ev.replacement_metrics(model, clt, sets, pooled_languages=["zh"])


def test_reconstruction_metrics_stream_and_match_a_direct_computation():
    from mlclt_utils.clt.activations import collect_mlp_io

    model, clt = tiny_model(), tiny_clt()
    tokens = eval_tokens(5)
    streamed = ev.reconstruction_metrics(model, clt, tokens, batch_size=2)
    x, y = collect_mlp_io(model, tokens, 8)
    assert x.shape == (5 * (CTX - 1), L, D)                 # BOS excluded
    with torch.no_grad():
        recon, acts = clt(x)
    fvu = (y - recon).pow(2).sum(-1).mean(0) / (y - y.mean(0)).pow(2).sum(-1).mean(0)
    assert streamed["fvu"].tolist() == pytest.approx(fvu.tolist(), rel=1e-4)
    assert streamed["l0"].tolist() == pytest.approx((acts > 0).sum(-1).float().mean(0).tolist())
    assert streamed["n_tokens"].iloc[0] == 5 * (CTX - 1)


def test_top_activating_examples():
    model, clt = tiny_model(), tiny_clt()
    sets = {"en": eval_tokens(4, seed=1), "de": eval_tokens(4, seed=2)}
    layer = 1
    with torch.no_grad():
        _, cache = model.run_with_cache(sets["en"], names_filter=[f"blocks.{layer}.ln2.hook_normalized"])
        acts = ev.encode_layer(clt, cache[f"blocks.{layer}.ln2.hook_normalized"], layer)
    acts[:, 0] = 0
    feature = int(acts.gt(0).sum((0, 1)).argmax())
    df = top_activating_examples(model, clt, sets, layer, feature, k=3, batch_size=3)
    en = df[df["language"] == "en"]
    assert len(en) == 3 and set(df["language"]) <= {"en", "de"}
    assert df["activation"].is_monotonic_decreasing
    assert en["activation"].iloc[0] == pytest.approx(float(acts[..., feature].max()))
    row, pos = int(en["row"].iloc[0]), int(en["position"].iloc[0])
    assert float(acts[row, pos, feature]) == pytest.approx(en["activation"].iloc[0])
    assert pos > 0 and "[[" in en["context"].iloc[0]
    overall = top_activating_examples(model, clt, sets, layer, feature, k=2, per_language=False)
    assert len(overall) == 2


def test_top_activating_examples_skip_padding_and_show_whole_rows():
    from mlclt_utils.tokenizer import PAD_ID

    model, clt = tiny_model(), tiny_clt()
    rows = eval_tokens(4, seed=3)
    rows[:, CTX // 2:] = PAD_ID                  # right padding, as corpus.verse_rows makes
    layer = 0
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=[f"blocks.{layer}.ln2.hook_normalized"])
        acts = ev.encode_layer(clt, cache[f"blocks.{layer}.ln2.hook_normalized"], layer)
    feature = int(acts[:, CTX // 2:].gt(0).sum((0, 1)).argmax())   # one that fires on padding
    assert acts[:, CTX // 2:, feature].max() > 0
    df = top_activating_examples(model, clt, {"en": rows}, layer, feature, k=50,
                                    window=None, after=None)
    assert (df["position"] < CTX // 2).all() and (df["position"] > 0).all()
    top = df.iloc[0]
    ids, pos = rows[int(top["row"])].tolist(), int(top["position"])
    whole = f"{_decode(model, ids[1:pos])}[[{_decode(model, [ids[pos]])}]]{_decode(model, ids[pos + 1:CTX // 2])}"
    assert top["context"] == whole             # the whole row but BOS and padding


# ------------------------------------------------------------ the stage -----------------

def test_evaluation_stage_of_the_micro_chain(micro_chain, micro):
    from conftest import RUN
    from mlclt_utils.stages import load, stage

    st = stage("clt_eval", RUN, "s-en50", micro_chain)
    assert set(st.manifest()["inputs"]) == {"clt/s-en50", "models/s-en50", "data/en50"}
    out = load("clt_eval", micro, RUN, "s-en50", micro_chain)
    layers, langs = out["layers"], out["languages"]
    n_layers = micro["models"]["sizes"]["s"]["n_layers"]
    assert set(layers["language"]) == {"en", "fr", "all"} and len(layers) == 3 * n_layers
    assert list(langs["language"]) == ["en", "fr", "all"]
    assert langs["ce_recovered"].notna().all() and math.isfinite(langs["kl"].iloc[-1])
    assert layers["fvu"].map(math.isfinite).all() and (layers["l0"] >= 0).all()

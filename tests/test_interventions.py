"""Feature interventions on a tiny random model and CLT, against independent references:
the model itself, a hand-built hook, and circuit-tracer's feature_intervention."""

import pytest
import torch

from mlclt_utils.clt.evaluate import encode_layer
from mlclt_utils.graphs.circuit_tracer import build_replacement_model
from mlclt_utils.interventions import Steer, greedy_generate, steered_logits

from test_clt_formats import BOS, L, tiny_clt, tiny_model, tiny_tokenizer

TOKENS = torch.tensor([[BOS, 5, 9, 7, 11, 30, 6, 8]])


def _acts(model, clt, layer):
    name = f"blocks.{layer}.{clt.cfg.input_hook}"
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=[name])
        return encode_layer(clt, cache[name], layer)[0]          # [pos, F]


def _busy(acts):
    return [int(f) for f in acts[1:].gt(0).sum(0).argsort(descending=True)[:3]]


def test_setting_features_to_their_own_value_changes_nothing():
    model, clt = tiny_model(), tiny_clt()
    steers = [Steer(l, f, scale=1.0) for l in range(L) for f in _busy(_acts(model, clt, l))]
    with torch.no_grad():
        torch.testing.assert_close(steered_logits(model, clt, TOKENS, steers, bos_id=BOS),
                                   model(TOKENS), rtol=0, atol=1e-5)


def test_clamping_a_last_layer_feature_removes_exactly_its_decoder_write():
    model, clt = tiny_model(), tiny_clt()
    last = L - 1
    acts = _acts(model, clt, last)
    f = _busy(acts)[0]
    write = acts[:, f, None] * clt.W_dec[last][f, 0] / clt.output_scale[last]     # [pos, d]
    write[0] = 0                                                                  # BOS untouched

    def remove(out, hook):
        return out - write.detach()

    with torch.no_grad():
        expected = model.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{last}.hook_mlp_out", remove)])
        got = steered_logits(model, clt, TOKENS, [Steer(last, f, scale=0.0)], bos_id=BOS)
    assert (write.abs().sum() > 0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_the_same_intervention_through_circuit_tracer_gives_the_same_logits():
    model, clt = tiny_model(), tiny_clt()
    steers = [Steer(0, _busy(_acts(model, clt, 0))[0], value=0.0),
              Steer(0, 3, value=2.5), Steer(1, _busy(_acts(model, clt, 1))[1], value=-1.0)]
    rm = build_replacement_model(model, clt, tokenizer=tiny_tokenizer())
    try:
        n = TOKENS.shape[1]
        ct = [(s.layer, p, s.feature, s.value) for s in steers for p in range(1, n)]
        ct_logits, _ = rm.feature_intervention(TOKENS[0], ct, constrained_layers=None,
                                               freeze_attention=False)
    finally:
        rm.reset_hooks(including_permanent=True)
    with torch.no_grad():
        ours = steered_logits(model, clt, TOKENS, steers, bos_id=BOS)
        plain = model(TOKENS)
    assert (ours - plain).abs().max() > 1e-3                   # the steering does something
    torch.testing.assert_close(ours, ct_logits.reshape(ours.shape), rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_and_without_a_neutral_steer():
    model, clt = tiny_model(), tiny_clt()
    prompt = TOKENS[0, :4]
    ids, expected = prompt.tolist(), []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
    assert greedy_generate(model, clt, prompt, max_new_tokens=3) == expected
    assert greedy_generate(model, clt, prompt, [Steer(0, 1, scale=1.0)], max_new_tokens=3) == expected
    assert greedy_generate(model, clt, prompt, max_new_tokens=3, stop_ids=[expected[0]]) == expected[:1]


def test_a_batch_of_steered_continuations_equals_each_one_alone():
    from mlclt_utils.interventions import greedy_generate_many

    model, clt = tiny_model(), tiny_clt()
    acts = _acts(model, clt, 1)
    f1, f2, f3 = _busy(acts)
    sets = [[], [Steer(1, f1, scale=0.0)], [Steer(1, f1, scale=-1.0), Steer(2, f2, value=3.0)],
            [Steer(0, f3, value=5.0), Steer(1, f2, scale=2.0)], [Steer(2, f2, value=3.0)]]
    prompt = TOKENS[0, :4]
    alone = [greedy_generate(model, clt, prompt, s, max_new_tokens=5) for s in sets]
    assert len({tuple(a) for a in alone}) > 1                       # the steers do something
    assert greedy_generate_many(model, clt, prompt, sets, max_new_tokens=5) == alone
    stop = [alone[1][1]]                                            # a row stops at its stop token
    assert (greedy_generate_many(model, clt, prompt, sets, 5, stop)
            == [greedy_generate(model, clt, prompt, s, 5, stop) for s in sets])


def test_bad_steers_are_refused_with_the_bad_value():
    model, clt = tiny_model(), tiny_clt()
    with pytest.raises(ValueError, match="exactly one"):
        Steer(0, 1)
    with pytest.raises(ValueError, match="layer 9"):
        steered_logits(model, clt, TOKENS, [Steer(9, 1, scale=0.0)])
    with pytest.raises(ValueError, match="feature 100000"):
        steered_logits(model, clt, TOKENS, [Steer(0, 100_000, scale=0.0)])


def test_firing_means_on_constructed_statistics():
    from mlclt_utils.features.activations import UnitStats
    from mlclt_utils.interventions import firing_means

    # two rows of 2 and 4 tokens; unit 0 fires twice in row 0 (sum 3.0), unit 1 never
    stats = UnitStats(fired=[torch.tensor([[True, False], [False, False]])],
                      counts=[torch.tensor([2, 0])],
                      means=[torch.tensor([[1.5, 0.0], [0.0, 0.0]])], n_tokens=6,
                      lengths=torch.tensor([2, 4]))
    assert firing_means(stats, 0).tolist() == pytest.approx([1.5, 0.0])


def test_language_switch_rows_match_direct_generation():
    import pandas as pd

    from mlclt_utils.interventions import language_switch, switch_steers

    model, clt = tiny_model(), tiny_clt()
    model.tokenizer = tiny_tokenizer()
    prompts = pd.DataFrame({"prompt_id": [0, 1], "language": ["en", "fr"],
                            "ids": [TOKENS[0, :5].tolist(), TOKENS[0, :4].tolist()],
                            "answer_en": [7, 7], "answer_fr": [9, 9]})
    features = {"en": [(1, 2), (1, 3)], "fr": [(1, 4)]}
    means = {lang: {(1, f): 1.0 + f for f in range(clt.cfg.d_features)} for lang in ("en", "fr")}

    def classify(ids):                       # a stand-in reader: even first token = "en"
        return "en" if ids[0] % 2 == 0 else "fr"

    out = language_switch(model, clt, prompts, features, means, classify, [1.0, 4.0],
                          clamp_scale=-1.0, max_new_tokens=3, controls=2, progress=False)
    assert len(out) == 2 * (1 + 1 * 2 * (1 + 2))
    row = out[(out["kind"] == "steer") & (out["prompt_id"] == 0) & (out["strength"] == 4.0)].iloc[0]
    expected = greedy_generate(model, clt, prompts["ids"][0],
                               switch_steers(features["en"], features["fr"], means["fr"], 4.0, -1.0), 3)
    assert row["continuation"] == expected and row["target"] == "fr"
    assert row["success"] == (classify(expected) == "fr" and not row["degenerate"] if any(
        c.isalpha() for c in model.tokenizer.decode(expected)) else False)
    assert row["first_is_answer"] == (expected[0] == 9)
    base = out[out["kind"] == "baseline"]
    assert (base["target"].isna()).all() and len(base) == 2


def test_control_features_are_matched_in_firing_frequency():
    import numpy as np

    from mlclt_utils.interventions import MATCH_POOL, matched_random_features

    F = 200
    freq = {(1, f): f / F for f in range(F)}                 # frequency grows with the id
    taken = {(1, 100), (1, 101)}
    rng = np.random.default_rng(0)
    drawn = [matched_random_features([(1, 100), (1, 101)], freq, taken, F, rng) for _ in range(50)]
    ids = np.array([[f for _, f in d] for d in drawn])
    assert (np.abs(ids - 100) <= MATCH_POOL // 2 + 2).all()                     # near in frequency
    assert (ids[:, 0] != ids[:, 1]).all() and not np.isin(ids, [100, 101]).any()
    uniform = np.array([f for _ in range(50) for _, f in matched_random_features([(1, 100)], None, taken, F, rng)])
    assert (np.abs(uniform - 100) > MATCH_POOL).any()                           # the old draw was anywhere


def _switch_results(effect: float, n_prompts: int = 40, seed: int = 0):
    """Planted switch results: language features succeed with probability 0.2 + effect at
    strength 4 (0.2 elsewhere), the control with 0.2 everywhere."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        for s in (1.0, 4.0):
            rows.append({"prompt_id": p, "source": "en", "target": "fr", "strength": s, "kind": "steer",
                         "success": bool(rng.random() < 0.2 + (effect if s == 4.0 else 0)), "first_is_answer": None})
            for d in range(5):
                rows.append({"prompt_id": p, "source": "en", "target": "fr", "strength": s, "kind": "control",
                             "success": bool(rng.random() < 0.2), "first_is_answer": None})
    return pd.DataFrame(rows), pd.DataFrame({"prompt_id": range(n_prompts)})


def test_switch_verdict_chooses_strength_on_other_prompts_and_decides():
    from mlclt_utils.interventions import switch_verdicts

    rows, best = switch_verdicts(*_switch_results(0.7), "m", n_boot=300)
    assert best == 4.0 and rows[0]["verdict"] == "holds" and rows[0]["n_units"] == 20   # odd prompts only
    rows, _ = switch_verdicts(*_switch_results(0.0, seed=1), "m", n_boot=300)
    assert rows[0]["verdict"] == "inconclusive"

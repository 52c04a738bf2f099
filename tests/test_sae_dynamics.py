"""Chapter 09: top contexts and the language of a unit on planted latents; stitching
mechanics on tiny random models and a SAELens SAE."""

import numpy as np
import pandas as pd
import pytest
import torch

from mlclt_utils.features.activations import SAELatents, UnitSource
from mlclt_utils.features.contexts import label_shares, top_contexts, unit_languages
from mlclt_utils.features.language import TokenLanguages
from mlclt_utils.models.config import build_model, model_config
from mlclt_utils.sae.dynamics import sae_layers
from mlclt_utils.sae.stitch import latent_output, stitched_loss, stitching_summary, stitching_table, verdicts
from mlclt_utils.sae.train import SAETrainingConfig, train_saes
from mlclt_utils.tokenizer import BOS_ID, PAD_ID

VOCAB = 40
EN, JA, SHARED = list(range(10, 20)), list(range(20, 30)), [30, 31]


def token_languages():
    counts = np.zeros((2, VOCAB), dtype=int)
    counts[0, EN] = 50
    counts[1, JA] = 50
    counts[:, SHARED] = 50
    return TokenLanguages(["en", "ja"], counts)


class Planted(UnitSource):
    """Six units on token ids: 0 fires on English tokens, 1 on Japanese ones, 2 on both,
    3 never, 4 on shared tokens; 5 fires at 1.0 on one English token and at 0.5 on every
    Japanese one (its contexts are only those >= 0.7 x max)."""

    def __init__(self):
        super().__init__(torch.nn.Linear(1, 1))

    @property
    def n_layers(self):
        return 1

    def activations(self, tokens):
        t = tokens
        en = torch.isin(t, torch.tensor(EN)).float()
        ja = torch.isin(t, torch.tensor(JA)).float()
        sh = torch.isin(t, torch.tensor(SHARED)).float()
        vary = 1 + (t % 7).float() / 10                    # distinct values for a strict order
        u5 = 0.5 * ja + (t == EN[0]).float()
        return [torch.stack([en * vary, ja * vary, (en + ja) * vary, 0 * t.float(), sh * vary, u5], -1)]


def planted_rows(n=30, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(10, 32, (n, T), generator=g)
    rows[:, 0] = BOS_ID
    rows[::4, -3:] = PAD_ID
    rows[1, 3] = EN[0]
    return rows


def test_top_contexts_stream_equals_a_full_sort():
    rows = planted_rows()
    src = Planted()
    top = top_contexts(src, rows, top=7, batch_size=4)[0]
    acts = src.activations(rows)[0].reshape(-1, 6)
    keep = ((rows != BOS_ID) & (rows != PAD_ID)).reshape(-1)
    acts[~keep] = -float("inf")
    want = acts.sort(0, descending=True).values[:7]
    torch.testing.assert_close(top.values, want)
    # the positions point at the activations they claim
    for u in range(6):
        assert torch.equal(acts[top.positions[:, u], u], top.values[:, u])
        assert keep[top.positions[:, u]][torch.isfinite(top.values[:, u])].all()


def test_unit_languages_labels_planted_units():
    rows = planted_rows()
    top = top_contexts(Planted(), rows, top=50, batch_size=8)[0]
    lab = unit_languages(top, rows, token_languages(), ["en", "ja"], ratio=0.7, share=0.9).set_index("unit")
    assert lab["label"].tolist() == ["en", "ja", "bilingual", "dead", "shared", "en"]
    assert lab.loc[0, "share_en"] == 1.0 and lab.loc[1, "share_ja"] == 1.0
    assert 0.1 <= lab.loc[2, "share_en"] <= 0.9
    keep = (rows != BOS_ID) & (rows != PAD_ID)
    keep[:, 0] = False
    # unit 5: only its contexts at its maximum (the English token), none of the Japanese ones at 0.5
    assert lab.loc[5, "contexts"] == int(((rows == EN[0]) & keep).sum()) > 0
    assert lab.loc[3, "contexts"] == 0
    # independent count of unit 0's most common position among its contexts
    chosen = top.values[:, 0] >= 0.7 * top.values[0, 0]
    pos = (top.positions[:, 0][chosen] % rows.shape[1]).tolist()
    assert lab.loc[0, "position_share"] == pytest.approx(max(pos.count(p) for p in pos) / len(pos))
    shares = label_shares(lab.reset_index(), ["en", "ja"])
    assert shares == pytest.approx({"en": 0.4, "ja": 0.2, "bilingual": 0.2, "shared": 0.2})
    with pytest.raises(ValueError, match="share"):
        unit_languages(top, rows, token_languages(), ["en", "ja"], share=0.3)


def test_sae_layers_are_first_middle_last():
    assert sae_layers(4) == [0, 2, 3] and sae_layers(3) == [0, 1, 2] and sae_layers(2) == [0, 1]


# ------------------------------------------------------------------------ stitching -----

@pytest.fixture(scope="module")
def models_and_sae():
    size = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64}
    final = build_model(model_config(size, 12, VOCAB, seed=1)).eval()
    early = build_model(model_config(size, 12, VOCAB, seed=2)).eval()
    rows = planted_rows(40)
    sae = train_saes(final, rows, [1], SAETrainingConfig(d_sae=64, k=8, train_tokens=3000,
                                                        batch_tokens=128, lr=3e-3), progress=False)[1]
    return final, early, sae


def test_stitching_an_empty_selection_changes_nothing(models_and_sae):
    final, early, sae = models_and_sae
    tokens = planted_rows(6, seed=3)
    base = stitched_loss(early, final, sae, 1, tokens, None)
    assert stitched_loss(early, final, sae, 1, tokens, [], "add") == pytest.approx(base, abs=1e-6)
    assert stitched_loss(early, final, sae, 1, tokens, [0, 5, 9], "add") != pytest.approx(base, abs=1e-6)


def test_substituting_every_latent_gives_the_reconstruction_loss(models_and_sae):
    final, early, sae = models_and_sae
    tokens = planted_rows(6, seed=4)
    got = stitched_loss(early, final, sae, 1, tokens, list(range(sae.cfg.d_sae)), "substitute")
    # independent reference: SAELens's own forward pass on the final model's state
    name = "blocks.1.hook_resid_post"
    _, cache = final.run_with_cache(tokens, names_filter=[name])
    keep = ((tokens != BOS_ID) & (tokens != PAD_ID))[..., None]
    with torch.no_grad():
        recon = sae(cache[name])
        logits = early.run_with_hooks(tokens, fwd_hooks=[(name, lambda r, hook: torch.where(keep, recon, r))])
    targets = tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
    mask = (targets != PAD_ID).flatten().float()
    assert got == pytest.approx(float((loss * mask).sum() / mask.sum()), rel=1e-5)


def test_latent_output_adds_up_over_a_split_selection(models_and_sae):
    _, _, sae = models_and_sae
    h = torch.randn(5, 32)
    a, b = [1, 2, 3], [10, 20]
    torch.testing.assert_close(latent_output(sae, h, a + b, False),
                               latent_output(sae, h, a, False) + latent_output(sae, h, b, False))


def test_stitching_table_and_summary(models_and_sae):
    final, early, sae = models_and_sae
    labels = pd.DataFrame({"unit": np.arange(64),
                           "label": (["bilingual"] * 4 + ["en"] * 20 + ["ja"] * 20 + ["dead"] * 20)})
    batches = {"en": [planted_rows(4, seed=s) for s in (5, 6, 7)], "ja": [planted_rows(4, seed=s) for s in (8, 9, 10)]}
    t = stitching_table(early, final, sae, 1, batches, labels, ["en", "ja"], seed=0)
    assert set(t["condition"]) == {"none", "bilingual", "monolingual", "random", "all"}
    assert (t[t["condition"].isin(["bilingual", "monolingual", "random"])]["latents"] == 4).all()
    s = stitching_summary(t.assign(layer=1, step=5))
    row = s[(s["condition"] == "bilingual") & (s["mode"] == "add") & (s["language"] == "en")].iloc[0]
    base = t[(t["condition"] == "none") & (t["language"] == "en")]["loss"].to_numpy()
    mine = t[(t["condition"] == "bilingual") & (t["mode"] == "add") & (t["language"] == "en")]["loss"].to_numpy()
    assert row["loss_change"] == pytest.approx(float((mine - base).mean()))
    assert row["low"] <= row["loss_change"] <= row["high"] and row["batches"] == 3
    assert set(t[t["condition"] == "monolingual"]["draw"]) == set(range(5))      # controls drawn 5 times
    assert (t[t["condition"] == "none"]["norm"] == 0).all() and (t[t["condition"] == "bilingual"]["norm"] > 0).all()


def _stitching(effect: float, seed: int = 0) -> pd.DataFrame:
    """A stitching table with 2 languages x 8 batches; bilingual latents change the loss by
    ``effect`` against the monolingual and random controls (noise 0.05 per batch)."""
    rng = np.random.default_rng(seed)
    rows = []
    for lang in ("en", "ja"):
        for b in range(8):
            base = 4 + rng.normal(0, 0.5)
            rows.append({"condition": "none", "mode": "none", "draw": 0, "language": lang, "batch": b,
                         "latents": 0, "norm": 0.0, "loss": base})
            rows.append({"condition": "bilingual", "mode": "add", "draw": 0, "language": lang, "batch": b,
                         "latents": 6, "norm": 1.0, "loss": base - 0.1 + effect + rng.normal(0, 0.05)})
            for d in range(5):
                for cond in ("monolingual", "random"):
                    rows.append({"condition": cond, "mode": "add", "draw": d, "language": lang, "batch": b,
                                 "latents": 6, "norm": 1.0, "loss": base - 0.1 + rng.normal(0, 0.05)})
    return pd.DataFrame(rows).assign(step=10, layer=1)


def test_stitching_verdict_on_planted_data():
    helps = verdicts(_stitching(-0.2), [10], "m")
    assert [v["verdict"] for v in helps] == ["holds", "holds"] and helps[0]["n_units"] == 16
    assert {v["verdict"] for v in verdicts(_stitching(0.0, seed=1), [10], "m")} <= {"inconclusive"}
    assert verdicts(_stitching(-0.2), [], "m") == []                     # no counted checkpoint
    short = _stitching(-0.2)
    short.loc[short["condition"] == "monolingual", "latents"] = 3
    assert not verdicts(short, [10], "m")[0]["counted"]                  # unequal counts: shown only


def test_sae_latents_source_reads_the_saes_layers(models_and_sae):
    final, _, sae = models_and_sae
    tokens = planted_rows(3, seed=11)
    src = SAELatents(final, {1: sae})
    assert src.n_layers == 1 and src.hook(0) == "blocks.1.hook_resid_post"
    _, cache = final.run_with_cache(tokens)
    torch.testing.assert_close(src.activations(tokens)[0], sae.encode(cache["blocks.1.hook_resid_post"]))


# ---------------------------------------------------------------------- the stages -----

def test_sae_stage_saves_saelens_folders_that_reproduce_its_labels(chain_copy):
    """The saes stage on the micro chain (its model stands in for a bilingual one): every SAE
    reloads with SAELens's own loader, and the reloaded SAEs give back the stored labels."""
    from sae_lens import SAE

    from conftest import RUN, micro_preset
    from mlclt_utils import stages
    from mlclt_utils.models.load import checkpoint_steps
    from mlclt_utils.sae.dynamics import sae_folder

    preset = micro_preset(**{"bilingual.languages": ["en", "fr"], "bilingual.sae_tokens": 2000,
                             "bilingual.sae_batch_tokens": 128, "bilingual.context_rows": 6,
                             "bilingual.sae_k": 4, "bilingual.stitch_batches": 2, "bilingual.stitch_rows": 2})
    stages.build("saes", preset, RUN, "s-en50", chain_copy, progress=False)
    out = stages.load("saes", preset, RUN, "s-en50", chain_copy)
    steps = checkpoint_steps(stages.stage("models", RUN, "s-en50", chain_copy).path)
    assert out["steps"] == steps and sorted(out["labels"]["layer"].unique()) == [0, 1]
    data = stages.load("data", preset, RUN, "en50", chain_copy)
    rows = torch.cat([data["validation"][l][:6] for l in ["en", "fr"]])
    model = stages.load("models", preset, RUN, "s-en50", chain_copy, step=steps[-1])
    saes = {l: SAE.load_from_disk(sae_folder(out["folder"], steps[-1], l)) for l in (0, 1)}
    for i, top in enumerate(top_contexts(SAELatents(model, saes), rows, 50, 32)):
        again = unit_languages(top, rows, out["token_languages"], ["en", "fr"], 0.7, 0.9)
        lab = out["labels"]
        stored = lab[(lab["step"] == steps[-1]) & (lab["layer"] == i) & (lab["sae_seed"] == 0)]
        assert again["label"].tolist() == stored["label"].tolist()
    # the second SAE seed: its own folder, its own weights, its own rows
    assert sorted(out["labels"]["sae_seed"].unique()) == [0, 1]
    other = SAE.load_from_disk(sae_folder(out["folder"], steps[-1], 0, seed=1))
    assert not torch.equal(other.W_enc, saes[0].W_enc)
    assert saes[0].cfg.normalize_activations == "constant_norm_rescale"
    stages.build("stitching", preset, RUN, "s-en50", chain_copy, progress=False)
    table = stages.load("stitching", preset, RUN, "s-en50", chain_copy)
    assert set(table["step"]) == set(steps[1:-1]) and set(table["language"]) == {"en", "fr"}


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_every_size_gets_saes_of_the_same_density(preset):
    from mlclt_utils.presets import bilingual_preset, load_preset, size_models
    from mlclt_utils.stages import _saes_config

    bi = bilingual_preset(load_preset(preset))
    density = []
    for name in size_models(bi):
        c = _saes_config(bi, name)
        d_model = bi["models"]["sizes"][name.split("-")[0]]["d_model"]
        density.append(c["sae_k"] / (c["sae_expansion"] * d_model))
    assert len(density) >= 2 and max(density) / min(density) < 1.1


def test_contexts_are_cut_between_words_and_characters():
    from mlclt_utils.features.contexts import cut_words

    text = "and then he remembered the covenant of his fathers"
    assert cut_words(text, 20, keep="end") == "…of his fathers"          # "covenant" would be cut: dropped
    assert cut_words(text, 22, keep="start") == "and then he remembered…"  # cut at a space: whole words
    assert cut_words(text, 20, keep="start") == "and then he…"
    assert cut_words("天と地を創造された", 4, keep="end") == "…造された"       # no spaces: cut between characters
    assert cut_words("\ufffd天と地", 10, keep="end") == "天と地"               # no replacement character
    assert cut_words("short", 10, keep="start") == "short"

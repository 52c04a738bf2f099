"""Models and CLTs loaded instead of trained (``mlclt_utils.sources``), from miniature copies
of the study's released artifacts in their real formats, with the hub switched off."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MICRO, RUN, micro_preset
from released import export_gpt2, released_style_clt

from mlclt_utils import sources, stages
from mlclt_utils.claims import claims_table, read_verdicts
from mlclt_utils.presets import load_preset

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def released(micro_chain, micro, tmp_path_factory):
    """The micro chain's model and CLT, written as the study released its own."""
    folder = tmp_path_factory.mktemp("released")
    model = stages.load("models", micro, RUN, "s-en50", root=micro_chain)
    clt = stages.load("clt", micro, RUN, "s-en50", root=micro_chain)
    hf = export_gpt2(model, model.tokenizer, folder / "gpt2-hf_multilingual-50")
    stored = released_style_clt(clt, model, folder / "clts" / "clt-50")
    return SimpleNamespace(model_dir=folder / "gpt2-hf_multilingual-50", clt_dir=folder / "clts" / "clt-50",
                           model=model, clt=clt, hf=hf, stored=stored)


def loaded_preset(released, **more):
    return micro_preset(**{"source.models": {"s-en50": str(released.model_dir)},
                           "source.clts": {"s-en50": str(released.clt_dir)}, **more})


def test_loaded_model_and_clt_become_the_runs_stages_offline(released, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset, root = loaded_preset(released), tmp_path / "artifacts"
    for kind, key in [("corpus", None), ("tokenizer", None), ("data", "en50"), ("models", "s-en50"),
                      ("clt", "s-en50")]:
        stages.build(kind, preset, "loaded", key, root, progress=False)
    model = stages.load("models", preset, "loaded", "s-en50", root=root)
    clt = stages.load("clt", preset, "loaded", "s-en50", root=root)
    # the model's logits are the transformers model's; BOS is prepended as for the book's models
    text = "In the beginning God created"
    ids = model.to_tokens(text)
    assert ids[0, 0].item() == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids), released.hf(ids).logits, atol=1e-4, rtol=1e-4)
    # the CLT is the one that was trained, read back through the released layout and convention
    x = torch.randn(7, clt.cfg.n_layers, clt.cfg.d_model)
    torch.testing.assert_close(clt.encode(x), released.clt.encode(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(clt(x)[0], released.clt(x)[0], atol=1e-4, rtol=1e-4)
    # where they came from is written down; the one metrics row is the validation loss
    st = stages.stage("models", "loaded", "s-en50", root)
    assert st.manifest()["config"]["source"]["path"] == str(released.model_dir.resolve())
    metrics = stages.read_metrics("loaded", "s-en50", root)
    assert len(metrics) == 1 and metrics["val_loss_fr"].iloc[0] > 0
    assert stages.list_checkpoints("loaded", "s-en50", root) == [stages.LOADED_STEP]


def test_a_changed_source_folder_makes_the_stage_stale(released, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(released.model_dir, copy)
    preset = micro_preset(**{"source.models": {"s-en50": str(copy)}})
    before = stages.KINDS["models"].config(preset, "s-en50")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert stages.KINDS["models"].config(preset, "s-en50") != before


def test_the_released_clt_layout_by_hand(tmp_path):
    """One token reconstructed by hand from the layout as documented: blocks indexed by
    triu_indices(L, L, 0) as (source <= target), per-block decoder biases summed per target,
    input scale before the encoder, output scale dividing the decoded sum."""
    from safetensors.torch import save_file

    from mlclt_utils.clt.formats import load_featflow_clt

    g = torch.Generator().manual_seed(3)
    L, d, F = 3, 4, 5
    rows, cols = torch.triu_indices(L, L, 0)
    t = {"W_enc": torch.randn(L, d, F, generator=g), "b_enc": torch.randn(L, F, generator=g) * 0.1,
         "W_dec": torch.randn(len(rows), F, d, generator=g), "b_dec": torch.randn(len(rows), d, generator=g),
         "log_threshold": torch.full((L, F), -2.0),
         "estimated_norm_scaling_factor_in": torch.tensor([0.5, 2.0, 1.5]),
         "estimated_norm_scaling_factor_out": torch.tensor([3.0, 0.25, 1.25])}
    tmp_path.mkdir(exist_ok=True)
    save_file(t, str(tmp_path / "clt_weights.safetensors"))
    (tmp_path / "clt_cfg.json").write_text('{"d_in": 4, "d_latent": 5, "n_layers": 3}')
    x = torch.randn(L, d, generator=g, dtype=torch.float64)
    acts = []
    for l in range(L):
        h = [sum(x[l, i].item() * t["estimated_norm_scaling_factor_in"][l].item() * t["W_enc"][l, i, f].item()
                 for i in range(d)) + t["b_enc"][l, f].item() for f in range(F)]
        acts.append([v if v > torch.tensor(-2.0).exp().item() else 0.0 for v in h])
    want = torch.zeros(L, d, dtype=torch.float64)
    for block, (src, tgt) in enumerate(zip(rows.tolist(), cols.tolist())):
        for j in range(d):
            want[tgt, j] += sum(acts[src][f] * t["W_dec"][block, f, j].item() for f in range(F))
            want[tgt, j] += t["b_dec"][block, j].item()
    want /= t["estimated_norm_scaling_factor_out"].double()[:, None]
    clt = load_featflow_clt(tmp_path, input_convention="ln2_normalized", dtype=torch.float64)
    got, _ = clt(x.unsqueeze(0))
    torch.testing.assert_close(got[0], want, atol=1e-9, rtol=1e-9)


def test_a_clt_loads_in_half_precision_and_reads_float32_inputs(released):
    from mlclt_utils.clt.formats import featflow_clt_size, load_featflow_clt

    size = featflow_clt_size(released.clt_dir, torch.bfloat16)
    n = sum(p.numel() for n_, p in released.clt.named_parameters())
    assert size["parameters"] == n and size["gigabytes"] == pytest.approx(2 * n / 1e9)
    half = load_featflow_clt(released.clt_dir, model=released.model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    x = torch.randn(64, half.cfg.n_layers, half.cfg.d_model)
    full = released.clt(x)[0]
    err = (half(x)[0].float() - full).pow(2).mean() / full.pow(2).mean()
    assert err < 1e-3


def test_circuit_tracer_runs_one_graph_on_the_loaded_model_and_clt(released):
    from mlclt_utils.clt.formats import load_featflow_clt
    from mlclt_utils.graphs import attribution as A
    from mlclt_utils.graphs.circuit_tracer import build_replacement_model
    from mlclt_utils.models.hub import load_hf_gpt2

    model = load_hf_gpt2(str(released.model_dir))
    clt = load_featflow_clt(released.clt_dir, model=model)
    rm = build_replacement_model(model, clt, tokenizer=model.tokenizer)
    try:
        tokens = model.to_tokens("Au commencement, Dieu créa")[0]
        graph = A.graph_for_prompt(rm, tokens, target=None)
        assert graph.active_features.shape[0] > 0
        assert torch.isfinite(graph.adjacency_matrix).all()
    finally:
        rm.reset_hooks(including_permanent=True)


def test_an_unreachable_hub_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    source = sources.model_source(load_preset("causalnlp"), "s-en50")
    assert source == {"hub": "CausalNLP/gpt2-hf_multilingual-50", "subfolder": None, "revision": None}
    with pytest.raises(OSError, match=r"CausalNLP/gpt2-hf_multilingual-50 from the Hugging Face hub.*local folder"):
        sources.local_folder(source)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.model_source(micro_preset(**{"source.models": "./no-such-folder"}), "s-en50")


def test_the_configuration_names_the_hub_revision_and_subfolder():
    preset = load_preset("causalnlp", {"source.clts": "someone/clts:clt-{share}", "source.revision": "v1.0"})
    assert [sources.model_source(preset, n)["hub"] for n in stages.model_names(preset)] == [
        f"CausalNLP/gpt2-hf_multilingual-{p}" for p in (20, 50, 70, 90)]
    clt = stages.KINDS["clt"].config(preset, "s-en70")["source"]
    assert (clt["hub"], clt["subfolder"], clt["revision"], clt["dtype"]) == ("someone/clts", "clt-70", "v1.0", "bfloat16")
    assert stages.KINDS["tokenizer"].config(preset, None)["source"]["hub"] == "CausalNLP/gpt2-hf_multilingual-50"
    # the other transcoder kinds are still trained, on the loaded models
    assert "source" not in stages.KINDS["plt-topk"].config(preset, "s-en70")


def test_chapter_08_is_skipped_with_its_reason_when_models_are_loaded(tmp_path, monkeypatch):
    from mlclt_utils import runner

    source = REPO / "notebooks" / "08_model_diffing.ipynb"
    assert runner.skip_reason(source, load_preset("tiny")) is None
    assert runner.skip_reason(REPO / "notebooks" / "04_shared_features.ipynb", load_preset("causalnlp")) is None
    reason = runner.skip_reason(source, load_preset("causalnlp"))
    assert "finetunes" in reason
    monkeypatch.setattr(runner, "EXECUTED", tmp_path)
    import nbformat

    page = nbformat.read(str(runner.write_skipped(source, reason)), as_version=4)
    assert [c.cell_type for c in page.cells] == ["markdown", "markdown"]
    assert page.cells[0].source.startswith("# ") and "finetunes" in page.cells[1].source


# prompts as a dataset with columns of its own (the schema of the study's prompt sets is
# mapped through graphs.prompt_columns)
PROMPT_ROWS = [
    {"sentence": "In the beginning", "answer": " God", "lang": "en", "pair": "god"},
    {"sentence": "Au commencement,", "answer": " Dieu", "lang": "fr", "pair": "god"},
    {"sentence": "God created the heaven and the", "answer": " earth", "lang": "en", "pair": "earth"},
    {"sentence": "Dieu créa les cieux et la", "answer": " terre", "lang": "fr", "pair": "earth"},
    {"sentence": "Am Anfang", "answer": " Gott", "lang": "de", "pair": "god"},
]
PROMPT_COLUMNS = {"prompt": "sentence", "target": "answer", "language": "lang", "concept": "pair"}


def prompt_dataset(folder):
    import datasets

    datasets.Dataset.from_list(PROMPT_ROWS).save_to_disk(str(folder))
    return f"hf:{folder}"


def test_given_prompts_are_scored_like_mined_ones(released, tmp_path):
    from mlclt_utils.prompts import load_given_prompts, scored_prompts

    records = load_given_prompts(prompt_dataset(tmp_path / "prompts"), PROMPT_COLUMNS)
    prompts, concepts = scored_prompts(released.model, records, ["en", "fr"])
    tok = released.model.tokenizer
    assert list(prompts["language"]) == ["en", "fr", "en", "fr"]            # German is not a run language
    assert prompts["target_token"].iloc[0] == tok.encode("In the beginning God", add_special_tokens=False)[
        len(tok.encode("In the beginning", add_special_tokens=False))]
    assert concepts.loc["earth", "fr"] == "terre" and 0 < prompts["p_target"].min() < 1
    with pytest.raises(ValueError, match="graphs.prompt_columns"):
        load_given_prompts(prompt_dataset(tmp_path / "again"))
    with pytest.raises(ValueError, match="record 0: field 'concept' is missing"):
        scored_prompts(released.model, [{"prompt": "In the", "language": "en", "target": " beginning"}], ["en"])


@pytest.mark.slow
def test_chapters_run_on_the_miniature_offline_with_given_prompts(released, tmp_path):
    # 01-07, 10 and 11 read the loaded model and CLT; 08 finetunes, so it writes a skip page
    # a micro model's CLT has few language features at the usual bars; fewer graphs keep it short
    params = {**MICRO, "source.models": {"s-en50": str(released.model_dir)},
              "source.clts": {"s-en50": str(released.clt_dir)}, "features.min_frequency": 0.001,
              "features.min_concentration": 0.5,
              "graphs.prompt_source": prompt_dataset(tmp_path / "prompts"), "graphs.prompt_columns": PROMPT_COLUMNS}
    env = dict(os.environ, MLCLT_ARTIFACTS=str(tmp_path / "artifacts"), HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), MLCLT_EXECUTED=str(tmp_path / "chapters"))
    args = [sys.executable, "-m", "mlclt_utils.runner", "--preset", "tiny", "--run", "released",
            "--no-build", "--chapters", "01", "02", "03", "04", "05", "06", "07", "08", "10", "11"]
    for key, value in params.items():
        args += ["--param", f"{key}={value!r}"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    preset = load_preset("tiny", params)
    graphs = stages.load("graphs", preset, "released", "s-en50", root=tmp_path / "artifacts")
    assert sorted(graphs["prompts"]["concept"].unique()) == ["earth", "god"]
    assert len(graphs["scores"]) >= 4
    skipped = (tmp_path / "chapters" / "08_model_diffing.ipynb").read_text()
    assert "chapter was skipped" in skipped and "source.models" in skipped
    rows = read_verdicts("released", root=tmp_path / "artifacts")
    c1 = rows[rows["claim"] == "C1"]
    assert len(c1) == 2 and not c1["statistic"].str.contains("growth").any()  # one checkpoint: no growth row
    table = claims_table(rows).set_index("claim")
    assert table.loc["A5", "verdict"] == "not measured" and table.loc["C2", "verdict"] == "not measured"

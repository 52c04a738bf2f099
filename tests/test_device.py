"""The one place that picks a training precision (mlclt_utils.device), and the step
running through each choice."""

import pytest
import torch

from mlclt_utils import device as D
from mlclt_utils.models import config as mconfig
from mlclt_utils.models import train as mtrain


@pytest.mark.parametrize("capability, name, scaler", [((7, 5), "float16", True), ((8, 0), "bfloat16", False),
                                                      ((9, 0), "bfloat16", False)])
def test_precision_follows_the_compute_capability(monkeypatch, capability, name, scaler):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen = D.training_precision("cuda")
    assert (chosen.name, chosen.scaler) == (name, scaler)
    assert f"{capability[0]}.{capability[1]}" in chosen.reason
    assert D.training_precision("cuda", mixed=False).name == "float32"


SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
HASWELL = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.mark.parametrize("cpuinfo, name", [(SAPPHIRE, "bfloat16"), (HASWELL, "float32"), ("", "float32")])
def test_the_cpu_trains_in_bfloat16_only_with_native_instructions(monkeypatch, cpuinfo, name):
    read = D.cpu_bf16_flags
    monkeypatch.setattr(D, "cpu_bf16_flags", lambda: read(cpuinfo))
    chosen = D.training_precision("cpu")
    assert chosen.name == name and chosen.make_scaler("cpu") is None
    assert D.training_precision("cpu", mixed=False).name == "float32"
    if name == "bfloat16":
        assert "amx_bf16" in chosen.reason and "avx512_bf16" in chosen.reason


def test_cpu_bf16_flags_read_the_flags_line_and_can_be_turned_off(monkeypatch):
    assert D.cpu_bf16_flags(SAPPHIRE) == ["amx_bf16", "avx512_bf16"]
    assert D.cpu_bf16_flags(HASWELL) == [] and D.cpu_bf16_flags("") == []
    assert D.cpu_bf16_flags("model name : avx512_bf16 in the name\n") == []   # only the flags line
    monkeypatch.setenv("MLCLT_CPU_BF16", "0")
    assert D.cpu_bf16_flags(SAPPHIRE) == []


@pytest.mark.parametrize("precision", [D.FLOAT32, D.Precision(torch.bfloat16, False, "test"),
                                       D.Precision(torch.float16, True, "test")], ids=lambda p: p.name)
def test_a_step_runs_in_every_precision(precision):
    torch.manual_seed(0)
    cfg = mconfig.model_config({"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32}, 8, 50)
    model = mconfig.build_model(cfg)
    mtrain.freeze_key_biases(model)
    optimizer = mtrain.make_optimizer(model, 1e-2, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = precision.make_scaler("cpu")
    before = model.blocks[0].mlp.W_in.detach().clone()
    tokens = torch.randint(5, 50, (4, 8))
    losses = [mtrain.train_step(mtrain.TrainingLoss(model), optimizer, params, tokens, 1e-2, 1.0,
                                precision, scaler).item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.blocks[0].mlp.W_in, before)
    assert model.blocks[0].mlp.W_in.dtype == torch.float32  # master weights stay float32


# ------------------------------------------------------------------ the same tests on every device
# cpu here; on a machine with a GPU the same tests run on cuda too, and become its check

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def test_model_training_runs_on_the_device(device, tmp_path):
    from mlclt_utils.artifacts import Stage, load_tensors

    from test_models import TRAINING, tiny_cfg, tiny_data

    data, evals = tiny_data()
    out = mtrain.train_model(Stage("t", "models/s-en50", tmp_path), tiny_cfg(), data, evals, TRAINING,
                             device=device, languages=["en", "fr"], progress=False)
    assert out["completed"] and out["precision"] == D.training_precision(device).reason
    weights = load_tensors(tmp_path / "t" / "models" / "s-en50" / "model.safetensors")
    assert all(torch.isfinite(w).all() for k, w in weights.items() if not k.endswith("IGNORE"))


def test_clt_training_runs_on_the_device(device):
    from mlclt_utils.clt.activations import TensorSource
    from mlclt_utils.clt.train import train_clt

    from test_clt_train import _cfg, _new_clt, _synthetic

    x, y = _synthetic(n=1024)
    clt = _new_clt().to(device)
    out = train_clt(clt, TensorSource(x.to(device), y.to(device), 256, seed=0), 256 * 4, _cfg(batch_tokens=256),
                    device=device, progress=False)
    assert out["completed"]
    assert all(p.device.type == device and torch.isfinite(p).all() for p in clt.parameters())


def test_sae_training_runs_on_the_device(device):
    from mlclt_utils.sae.train import SAETrainingConfig, train_saes

    from test_sae_train import CFG, N_CTX as SAE_CTX, D_VOCAB, SIZE, make_rows

    model = mconfig.build_model(mconfig.model_config(SIZE, SAE_CTX, D_VOCAB, seed=1)).to(device)
    saes = train_saes(model, make_rows(32, seed=2), [1], SAETrainingConfig(**{**CFG, "train_tokens": 1024}),
                      device=device, progress=False)
    sae = saes[1] if isinstance(saes, dict) else saes["saes"][1]
    assert all(p.device.type == device and torch.isfinite(p).all() for p in sae.parameters())


def test_an_attribution_graph_runs_on_the_device(device):
    from mlclt_utils.graphs import attribution as A
    from mlclt_utils.graphs.circuit_tracer import build_replacement_model

    from test_clt_formats import tiny_clt, tiny_model, tiny_tokenizer
    from test_graphs import TOKENS

    rm = build_replacement_model(tiny_model().to(device), tiny_clt().to(device), tokenizer=tiny_tokenizer())
    try:
        graph = A.graph_for_prompt(rm, TOKENS.to(device), target=None)
        assert graph.active_features.shape[0] > 0
        assert torch.isfinite(graph.adjacency_matrix).all()
    finally:
        rm.reset_hooks(including_permanent=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_mixed_precision_loss_matches_the_plain_loss(device, dtype):
    torch.manual_seed(0)
    model = mconfig.build_model(mconfig.model_config({"n_layers": 2, "d_model": 32, "n_heads": 4, "d_mlp": 64},
                                                     16, 80)).to(device)
    tokens = torch.randint(5, 80, (6, 16), device=device)
    with torch.autocast(device, dtype=dtype):
        mixed = mtrain.TrainingLoss(model)(tokens)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(mtrain.next_token_loss(model, tokens).item(), rel=2e-2)


def test_the_lean_forward_equals_the_hooked_forward_on_the_device(device):
    torch.manual_seed(0)
    model = mconfig.build_model(mconfig.model_config({"n_layers": 2, "d_model": 32, "n_heads": 4, "d_mlp": 64},
                                                     16, 80)).to(device)
    tokens = torch.randint(5, 80, (6, 16), device=device)
    assert torch.allclose(mtrain.lean_residual(model, tokens), model(tokens, stop_at_layer=2), atol=1e-4)

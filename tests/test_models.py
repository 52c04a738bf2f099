"""Tests of mlclt_utils.models: building, schedules, training, resuming, DDP, loading."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlclt_utils import tokenizer as T
from mlclt_utils.artifacts import Stage, load_tensors
from mlclt_utils.models import config as mconfig
from mlclt_utils import stages
from mlclt_utils.models import load as mload
from mlclt_utils.models import train as mtrain
from mlclt_utils.presets import load_preset

REPO = Path(__file__).resolve().parents[1]
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64}
N_CTX, VOCAB = 16, 300
TRAINING = dict(tokens=16 * N_CTX * 12, batch_size=16, lr=3e-3, min_lr_ratio=0.1,
                warmup_fraction=0.1, weight_decay=0.1, grad_clip=1.0, n_checkpoints=4,
                eval_every=4, eval_tokens_per_language=4 * N_CTX, mixed_precision=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls are slower with several threads on a busy shared machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_data(n_rows=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, VOCAB, (n_rows, N_CTX), generator=g)
    tokens[:, 0] = T.BOS_ID
    language = torch.randint(0, 2, (n_rows,), generator=g)
    evals = {"en": tokens[:6].clone(), "fr": tokens[6:12].clone()}
    return {"tokens": tokens, "language": language}, evals


def tiny_cfg(seed=0):
    return mconfig.model_config(TINY, N_CTX, VOCAB, seed=seed)


def test_forward_backward_tiny():
    model = mconfig.build_model(tiny_cfg())
    data, _ = tiny_data()
    loss = mtrain.next_token_loss(model, data["tokens"][:8])
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(VOCAB)) < 1.0  # near uniform at initialisation
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    cfg = model.cfg
    assert (cfg.d_head, cfg.act_fn, cfg.normalization_type, cfg.positional_embedding_type) == \
        (16, mconfig.DEFAULT_ACT_FN, "LN", "standard")


def test_fused_training_loss_matches_plain_loss():
    model = mconfig.build_model(tiny_cfg())
    data, _ = tiny_data()
    tokens = data["tokens"][:8]
    plain = mtrain.next_token_loss(model, tokens)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = mtrain.TrainingLoss(model, chunk=24)(tokens)  # chunks that do not divide the rows
    fused.backward()
    assert abs(fused.item() - plain.item()) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-6), n


def test_cpu_bfloat16_training_loss_matches_autograd_through_bfloat16_logits():
    # the reference: the hooked model under the CPU's bfloat16 autocast, plain logits, autograd
    model = mconfig.build_model(tiny_cfg())
    mtrain.freeze_key_biases(model)   # their true gradient is zero: only rounding noise to compare
    tokens = tiny_data()[0]["tokens"][:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = mtrain.next_token_loss(model, tokens)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = mtrain.TrainingLoss(model, chunk=24)(tokens)
    fused.backward()
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=5e-3)
    for n, p in model.named_parameters():
        if p.requires_grad:
            a, b = p.grad.flatten(), expected[n].flatten()
            assert p.grad.dtype == torch.float32
            assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, n
            assert (a.norm() / b.norm()).item() == pytest.approx(1, abs=0.03), n


@pytest.mark.parametrize("act_fn", mconfig.ACT_FNS)
def test_lean_forward_equals_the_hooked_forward(act_fn):
    model = mconfig.build_model(mconfig.model_config(TINY, N_CTX, VOCAB, act_fn=act_fn, seed=1))
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so each one is checked
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = tiny_data()[0]["tokens"][:5]
    params = [p for p in model.parameters() if p.requires_grad]
    assert mtrain.lean_supported(model)
    hooked = model(tokens, stop_at_layer=TINY["n_layers"])
    lean = mtrain.lean_residual(model, tokens)
    assert torch.allclose(lean, hooked, atol=1e-5)
    weights = torch.randn_like(hooked)
    expected = torch.autograd.grad((hooked * weights).sum(), params, allow_unused=True)
    got = torch.autograd.grad((lean * weights).sum(), params, allow_unused=True)
    assert sum(g is not None for g in got) == len(params) - 4  # all but ln_final and unembed
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_lean_forward_steps_aside_for_hooks_and_other_architectures():
    model = mconfig.build_model(tiny_cfg())
    tokens = tiny_data()[0]["tokens"][:4]
    evals = {"en": tokens}
    reference = torch.nn.functional.cross_entropy(  # validation loss computed by hand
        model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert mtrain.eval_loss_per_language(model, evals, batch_size=3)["en"] == pytest.approx(reference, abs=1e-5)
    # a hook that changes the forward: both the loss and validation must take the hooked path
    model.blocks[0].hook_resid_pre.add_hook(lambda x, hook: 2 * x)
    assert not mtrain.lean_supported(model)
    assert not mtrain.TrainingLoss(model).lean
    doubled = torch.nn.functional.cross_entropy(
        model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert doubled != pytest.approx(reference, abs=1e-3)
    assert mtrain.TrainingLoss(model)(tokens).item() == pytest.approx(doubled, abs=1e-5)
    assert mtrain.eval_loss_per_language(model, evals)["en"] == pytest.approx(doubled, abs=1e-5)
    model.reset_hooks()
    assert mtrain.lean_supported(model)
    relu = mconfig.build_model(mconfig.model_config(TINY, N_CTX, VOCAB, act_fn="gelu"))
    relu.cfg.act_fn = "relu"  # an activation the lean forward does not know
    assert not mtrain.lean_supported(relu)


def test_config_roundtrip_and_seeded_init():
    cfg = tiny_cfg(seed=3)
    again = mconfig.config_from_dict(mconfig.config_to_dict(cfg))
    a, b = mconfig.build_model(cfg), mconfig.build_model(again)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("total,n", [(1, 1), (10, 3), (100, 8), (1000, 16), (7, 20), (5000, 6)])
def test_log_spaced_steps(total, n):
    steps = mtrain.log_spaced_steps(total, n)
    assert len(steps) == min(n, total)
    assert steps == sorted(set(steps))
    assert steps[0] >= 1 and steps[-1] == total
    if n >= 3 and total >= 100 * n:
        gaps = [b / a for a, b in zip(steps, steps[1:])]
        assert max(gaps) / min(gaps) < 1.5  # roughly constant ratio: log spacing


def test_log_spaced_steps_rejects_nonsense():
    with pytest.raises(ValueError):
        mtrain.log_spaced_steps(0, 3)


def test_lr_schedule():
    lr, total = 1e-3, 100
    sched = [mtrain.learning_rate(s, total, lr, 0.1, 0.1) for s in range(1, total + 1)]
    assert sched[0] == pytest.approx(lr / 10)
    assert sched[9] == pytest.approx(lr)  # end of warm-up (10 steps)
    assert all(a < b for a, b in zip(sched[:9], sched[1:10]))
    assert all(a >= b for a, b in zip(sched[9:], sched[10:]))  # cosine decay
    assert sched[-1] == pytest.approx(0.1 * lr)
    assert mtrain.learning_rate(1, 10, lr, 0.0, 0.0) == pytest.approx(lr, rel=0.05)  # no warm-up


def test_weight_decay_only_on_matrices():
    model = mconfig.build_model(tiny_cfg())
    opt = mtrain.make_optimizer(model, 1e-3, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "blocks.0.attn.W_Q" in decayed and "unembed.W_U" in decayed
    assert not any(n.rsplit(".", 1)[-1].startswith(("b_", "w", "b")) for n in decayed)
    assert "blocks.0.attn.b_Q" not in decayed  # 2-D in TransformerLens, still a bias


def _weights(path):
    """The trained parameters in a weights file (without the fixed attention-mask buffers)."""
    return {k: v for k, v in load_tensors(path).items() if not k.endswith((".mask", ".IGNORE"))}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_training_writes_files_and_metrics(tmp_path):
    data, evals = tiny_data()
    stage = Stage("r", "models/s-en50", root=tmp_path)
    out = mtrain.train_model(stage, tiny_cfg(), data, evals, TRAINING, seed=0, progress=False,
                             languages=["en", "fr"])
    assert out["completed"] and out["step"] == 12
    files = {p.relative_to(stage.path).as_posix() for p in stage.path.rglob("*") if p.is_file()}
    ckpts = [f"checkpoints/step_{s:07d}.safetensors" for s in mtrain.log_spaced_steps(12, 4)]
    assert files == {"config.json", "metrics.jsonl", "model.safetensors", *ckpts}
    df = stages.read_metrics("r", "s-en50", root=tmp_path)
    assert {"step", "tokens", "train_loss", "lr", "val_loss_en", "val_loss_fr"} <= set(df.columns)
    assert df["step"].iloc[0] == 0 and df["step"].iloc[-1] == 12
    assert df["val_loss_en"].notna().all() and df["val_loss_en"].iloc[-1] < df["val_loss_en"].iloc[0]
    assert torch.equal(_weights(stage.file(ckpts[-1]))["embed.W_E"],
                       _weights(stage.file("model.safetensors"))["embed.W_E"])


def test_resume_gives_same_weights(tmp_path):
    data, evals = tiny_data()
    full = Stage("r", "models/full", root=tmp_path)
    mtrain.train_model(full, tiny_cfg(), data, evals, TRAINING, seed=0, progress=False)

    part = Stage("r", "models/part", root=tmp_path)
    # 12 steps: resume state is written every 2 steps and at checkpoints; stop at 5 "by a crash"
    first = mtrain.train_model(part, tiny_cfg(), data, evals, TRAINING, seed=0, progress=False,
                               stop_after_step=5)
    assert not first["completed"]
    assert part.file("resume.pt").exists() and not part.file("model.safetensors").exists()
    second = mtrain.train_model(part, tiny_cfg(), data, evals, TRAINING, seed=0, progress=False)
    assert second["completed"] and 0 < second["resumed_from"] <= 5
    assert not part.file("resume.pt").exists()
    a, b = _weights(full.file("model.safetensors")), _weights(part.file("model.safetensors"))
    assert _max_diff(a, b) <= 1e-6
    ma = stages.read_metrics("r", "full", root=tmp_path)
    mb = stages.read_metrics("r", "part", root=tmp_path)
    assert list(ma["step"]) == list(mb["step"])
    assert (ma["val_loss_en"] - mb["val_loss_en"]).abs().max() <= 1e-6


def test_resume_state_of_other_settings_is_ignored(tmp_path):
    data, evals = tiny_data()
    stage = Stage("r", "models/x", root=tmp_path)
    mtrain.train_model(stage, tiny_cfg(), data, evals, TRAINING, seed=0, progress=False,
                       stop_after_step=5)
    other = dict(TRAINING, lr=1e-3)
    out = mtrain.train_model(stage, tiny_cfg(), data, evals, other, seed=0, progress=False)
    assert out["resumed_from"] == 0


def test_bad_inputs(tmp_path):
    data, evals = tiny_data()
    preset = load_preset("tiny")
    from mlclt_utils.stages import build

    with pytest.raises(ValueError, match="'xl-en50' is not one of"):
        build("models", preset, "r", "xl-en50", tmp_path)
    with pytest.raises(ValueError, match="'s-en30' is not one of"):
        build("models", preset, "r", "s-en30", tmp_path)
    with pytest.raises(ValueError, match="form"):
        mconfig.parse_model_name("small")
    assert mconfig.parse_model_name("s-en50") == ("s", 0.5)
    assert mconfig.parse_model_name("m-en0") == ("m", 0.0)
    with pytest.raises(ValueError, match="lacks"):
        mconfig.model_config({"n_layers": 2, "d_model": 32}, N_CTX, VOCAB)
    with pytest.raises(ValueError, match="divisible"):
        mconfig.model_config(dict(TINY, n_heads=3), N_CTX, VOCAB)
    stage = Stage("r", "models/bad", root=tmp_path)
    wrong_ctx = {"tokens": data["tokens"][:, :8], "language": data["language"]}
    with pytest.raises(ValueError, match="n_ctx"):
        mtrain.train_model(stage, tiny_cfg(), wrong_ctx, evals, TRAINING, progress=False)
    too_big = {"tokens": data["tokens"] + VOCAB, "language": data["language"]}
    with pytest.raises(ValueError, match="vocabulary"):
        mtrain.train_model(stage, tiny_cfg(), too_big, evals, TRAINING, progress=False)
    with pytest.raises(ValueError, match="less than one batch"):
        mtrain.train_model(stage, tiny_cfg(), data, evals, dict(TRAINING, tokens=10), progress=False)
    with pytest.raises(ValueError, match="lack"):
        mtrain.train_model(stage, tiny_cfg(), data, evals, {"tokens": 100}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        mtrain.train_model(stage, tiny_cfg(), data, {"en": data["tokens"][:2, :4]}, TRAINING,
                           progress=False)


class CharTokenizer:
    """A stand-in tokenizer: one id per character, BOS 3 and EOS 4."""

    bos_token_id, eos_token_id = 3, 4

    def encode(self, text, add_special_tokens=False):
        return ([3] if add_special_tokens else []) + [5 + (ord(c) % 200) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 5 + 32) for i in ids if i >= 5)

    def __len__(self):
        return 205


def test_model_stage_loads_checkpoints_and_generates(micro_chain, micro):
    from conftest import RUN
    from mlclt_utils.stages import load

    steps = stages.list_checkpoints(RUN, "s-en50", root=micro_chain)
    assert steps[-1] == micro["training"]["tokens"] // (16 * 32)
    final = load("models", micro, RUN, "s-en50", micro_chain)
    early = load("models", micro, RUN, "s-en50", micro_chain, step=steps[0])
    evals = load("data", micro, RUN, "en50", micro_chain)["validation"]
    assert mtrain.eval_loss_per_language(final, evals)["en"] < \
        mtrain.eval_loss_per_language(early, evals)["en"]
    with pytest.raises(ValueError, match="available"):
        stages.load_model(RUN, "s-en50", step=999, root=micro_chain)
    tokenizer = load("tokenizer", micro, RUN, None, micro_chain)
    prompts = {"en": "In the beginning", "fr": "Au commencement"}
    out = mload.greedy_continuations(final, tokenizer, prompts, 5)
    assert set(out) == {"en", "fr"} and all(isinstance(v, str) for v in out.values())
    assert out == mload.greedy_continuations(final, tokenizer, prompts, 5)


WORKER = textwrap.dedent('''
    import sys
    import torch
    from mlclt_utils import distributed
    from mlclt_utils.models import config as mconfig
    from mlclt_utils.models import train as mtrain
    from mlclt_utils.artifacts import Stage

    TINY = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64}
    # float32 (on a CPU with native bfloat16 the default is bfloat16): what is checked is that
    # DDP averages gradients as one process would, and bfloat16 rounding depends on batch splits
    TRAINING = dict(tokens=8 * 16 * 5, batch_size=8, lr=1e-3, min_lr_ratio=0.1,
                    warmup_fraction=0.2, weight_decay=0.1, grad_clip=1.0, n_checkpoints=2,
                    eval_every=5, eval_tokens_per_language=32, mixed_precision=False)

    def train(root, name):
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(5, 300, (40, 16), generator=g)
        tokens[:, 0] = 3
        data = {"tokens": tokens, "language": torch.zeros(40, dtype=torch.long)}
        cfg = mconfig.model_config(TINY, 16, 300, seed=0)
        return mtrain.train_model(Stage("r", name, root=root), cfg, data, {"en": tokens[:4]},
                                  TRAINING, seed=0, device="cpu", progress=False)

    if __name__ == "__main__":
        train(sys.argv[1], "models/ddp")
        info = distributed.current()
        open(f"{sys.argv[1]}/rank{info.rank}_of_{info.world_size}", "w").close()
        distributed.cleanup()
''')


def test_ddp_gloo_matches_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the single-process run goes on while the two ranks start up
    runpy.run_path(str(script), run_name="worker")["train"](tmp_path, "models/single")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "rank0_of_2").exists() and (tmp_path / "rank1_of_2").exists()
    single = _weights(tmp_path / "r/models/single/model.safetensors")
    ddp = _weights(tmp_path / "r/models/ddp/model.safetensors")
    first = _weights(tmp_path / "r/models/single/checkpoints/step_0000001.safetensors")
    assert _max_diff(single, first) > 1e-3  # the weights did change over training
    diff = _max_diff(single, ddp)
    print("max abs weight difference, DDP vs one process:", diff)
    assert diff < 1e-4


def test_hf_tokenizer_folder_attaches(tmp_path):
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<pad>", "<unk>", "<sep>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "bonjour le monde"] * 5, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    model = mconfig.build_model(mconfig.model_config(TINY, N_CTX, len(hf)), hf)
    assert model.to_tokens("hello")[0, 0].item() == T.BOS_ID
    assert model.to_tokens("hello")[0, 1].item() != T.BOS_ID  # BOS once
    out = mload.greedy_continuations(model, hf, {"en": "hello"}, 3)
    assert isinstance(out["en"], str)


def test_bench_counts_and_runs():
    from mlclt_utils.bench import train as bench

    cfg = mconfig.model_config(TINY, N_CTX, VOCAB)
    n = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert cfg.n_params == n
    assert bench.train_flops_per_token(cfg) == 6 * n + 12 * 2 * N_CTX * 32 + 6 * 32 * VOCAB
    assert bench.measure_matmul_peak(threads=1, sizes=(128,), repeats=1) > 0
    row = bench.benchmark_training("tiny", "s", steps=1, warmup=1, threads=1, batch_size=2)
    assert row["tokens_per_s"] > 0 and math.isfinite(row["final_loss"])

"""Tests of CLT activation collection, the activation buffer and the training loop."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlclt_utils.clt.activations import ActivationBuffer, TensorSource, collect_mlp_io
from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder
from mlclt_utils.artifacts import Stage
from mlclt_utils.clt.train import checkpoint_steps, lambda_at, train_clt
from mlclt_utils.presets import load_preset

REPO = Path(__file__).resolve().parents[1]
BOS = 3


@pytest.fixture(scope="module")
def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_mlp=32,
                                  d_vocab=50, act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(5, 50, (30, 16), generator=g)
    t[:, 0] = BOS
    t[:, 1] = torch.arange(5, 35)   # distinct prefixes: no two positions share a context
    t[2, 7] = BOS            # a BOS in the middle of a row is left out too
    t[5, 3] = BOS
    return t


def _cfg(**kw):
    cfg = dict(load_preset("tiny")["clt"])
    cfg.update(kw)
    return cfg


def _synthetic(n=4096, L=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, d, generator=g, dtype=dtype)
    A = torch.randn(L, d, d, generator=g, dtype=dtype) / d ** 0.5
    y = torch.einsum("nld,lde->nle", torch.relu(x), A)
    return x, y


def _new_clt(L=2, d=16, F=64, dtype=torch.float32, **kw):
    return CrossLayerTranscoder(CLTConfig(L, d, F, **kw),
                                generator=torch.Generator().manual_seed(0)).to(dtype)


# ------------------------------------------------------------------ activations -----

def test_collect_excludes_bos_and_returns_languages(tiny_model, tokens):
    lang = torch.arange(30) % 3
    x, y, tok_lang = collect_mlp_io(tiny_model, tokens, batch_size=7, languages=lang, bos_id=BOS)
    keep = tokens != BOS
    assert x.shape == y.shape == (int(keep.sum()), 2, 16) == (30 * 15 - 2, 2, 16)
    assert torch.equal(tok_lang, lang[:, None].expand(30, 16)[keep])
    _, cache = tiny_model.run_with_cache(tokens)
    for l in range(2):
        assert torch.allclose(x[:, l], cache[f"blocks.{l}.ln2.hook_normalized"][keep], atol=1e-5)
        assert torch.allclose(y[:, l], cache[f"blocks.{l}.hook_mlp_out"][keep], atol=1e-5)
    x2, _ = collect_mlp_io(tiny_model, tokens, batch_size=30, bos_id=BOS)
    assert torch.allclose(x, x2, atol=1e-5)


def test_buffer_is_bounded_deterministic_and_serves_each_token_once(tiny_model, tokens, tmp_path):
    all_x, all_y = collect_mlp_io(tiny_model, tokens, bos_id=BOS)
    kw = dict(batch_tokens=32, buffer_tokens=128, seed=3, lm_batch_size=4, bos_id=BOS)
    buf = ActivationBuffer(tiny_model, tokens, **kw)
    assert buf.chunk_tokens == 64
    served, resident = [], []
    for t in range(10):                                   # 320 rows, within the first epoch
        bx, by = buf.batch(t)
        assert bx.shape == (32, 2, 16)
        served.append(torch.cat([bx, by], dim=1).flatten(1))
        resident.append(buf.resident_rows())
    assert max(resident) <= 128 and resident[-1] == resident[3]   # bounded, does not grow
    served = torch.cat(served)
    assert torch.unique(served, dim=0).shape[0] == served.shape[0]   # no row served twice
    every = torch.cat([all_x, all_y], dim=1).flatten(1)
    assert torch.cdist(served, every, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-4     # all are real rows
    # a fresh buffer (as after a restart) gives the same batch t without replaying
    again = ActivationBuffer(tiny_model, tokens, **kw)
    for t in (7, 2, 9):
        assert torch.equal(again.batch(t)[0], buf.batch(t)[0])
    assert again.chunks_computed <= 6
    # another seed gives other batches
    other = ActivationBuffer(tiny_model, tokens, **{**kw, "seed": 4})
    assert not torch.equal(other.batch(1)[0], buf.batch(1)[0])
    # training past one epoch wraps around
    assert buf.batch(40)[0].shape == (32, 2, 16)


def test_buffer_disk_cache_is_reused(tiny_model, tokens, tmp_path):
    kw = dict(batch_tokens=32, buffer_tokens=128, seed=0, bos_id=BOS, cache_dir=tmp_path / "cache")
    first = ActivationBuffer(tiny_model, tokens, **kw)
    a = [first.batch(t)[1] for t in range(5)]
    assert first.chunks_computed == 3
    files = list((tmp_path / "cache").rglob("chunk_*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))
    second = ActivationBuffer(tiny_model, tokens, **kw)
    b = [second.batch(t)[1] for t in range(5)]
    assert second.chunks_computed == 0
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # other tokens: another cache key
    third = ActivationBuffer(tiny_model, tokens[:20], **kw)
    third.batch(0)
    assert third.chunks_computed == 1


def test_context_windows_give_short_contexts(tiny_model, tokens):
    from mlclt_utils.clt.activations import context_windows

    w = context_windows(tokens, 6, BOS)
    assert w.shape == (30 * 3, 6) and (w[:, 0] == BOS).all()          # (16 - 1) // 5 windows a row
    assert torch.equal(w[0, 1:], tokens[0, 1:6]) and torch.equal(w[1, 1:], tokens[0, 6:11])
    assert torch.equal(w[3, 1:], tokens[1, 1:6])
    assert torch.equal(context_windows(tokens, 16, BOS), tokens)      # already short enough
    with pytest.raises(ValueError, match="context_length"):
        context_windows(tokens, 1, BOS)
    buf = ActivationBuffer(tiny_model, tokens, batch_tokens=32, buffer_tokens=128, seed=0,
                           bos_id=BOS, context_length=6)
    assert torch.equal(buf.tokens, w)
    assert buf.tokens_per_epoch == int((w[:, 1:] != BOS).sum())
    short_x, _ = collect_mlp_io(tiny_model, w, bos_id=BOS)
    full_x, _ = collect_mlp_io(tiny_model, tokens, bos_id=BOS)
    served = torch.cat([buf.batch(t)[0] for t in range(4)]).flatten(1)

    def dist(a, b):
        return torch.cdist(a, b.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").min(1).values

    assert dist(served, short_x).max() < 1e-4            # activations of the short contexts
    assert dist(served, full_x).max() > 1e-2             # not those of the whole rows


# ------------------------------------------------------------------ training --------

def test_paper_preset_follows_the_paper_recipe_and_the_others_keep_it_off():
    paper = load_preset("paper")["clt"]
    assert (paper["context_length"], paper["stop_l0"], paper["grad_clip"]) == (16, 10.0, 1.0)
    for name in ("tiny", "small", "colab"):
        clt = load_preset(name)["clt"]
        assert (clt["context_length"], clt["stop_l0"], clt["grad_clip"]) == (None, None, None)
    assert load_preset("tiny", {"clt.context_length": 16})["clt"]["context_length"] == 16


def test_lambda_schedule_and_checkpoint_steps():
    assert lambda_at(0, 100, 2.0, 0.5) == 0.0
    assert lambda_at(25, 100, 2.0, 0.5) == pytest.approx(1.0)
    assert lambda_at(50, 100, 2.0, 0.5) == 2.0 == lambda_at(99, 100, 2.0, 0.5)
    assert lambda_at(0, 100, 2.0, 0.0) == 2.0
    assert checkpoint_steps(10, 3) == [3, 7, 10]
    assert checkpoint_steps(2, 5) == [1, 2]


def test_training_reduces_fvu_and_logs_metrics(tmp_path):
    x, y = _synthetic()
    cfg = _cfg(batch_tokens=256, lr=3e-3, n_checkpoints=2, dead_window_tokens=1024)
    clt = _new_clt()
    stage = Stage("t", "clt/m", root=tmp_path)
    out = train_clt(clt, TensorSource(x, y, 256, seed=0), 256 * 60, cfg, stage=stage,
                    progress=False, log_every=10)
    assert out["completed"] and out["step"] == 60
    rows = [__import__("json").loads(r) for r in stage.file("metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert sum(rows[-1]["fvu"]) < 0.6 * sum(rows[0]["fvu"])
    for r in rows:
        assert len(r["l0"]) == len(r["dead_fraction"]) == len(r["fvu"]) == 2
        assert r["lambda"] == pytest.approx(lambda_at(r["step"] - 1, 60, cfg["lambda_max"],
                                                      cfg["lambda_warmup_fraction"]))
    assert sorted(p.name for p in stage.file("checkpoints").iterdir()) == [
        "step_0000030.safetensors", "step_0000060.safetensors"]
    # the scales were set from the first batches: E||x~|| close to sqrt(d)
    xt = x[:1024] * clt.input_scale[:, None]
    assert torch.allclose(xt.norm(dim=-1).mean(0), torch.full((2,), 4.0), rtol=0.05)


def test_grad_clip_clips_the_global_gradient_norm(monkeypatch):
    x, y = _synthetic()
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = clip(params, max_norm, *a, **k)
        norms.append((float(total), float(torch.cat([p.grad.reshape(-1) for p in params
                                                     if p.grad is not None]).norm()), max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    runs = {}
    for clip_at in (None, 1e-3):
        clt = _new_clt()
        train_clt(clt, TensorSource(x, y, 256, seed=0), 256 * 3,
                  _cfg(batch_tokens=256, grad_clip=clip_at), progress=False)
        runs[clip_at] = clt.W_enc.detach().clone()
    assert len(norms) == 3                                # called on every step, only when set
    for before, after, max_norm in norms:
        assert max_norm == 1e-3 and before > 1e-3 and after == pytest.approx(1e-3, rel=1e-4)
    assert not torch.equal(runs[None], runs[1e-3])
    with pytest.raises(ValueError, match="grad_clip"):
        train_clt(_new_clt(), TensorSource(x, y, 256), 256, _cfg(grad_clip=-1.0), progress=False)


def test_stop_l0_ends_training_as_complete_and_stays_stopped(tmp_path):
    x, y = _synthetic()
    cfg = _cfg(batch_tokens=256, lr=3e-3, lambda_max=5.0, lambda_warmup_fraction=0.0,
               n_checkpoints=1)
    free = train_clt(_new_clt(), TensorSource(x, y, 256, seed=0), 256 * 40, cfg, progress=False,
                     log_every=4)
    assert free["completed"] and not free["stopped_at_l0"] and free["step"] == 40
    stop = 0.5 * sum(free["final"]["l0"]) / 2 + 0.5 * 32      # reached well before the end
    stage = Stage("t", "clt/m", root=tmp_path)
    out = train_clt(_new_clt(), TensorSource(x, y, 256, seed=0), 256 * 40,
                    dict(cfg, stop_l0=stop), stage=stage, progress=False, log_every=4)
    assert out["completed"] and out["stopped_at_l0"] and out["step"] < 40
    rows = [__import__("json").loads(r) for r in stage.file("metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == out["step"] and sum(rows[-1]["l0"]) / 2 < stop
    assert all(sum(r["l0"]) / 2 >= stop for r in rows[:-1])
    assert stage.file(f"checkpoints/step_{out['step']:07d}.safetensors").exists()
    again = train_clt(_new_clt(), TensorSource(x, y, 256, seed=0), 256 * 40,
                      dict(cfg, stop_l0=stop), stage=stage, progress=False, log_every=4)
    assert again["completed"] and again["stopped_at_l0"] and again["step"] == out["step"]


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_resume_equals_uninterrupted(tmp_path, activation):
    x, y = _synthetic()
    cfg = _cfg(batch_tokens=256, n_checkpoints=3, k=4)
    n_tokens = 256 * 12

    def run(root, stops):
        stage = Stage("t", "clt/m", root=root)
        for stop in stops:
            clt = _new_clt(activation=activation)            # a fresh process would start like this
            out = train_clt(clt, TensorSource(x, y, 256, seed=1), n_tokens, cfg, stage=stage,
                            progress=False, max_steps_this_call=stop, log_every=2)
        return clt, out, stage

    ref, ref_out, ref_stage = run(tmp_path / "a", [None])
    res, res_out, res_stage = run(tmp_path / "b", [5, 3, None])
    assert res_out["completed"] and res_out["resumed_from"] == 8
    for (name, a), (_, b) in zip(ref.state_dict().items(), res.state_dict().items()):
        assert torch.equal(a, b), name
    assert (ref_stage.file("metrics.jsonl").read_text() == res_stage.file("metrics.jsonl").read_text())
    state = torch.load(res_stage.file("resume.pt"), weights_only=True)
    assert state["step"] == 12


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_two_process_gloo_matches_single_process(tmp_path, activation):
    """Data-parallel training equals one process on the whole batch; for BatchTopK that
    needs the selection over the global batch, not over each rank's slice."""
    x, y = _synthetic(n=2048, dtype=torch.float64)
    cfg = _cfg(batch_tokens=256)
    n_tokens = 256 * 6
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from mlclt_utils import distributed
        from mlclt_utils.clt.activations import TensorSource
        from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder
        from mlclt_utils.clt.train import train_clt
        info = distributed.init_distributed("cpu")
        data = torch.load(sys.argv[1], weights_only=True)
        clt = CrossLayerTranscoder(CLTConfig(2, 16, 64, activation={activation!r}),
                                   generator=torch.Generator().manual_seed(0)).double()
        out = train_clt(clt, TensorSource(data["x"], data["y"], 256, seed=2), {n_tokens},
                        {cfg!r}, progress=False)
        assert out["local_batch_tokens"] == 128
        if info.is_main:
            torch.save(clt.state_dict(), sys.argv[2])
        distributed.cleanup()
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp_path / "data.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    clt = _new_clt(dtype=torch.float64, activation=activation)
    train_clt(clt, TensorSource(x, y, 256, seed=2), n_tokens, cfg, progress=False)
    for name, a in clt.state_dict().items():
        assert torch.allclose(a, two[name], rtol=1e-9, atol=1e-11), name

"""CLT training speed on this machine: tokens/s, share of the matmul peak, memory.

    python -m mlclt_utils.bench clt [--cases tiny,small,reference] [--steps 20] [--threads 2]

Cases: the CLT sizes of the ``tiny`` and ``small`` presets (d_model and n_layers of
``models.sizes["s"]``, F = ``clt.features_per_layer``, the preset's batch) and one fixed
reference shape (4 layers, d_model 128, 2,048 features per layer, cross-layer decoders,
JumpReLU, batches of 1,024 tokens, float32), all with activations already in memory.

Each case is measured in two regimes, each in its own process (so that the peak memory
of one does not hide the other's):

* ``early``: a freshly initialised CLT, where about half of the features fire on every
  token; the training step then uses dense products (the sparse kernels fall back to them).
* ``trained``: after a short warm-up training (a few hundred steps at batch 256, lambda
  ramped to ``lambda_max``) on synthetic activations with a sparse cross-layer structure,
  so that L0 is in the tens as in a trained CLT. Timed twice at the same state: with the
  sparse path (the default) and with the dense path (``sparse=False``, plain autograd); the
  gradients of both paths are compared on one batch.

The synthetic activations come from the generative model a CLT assumes: per layer a
sparse code (``k`` of ``F / 8`` atoms, values in [0.5, 1.5]) gives x_l = D_l s_l + noise
and y_k = sum_{l<=k} E_{l,k} s_l.

``--peer`` also times one training step of decode-clt (the ``clt`` package of
``pip install --no-deps decode-clt``) beside this project's, at the reference shape in the
early regime, interleaved in one process on the same scaled activations: JumpReLU with
the same threshold, tanh sparsity and pre-activation terms, Adam, the cached decoder norms
reset after each step as its trainer does (data loading and logging left out of both).

``--full-run TOKENS`` also trains the reference shape from scratch with ``train_clt``
(the preset's lambda schedule) on synthetic activations and reports the average
throughput over the whole run, dense start included, and the final FVU and L0;
``--compare-dense`` repeats that run with the dense path for the same quality check.

"Dense-equivalent FLOPs" per token are those of a dense step:
4 L d F (encoder forward, and its weight gradient) + 6 B F d (decoder forward, its weight
gradient and the activation gradient), with B = L(L+1)/2 decoder blocks (L for a per-layer
transcoder). The sparse path skips most of this work, so its "share of peak" is the
dense-equivalent rate it delivers and can exceed what a dense trainer could reach.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = {
    # name: (n_layers, d_model, features per layer, batch tokens)
    "tiny": None,          # from the preset
    "small": None,
    "reference": (4, 128, 2048, 1024),
}
WARM_BATCH = 256


def case_shape(name: str) -> tuple[int, int, int, int]:
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    if CASES[name] is not None:
        return CASES[name]
    from ..presets import load_preset

    preset = load_preset(name)
    size = preset["models"]["sizes"]["s"]
    clt = preset["clt"]
    return size["n_layers"], size["d_model"], clt["features_per_layer"], clt["batch_tokens"]


def flops_per_token(n_layers: int, d_model: int, n_features: int, cross_layer: bool = True) -> float:
    blocks = n_layers * (n_layers + 1) // 2 if cross_layer else n_layers
    return 4 * n_layers * d_model * n_features + 6 * blocks * n_features * d_model


def synthetic_activations(n: int, n_layers: int, d_model: int, n_atoms: int, k: int,
                          seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y [n, L, d] from sparse per-layer codes (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    L, d = n_layers, d_model
    D = torch.randn(L, n_atoms, d, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    E = torch.randn(L, n_atoms, L, d, generator=g) / math.sqrt(d)
    x = torch.zeros(n, L, d)
    y = torch.zeros(n, L, d)
    for l in range(L):
        idx = torch.randint(0, n_atoms, (n, k), generator=g)
        S = torch.zeros(n, n_atoms).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
        x[:, l] = S @ D[l] + noise * torch.randn(n, d, generator=g)
        y[:, l:] += (S @ E[l, :, l:].reshape(n_atoms, -1)).view(n, L - l, d)
    return x, y


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------- worker -----

def _setup(case: str, threads: int, seed: int = 0):
    from ..presets import load_preset
    from ..clt.model import CLTConfig, CrossLayerTranscoder
    from ..clt.train import make_optimizer

    torch.set_num_threads(threads)
    L, d, F, B = case_shape(case)
    cfg = dict(load_preset("tiny")["clt"])
    pool = 16
    x, y = synthetic_activations(pool * B, L, d, n_atoms=max(16, F // 8), k=4, seed=seed)
    clt = CrossLayerTranscoder(CLTConfig(L, d, F), generator=torch.Generator().manual_seed(seed))
    clt.set_scales_from(x[:4096], y[:4096])
    optimizer = make_optimizer(clt, 2e-3)
    return (L, d, F, B), cfg, x, y, clt, optimizer


def _time_steps(clt, optimizer, x, y, B, cfg, lam, steps, warmup, sparse):
    from ..clt.train import compute_step

    pool = x.shape[0] // B
    times, out = [], None
    for i in range(warmup + steps):
        j = i % pool
        xb, yb = x[j * B:(j + 1) * B], y[j * B:(j + 1) * B]
        t0 = time.perf_counter()
        out = compute_step(clt, optimizer, xb, yb, lam, cfg, sparse=sparse)
        optimizer.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    times.sort()
    return times, out


def _worker(args) -> dict:
    (L, d, F, B), cfg, x, y, clt, optimizer = _setup(args.case, args.threads)
    state_path = Path(args.state)
    lam = cfg["lambda_max"]
    result = {"case": args.case, "regime": args.phase, "n_layers": L, "d_model": d, "features": F,
              "batch": B, "threads": torch.get_num_threads()}
    if args.phase == "warm":
        from ..clt.train import compute_step, lambda_at

        t0 = time.perf_counter()
        pool = x.shape[0] // WARM_BATCH
        for step in range(args.warm_steps):
            j = step % pool
            xb, yb = x[j * WARM_BATCH:(j + 1) * WARM_BATCH], y[j * WARM_BATCH:(j + 1) * WARM_BATCH]
            out = compute_step(clt, optimizer, xb, yb,
                               lambda_at(step, args.warm_steps, lam, 0.6), cfg)
            optimizer.step()
        torch.save({"clt": clt.state_dict(), "optimizer": optimizer.state_dict()}, state_path)
        result.update(seconds=time.perf_counter() - t0, l0=float(out["l0"]),
                      fvu=float(out["fvu"].mean()))
        return result
    if args.phase != "early":
        state = torch.load(state_path, weights_only=True)
        clt.load_state_dict(state["clt"])
        optimizer.load_state_dict(state["optimizer"])
    sparse = False if args.phase == "dense" else None
    base = _current_rss_mb()
    times, out = _time_steps(clt, optimizer, x, y, B, cfg, lam, args.steps, 3, sparse)
    best, median = times[0], times[len(times) // 2]
    result.update(ms_best=1e3 * best, ms_median=1e3 * median, tokens_per_s_best=B / best,
                  tokens_per_s_median=B / median, l0=float(out["l0"]), fvu=float(out["fvu"].mean()),
                  peak_rss_mb=_rss_mb(), train_mem_mb=_rss_mb() - base,
                  flops_per_token=flops_per_token(L, d, F))
    if args.phase == "dense":
        # the sparse path gives the same loss and gradients at this state
        xb, yb = x[:B], y[:B]
        grads = []
        for sp in (False, True):
            optimizer.zero_grad()
            loss = clt.loss(xb, yb, lam, tanh_c=cfg["tanh_c"], preact_coeff=cfg["preact_coeff"],
                            sparse=sp)
            loss["total"].backward()
            grads.append([p.grad.clone() for p in clt.parameters()] + [loss["total"].detach()])
        result["max_rel_grad_diff"] = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                          for a, b in zip(*grads))
    if args.phase == "trained":
        # the real training loop, end to end, on the same activations
        from ..clt.activations import TensorSource
        from ..clt.train import train_clt

        t_cfg = dict(cfg, batch_tokens=B, lr=2e-3, lambda_warmup_fraction=0.0)
        summary = train_clt(clt, TensorSource(x, y, B), args.steps * B, t_cfg, progress=False,
                            log_every=args.steps)
        result["loop_tokens_per_s"] = summary["tokens_per_second"]
    return result


# ----------------------------------------------------------------------------- main -----

def full_run(n_tokens: int, threads: int = 2, sparse: bool | None = None, seed: int = 0) -> dict:
    """Train the reference shape from scratch on ``n_tokens`` synthetic tokens."""
    from ..presets import load_preset
    from ..clt.activations import TensorSource
    from ..clt.model import CLTConfig, CrossLayerTranscoder
    from ..clt.train import train_clt

    torch.set_num_threads(threads)
    L, d, F, B = CASES["reference"]
    cfg = dict(load_preset("small")["clt"], batch_tokens=B, lr=2e-3)
    x, y = synthetic_activations(32 * B, L, d, n_atoms=F // 8, k=4, seed=seed)
    clt = CrossLayerTranscoder(CLTConfig(L, d, F), generator=torch.Generator().manual_seed(seed))
    summary = train_clt(clt, TensorSource(x, y, B, seed=seed), n_tokens, cfg, progress=False,
                        log_every=max(1, n_tokens // B // 4), sparse=sparse)
    # quality on held-out synthetic tokens
    xv, yv = synthetic_activations(8 * B, L, d, n_atoms=F // 8, k=4, seed=seed)
    with torch.no_grad():
        out = clt.loss(xv, yv, 0.0, sparse=False)
    return {"path": "dense" if sparse is False else "fast", "tokens": summary["tokens"],
            "seconds": summary["seconds"], "tokens_per_s": summary["tokens_per_second"],
            "fvu": out["fvu"].tolist(), "l0": out["l0_per_layer"].tolist(),
            "curve": summary["final"]}


def peer_run(threads: int = 2, steps: int = 20, seed: int = 0) -> dict:
    """Median tokens/s of decode-clt's training step and of this project's, side by side."""
    import statistics

    try:
        from clt.config import CLTConfig as PeerConfig, TrainingConfig
        from clt.models.clt import CrossLayerTranscoder as PeerCLT
        from clt.training.losses import LossManager
    except ImportError as err:
        raise ImportError("--peer needs decode-clt: pip install --no-deps decode-clt") from err
    from ..clt.train import compute_step

    # this project's side is the benchmark's own early regime of the reference case
    (L, d, F, B), cfg, x, y, ours, optimizer = _setup("reference", threads, seed)
    pool = x.shape[0] // B
    peer_cfg = PeerConfig(num_features=F, num_layers=L, d_model=d, activation_fn="jumprelu",
                          jumprelu_threshold=ours.cfg.threshold_init, normalization_method="none")
    torch.manual_seed(seed)
    peer = PeerCLT(peer_cfg, process_group=None, device=torch.device("cpu"))
    losses = LossManager(TrainingConfig(
        learning_rate=2e-3, training_steps=1000, normalization_method="none",
        sparsity_lambda=cfg["lambda_max"], sparsity_c=cfg["tanh_c"],
        preactivation_coef=cfg["preact_coeff"], activation_path="unused"), clt_config=peer_cfg)
    peer_opt = torch.optim.Adam(peer.parameters(), lr=2e-3)
    # the peer reads per-layer tensors, already scaled as ours scales them inside its loss
    peer_batches = [({l: (x[i * B:(i + 1) * B, l] * ours.input_scale[l]).contiguous() for l in range(L)},
                     {l: (y[i * B:(i + 1) * B, l] * ours.output_scale[l]).contiguous() for l in range(L)})
                    for i in range(pool)]

    def our_step(i):
        j = i % pool
        out = compute_step(ours, optimizer, x[j * B:(j + 1) * B], y[j * B:(j + 1) * B],
                           cfg["lambda_max"], cfg)
        optimizer.step()
        return float(out["l0"])

    def peer_step(i):
        inputs, targets = peer_batches[i % pool]
        peer_opt.zero_grad(set_to_none=True)
        acts = peer.get_feature_activations(inputs)
        loss, _ = losses.compute_total_loss(peer, inputs, targets, 500, 1000, precomputed_activations=acts)
        loss.backward()
        peer_opt.step()
        peer.decoder_module._cached_decoder_norms = None
        return sum(float((a > 0).sum(-1).float().mean()) for a in acts.values()) / L

    times, l0 = {"this project": [], "decode-clt": []}, {}
    for _ in range(2):                        # two interleaved blocks, 3 untimed steps each
        for name, step in (("decode-clt", peer_step), ("this project", our_step)):
            for i in range(3 + steps // 2):
                t0 = time.perf_counter()
                l0[name] = step(i)
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
    rates = {name: B / statistics.median(ts) for name, ts in times.items()}
    for name, rate in rates.items():
        print(f"{name:>12}: {rate:8,.0f} tokens/s (median of {len(times[name])} steps), "
              f"L0 {l0[name]:.0f} per layer", flush=True)
    ratio = rates["this project"] / rates["decode-clt"]
    print(f"reference shape, early regime, {threads} threads: this project / decode-clt = {ratio:.2f}x")
    return {"peer": "decode-clt", "tokens_per_s": rates, "ratio": ratio}


def _run_worker(case, phase, state, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "mlclt_utils.bench.clt", "--worker", phase, "--case", case,
           "--state", state, "--out", out, "--steps", str(args.steps), "--threads", str(args.threads),
           "--warm-steps", str(args.warm_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {case}/{phase} failed:\n{proc.stderr[-4000:]}")
    try:
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def run(cases=("tiny", "small", "reference"), steps: int = 20, threads: int = 2,
        warm_steps: int = 600) -> list[dict]:
    from . import _table, measure_matmul_peak

    args = argparse.Namespace(steps=steps, threads=threads, warm_steps=warm_steps)
    peak = measure_matmul_peak(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            state = str(Path(tmp) / f"{case}.pt")
            rows.append(_run_worker(case, "early", state, args))
            warm = _run_worker(case, "warm", state, args)
            print(f"[{case}] warm-up: {warm_steps} steps of {WARM_BATCH} tokens in "
                  f"{warm['seconds']:.0f} s -> L0 {warm['l0']:.1f}, FVU {warm['fvu']:.3f}", flush=True)
            dense = _run_worker(case, "dense", state, args)
            trained = _run_worker(case, "trained", state, args)
            dense["regime"], trained["regime"] = "trained, dense path", "trained, sparse path"
            trained["speedup"] = trained["tokens_per_s_median"] / dense["tokens_per_s_median"]
            trained["max_rel_grad_diff"] = dense["max_rel_grad_diff"]
            rows += [dense, trained]
    # measured again after the runs, keeping the best (other work can only lower it)
    peak = max(peak, measure_matmul_peak(threads))
    for r in rows:
        rate = r["flops_per_token"] * r["tokens_per_s_median"]
        r["gflops"] = rate / 1e9
        r["peak_fraction"] = rate / 1e9 / peak
        r.setdefault("loop_tokens_per_s", float("nan"))
    print(f"\nmatmul peak: {peak:.1f} GFLOP/s (float32 GEMM, {threads} threads, best of several)")
    print(_table(rows, [
        ("case", "case", "s"), ("regime", "regime", "s"), ("n_layers", "L", "d"),
        ("d_model", "d", "d"), ("features", "F", "d"), ("batch", "batch", "d"),
        ("l0", "L0", ".1f"), ("fvu", "FVU", ".3f"), ("ms_median", "ms/step", ".1f"),
        ("tokens_per_s_median", "tok/s (median)", ",.0f"), ("tokens_per_s_best", "tok/s (best)", ",.0f"),
        ("loop_tokens_per_s", "train_clt tok/s", ",.0f"),
        ("gflops", "dense-eq GFLOP/s", ".1f"), ("peak_fraction", "of peak", ".0%"),
        ("peak_rss_mb", "peak RSS MiB", ".0f"), ("train_mem_mb", "step mem MiB", ".0f")]))
    for r in rows:
        if "speedup" in r:
            print(f"[{r['case']}] sparse vs dense path at the same trained state: "
                  f"{r['speedup']:.1f}x faster; max relative gradient difference "
                  f"{r['max_rel_grad_diff']:.1e}")
    return rows


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(prog="python -m mlclt_utils.bench clt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,small,reference")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm-steps", type=int, default=600)
    parser.add_argument("--full-run", type=int, default=0, metavar="TOKENS",
                        help="also train the reference shape from scratch on this many tokens")
    parser.add_argument("--compare-dense", action="store_true",
                        help="with --full-run: repeat it with the dense path")
    parser.add_argument("--peer", action="store_true",
                        help="also time decode-clt's training step side by side (reference shape, early)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--state", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.phase = args.worker
        Path(args.out).write_text(json.dumps(_worker(args)))
        return None
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    rows = run(cases, args.steps, args.threads, args.warm_steps) if cases else []
    if args.full_run:
        paths = [None, False] if args.compare_dense else [None]
        for sparse in paths:
            r = full_run(args.full_run, args.threads, sparse)
            print(f"full run, reference shape, {r['path']} path: {r['tokens']:,} tokens in "
                  f"{r['seconds']:.0f} s = {r['tokens_per_s']:,.0f} tokens/s; held-out FVU per layer "
                  f"{[round(v, 3) for v in r['fvu']]}, L0 per layer {[round(v, 1) for v in r['l0']]}",
                  flush=True)
            rows.append({"full_run": True, **r})
    if args.peer:
        rows.append(peer_run(args.threads, args.steps))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()  # the benchmark's worker processes start here

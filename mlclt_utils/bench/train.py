"""Model training speed, measured against this machine's own matmul peak
(``python -m mlclt_utils.bench train``).

The training benchmark runs the same step function as ``models.train_model`` on random
tokens, at the model sizes of the presets, and reports tokens/s, achieved GFLOP/s and
the fraction of the matmul peak measured in the same run. The ``ceiling`` column is the
speed the step would reach if every FLOP ran at that peak: no change of kernels can go
beyond it, only a change of the work (fewer FLOPs per token, lower precision).

Paths: ``before`` is the training step as it was before the lean forward: TransformerLens'
hooked forward, the tanh GELU kernel, and validation over the whole batch's logits in
16,384-token batches, in float32. ``hooked`` is the hooked forward with today's model (exact
GELU) and validation, ``lean`` the default (``models.train.lean_residual``) in the precision
``device.training_precision`` picks (bfloat16 autocast on a CPU with native bfloat16),
``lean+fp32`` the same in float32, ``lean+compile`` the lean forward under
``torch.compile``. The validation column is the share of the wall time
that validation takes at the preset's ``eval_every`` and ``eval_tokens_per_language``.
"""

from __future__ import annotations

import time

import torch

from . import _sync, _table, _threads, available_cores, measure_matmul_peak

from ..device import FLOAT32, training_precision
from ..models import train as training_lib
from ..models.config import build_model, model_config
from ..tokenizer import BOS_ID
from ..presets import load_preset


def train_flops_per_token(cfg) -> float:
    """Training FLOPs per token of a GPT-2 style model.

    Forward plus backward costs three forward passes; a multiply-add is 2 FLOPs:
      6 * N                              N = non-embedding weight matrices
                                         (attention Q, K, V, O and MLP in/out: cfg.n_params)
      + 12 * n_layers * n_ctx * d_model  attention scores Q·K and the weighted sum of V
                                         (the full n_ctx x n_ctx square, as computed)
      + 6 * d_model * d_vocab            unembedding
    Embedding look-ups, LayerNorm, GELU, softmax and biases are left out (small).
    """
    return (6 * cfg.n_params + 12 * cfg.n_layers * cfg.n_ctx * cfg.d_model
            + 6 * cfg.d_model * cfg.d_vocab)


PATHS = ("before", "hooked", "lean", "lean+fp32", "lean+compile")


def benchmark_training(preset_name: str, size_name: str, steps: int = 20, warmup: int = 3,
                       threads: int | None = None, device: str = "cpu",
                       batch_size: int | None = None, path: str = "lean") -> dict:
    """Time ``steps`` training steps (after ``warmup``) of one preset size on random tokens;
    speeds use the median step time. ``path``: one of ``PATHS`` (a compilation happens in
    the warm-up steps)."""
    if path not in PATHS:
        raise ValueError(f"path {path!r} is not one of {PATHS}")
    preset = load_preset(preset_name)
    sizes = preset["models"]["sizes"]
    if size_name not in sizes:
        raise ValueError(f"preset {preset_name!r} has no size {size_name!r}; sizes: {sorted(sizes)}")
    n_ctx, vocab = preset["models"]["n_ctx"], preset["tokenizer"]["vocab_size"]
    training = preset["training"]
    batch = batch_size or training["batch_size"]
    dev = torch.device(device)
    with _threads(threads):
        cfg = model_config(sizes[size_name], n_ctx, vocab, seed=0,
                           **({"act_fn": "gelu_pytorch_tanh"} if path == "before" else {}))
        model = build_model(cfg)
        model.to(dev, print_details=False)
        training_lib.freeze_key_biases(model)
        optimizer = training_lib.make_optimizer(model, training["lr"], training["weight_decay"])
        params = [p for p in model.parameters() if p.requires_grad]
        net = training_lib.TrainingLoss(model, compile=path.endswith("+compile"),
                                        lean=path.startswith("lean"))
        g = torch.Generator().manual_seed(0)
        pool = torch.randint(5, vocab, (8, batch, n_ctx), generator=g)
        pool[:, :, 0] = BOS_ID
        pool = pool.to(dev)
        precision = (FLOAT32 if path in ("before", "lean+fp32")
                     else training_precision(dev, bool(training.get("mixed_precision", True))))
        scaler = precision.make_scaler(dev.type)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = training_lib.train_step(net, optimizer, params, pool[i % 8], training["lr"],
                                     training["grad_clip"], precision, scaler)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        # validation as train_model runs it: every language's evaluation rows, every
        # eval_every steps; its cost is reported as a share of those steps' time
        eval_rows = max(1, -(-training["eval_tokens_per_language"] // n_ctx))
        languages = len(preset["corpus"]["languages"])
        evals = {f"l{i}": pool[i % 8][:1].expand(eval_rows, n_ctx) for i in range(languages)}
        t0 = time.perf_counter()
        if path == "before":
            training_lib.eval_loss_per_language(model, evals, max(1, 16384 // n_ctx), lean=False)
        else:
            training_lib.eval_loss_per_language(model, evals, max(1, training_lib.EVAL_BATCH_TOKENS // n_ctx))
        _sync(dev)
        eval_seconds = time.perf_counter() - t0
        threads_used = torch.get_num_threads()
    # the median step: robust to other work on a shared machine
    seconds = sorted(times)[len(times) // 2] * steps
    tokens = steps * batch * n_ctx
    flops = train_flops_per_token(cfg) * tokens
    return {"preset": preset_name, "size": size_name, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "params_nonemb": cfg.n_params, "d_vocab": vocab,
            "n_ctx": n_ctx, "batch_size": batch, "steps": steps, "threads": threads_used,
            "path": path, "precision": precision.name,
            "validation_share": eval_seconds / (eval_seconds + training["eval_every"] * seconds / steps),
            "ms_per_step": 1000 * seconds / steps, "tokens_per_s": tokens / seconds,
            "gflop_per_s": flops / seconds / 1e9, "final_loss": float(loss)}


def run_train_benchmark(presets=("tiny", "small"), sizes=None, steps: int = 20, warmup: int = 3,
                        threads: int | None = None, device: str = "cpu",
                        paths: tuple[str, ...] = ("before", "lean+fp32", "lean"), batch_size: int | None = None
                        ) -> list[dict]:
    """Benchmark every size of each preset (or only ``sizes``), once per entry of ``paths``,
    side by side (the ratio column is each row's speed over the first path's at the same
    size), print a table, return the rows."""
    threads = threads or (available_cores() if device == "cpu" else None)
    peak = measure_matmul_peak(threads, device=device)
    rows = []
    for name in presets:
        for size in (sizes or load_preset(name)["models"]["sizes"]):
            first = None
            for path in paths:
                row = benchmark_training(name, size, steps, warmup, threads, device, batch_size, path)
                first = first or row
                row["speedup"] = row["tokens_per_s"] / first["tokens_per_s"]
                rows.append(row)
    # measured again after the runs, keeping the best: other work on a shared machine
    # can only lower a measurement
    peak = max(peak, measure_matmul_peak(threads, device=device))
    for row in rows:
        row["peak_gflop_per_s"] = peak
        row["peak_fraction"] = row["gflop_per_s"] / peak
        row["ceiling_tokens_per_s"] = row["tokens_per_s"] / row["peak_fraction"]
    print(f"measured matmul peak: {peak:.1f} GFLOP/s (float32, {threads or 'default'} threads, "
          f"device {device})")
    print(_table(rows, [("preset", "preset", "s"), ("size", "size", "s"), ("n_layers", "layers", "d"),
                        ("d_model", "d_model", "d"), ("params_nonemb", "params(non-emb)", ","),
                        ("d_vocab", "vocab", "d"), ("n_ctx", "n_ctx", "d"),
                        ("batch_size", "batch", "d"), ("path", "path", "s"), ("precision", "precision", "s"), ("ms_per_step", "ms/step", ".1f"),
                        ("tokens_per_s", "tokens/s", ",.0f"), ("speedup", "ratio", ".2f"),
                        ("gflop_per_s", "GFLOP/s", ".2f"), ("peak_fraction", "of peak", ".1%"),
                        ("ceiling_tokens_per_s", "ceiling tok/s", ",.0f"),
                        ("validation_share", "validation", ".1%")]))
    return rows

"""Model training speed, measured against this machine's own matmul peak
(``python -m mlclt_utils.bench train``).

The training benchmark runs the same step function as ``models.train_model`` on random
tokens, at the model sizes of the presets, and reports tokens/s, achieved GFLOP/s and
the fraction of the matmul peak measured in the same run.
"""

from __future__ import annotations

import time

import torch

from . import _sync, _table, _threads, available_cores, measure_matmul_peak

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


def benchmark_training(preset_name: str, size_name: str, steps: int = 20, warmup: int = 3,
                       threads: int | None = None, device: str = "cpu",
                       batch_size: int | None = None, compile: bool = False) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of one preset size on random tokens;
    speeds use the median step time. ``compile``: the blocks through ``torch.compile``
    (``training.compile``); its compilation happens in the warm-up steps."""
    preset = load_preset(preset_name)
    sizes = preset["models"]["sizes"]
    if size_name not in sizes:
        raise ValueError(f"preset {preset_name!r} has no size {size_name!r}; sizes: {sorted(sizes)}")
    n_ctx, vocab = preset["models"]["n_ctx"], preset["tokenizer"]["vocab_size"]
    training = preset["training"]
    batch = batch_size or training["batch_size"]
    dev = torch.device(device)
    with _threads(threads):
        cfg = model_config(sizes[size_name], n_ctx, vocab, seed=0)
        model = build_model(cfg)
        model.to(dev, print_details=False)
        training_lib.freeze_key_biases(model)
        optimizer = training_lib.make_optimizer(model, training["lr"], training["weight_decay"])
        params = [p for p in model.parameters() if p.requires_grad]
        net = training_lib.TrainingLoss(model, compile=compile)
        g = torch.Generator().manual_seed(0)
        pool = torch.randint(5, vocab, (8, batch, n_ctx), generator=g)
        pool[:, :, 0] = BOS_ID
        pool = pool.to(dev)
        bf16 = dev.type == "cuda" and training.get("bf16_on_gpu", True)
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            loss = training_lib.train_step(net, optimizer, params, pool[i % 8], training["lr"],
                                     training["grad_clip"], bf16)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        threads_used = torch.get_num_threads()
    # the median step: robust to other work on a shared machine
    seconds = sorted(times)[len(times) // 2] * steps
    tokens = steps * batch * n_ctx
    flops = train_flops_per_token(cfg) * tokens
    return {"preset": preset_name, "size": size_name, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "params_nonemb": cfg.n_params, "d_vocab": vocab,
            "n_ctx": n_ctx, "batch_size": batch, "steps": steps, "threads": threads_used,
            "compile": compile, "ms_per_step": 1000 * seconds / steps, "tokens_per_s": tokens / seconds,
            "gflop_per_s": flops / seconds / 1e9, "final_loss": float(loss)}


def run_train_benchmark(presets=("tiny", "small"), sizes=None, steps: int = 20, warmup: int = 3,
                        threads: int | None = None, device: str = "cpu",
                        variants: tuple[bool, ...] = (False,), batch_size: int | None = None) -> list[dict]:
    """Benchmark every size of each preset (or only ``sizes``), once per entry of
    ``variants`` (False: eager, True: ``torch.compile``) side by side, print a table, return
    the rows."""
    threads = threads or (available_cores() if device == "cpu" else None)
    peak = measure_matmul_peak(threads, device=device)
    rows = []
    for name in presets:
        for size in (sizes or load_preset(name)["models"]["sizes"]):
            for compiled in variants:
                rows.append(benchmark_training(name, size, steps, warmup, threads, device, batch_size,
                                               compile=compiled))
    # measured again after the runs, keeping the best: other work on a shared machine
    # can only lower a measurement
    peak = max(peak, measure_matmul_peak(threads, device=device))
    for row in rows:
        row["peak_gflop_per_s"] = peak
        row["peak_fraction"] = row["gflop_per_s"] / peak
    print(f"measured matmul peak: {peak:.1f} GFLOP/s (float32, {threads or 'default'} threads, "
          f"device {device})")
    print(_table(rows, [("preset", "preset", "s"), ("size", "size", "s"), ("n_layers", "layers", "d"),
                        ("d_model", "d_model", "d"), ("params_nonemb", "params(non-emb)", ","),
                        ("d_vocab", "vocab", "d"), ("n_ctx", "n_ctx", "d"),
                        ("batch_size", "batch", "d"), ("compile", "compiled", ""), ("ms_per_step", "ms/step", ".1f"),
                        ("tokens_per_s", "tokens/s", ",.0f"), ("gflop_per_s", "GFLOP/s", ".2f"),
                        ("peak_fraction", "of peak", ".1%")]))
    return rows

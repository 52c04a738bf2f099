"""The check a GPU machine runs (``.ci/gpu-check``; ``--device cpu`` is a dry run here).

1. the device tests (``tests/test_device.py``: one step of each training kind and one
   attribution graph, on every device the machine has) and the attribution tests;
2. the ``tiny`` chain, chapters 01-04, on the device;
3. training speed and peak memory at the ``colab`` preset's shapes (models and CLTs);
4. the ``colab`` preset's chapters 01-02 with a short token budget;
5. a projection of the ``colab`` book's training time from those figures, against the
   2-hour budget of one 16 GB GPU. Chapters that train nothing are not projected: the
   short run's own times for them are printed instead.

Everything is timed with the device synchronised; peak memory is
``torch.cuda.max_memory_allocated`` (0 on the CPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import _sync, _table

REPO = Path(__file__).resolve().parents[2]
BUDGET_SECONDS = 2 * 3600


def _peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _run(cmd: list[str], env: dict, label: str) -> float:
    print(f"\n== {label}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, cwd=REPO, check=True)
    seconds = time.time() - t0
    print(f"== {label}: {seconds:.0f} s", flush=True)
    return seconds


def clt_speed(preset_name: str, size_name: str, device: torch.device, steps: int = 10) -> dict:
    """Tokens/s of ``train_clt`` at the preset's CLT shape for one model size, on random
    activations held on the device."""
    from ..clt.activations import TensorSource
    from ..clt.model import CLTConfig, CrossLayerTranscoder
    from ..clt.train import train_clt
    from ..presets import load_preset

    preset = load_preset(preset_name)
    size, cfg = preset["models"]["sizes"][size_name], dict(preset["clt"])
    L, d, F = size["n_layers"], size["d_model"], cfg["features_per_layer"]
    n = 2 * cfg["batch_tokens"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, L, d, generator=g).to(device)
    y = torch.randn(n, L, d, generator=g).to(device)
    clt = CrossLayerTranscoder(CLTConfig(L, d, F), generator=g).to(device)
    _reset_peak(device)
    train_clt(clt, TensorSource(x, y, cfg["batch_tokens"]), cfg["batch_tokens"] * 2, cfg,
              device=device, progress=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    train_clt(clt, TensorSource(x, y, cfg["batch_tokens"]), cfg["batch_tokens"] * steps, cfg,
              device=device, progress=False)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"kind": "clt", "size": size_name, "tokens_per_s": cfg["batch_tokens"] * steps / seconds,
            "peak_gib": _peak_memory(device)}


def model_speed(preset_name: str, size_name: str, device: torch.device, steps: int = 10) -> dict:
    from .train import benchmark_training

    _reset_peak(device)
    row = benchmark_training(preset_name, size_name, steps=steps, warmup=2, device=str(device))
    return {"kind": "model", "size": size_name, "tokens_per_s": row["tokens_per_s"],
            "peak_gib": _peak_memory(device), "precision": row["precision"]}


def projection(preset_name: str, speeds: list[dict]) -> list[dict]:
    """Seconds of training the preset asks for, from measured tokens/s: every model of
    chapter 02 and a CLT per model in chapter 03 (chapter 03's extra top-k and per-layer
    transcoders of the reference model, and the models of chapters 08-09, are not counted)."""
    from ..models.config import parse_model_name
    from ..presets import load_preset, model_names

    preset = load_preset(preset_name)
    speed = {(r["kind"], r["size"]): r["tokens_per_s"] for r in speeds}
    rows = []
    for name in model_names(preset):
        size = parse_model_name(name)[0]
        rows.append({"chapter": "02", "what": f"train {name}",
                     "seconds": preset["training"]["tokens"] / speed[("model", size)]})
        rows.append({"chapter": "03", "what": f"CLT of {name}",
                     "seconds": preset["clt"]["train_tokens"] / speed[("clt", size)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlclt_utils.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=["cuda", "cpu"], help="cpu: a dry run (hides any GPU from the chapters)")
    ap.add_argument("--tokens", type=int, default=2_000_000,
                    help="training tokens per model of the short colab run (chapter 02)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each speed measurement")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "tiny", "speed", "colab"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ERROR: --device cuda but no GPU is visible; use --device cpu for a dry run", file=sys.stderr)
        return 2
    env = dict(os.environ, MLCLT_PLAIN_PROGRESS="1")
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the chapters pick the GPU when they see one
    from ..device import describe_device

    print(f"gpu-check on {describe_device(device)}", flush=True)
    times = {}
    if "tests" not in args.skip:
        times["tests"] = _run([sys.executable, "-m", "pytest", "-q", "tests/test_device.py",
                               "tests/test_graphs.py"], env, "device tests")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if "tiny" not in args.skip:
            times["tiny 01-04"] = _run([sys.executable, "-m", "mlclt_utils.runner", "--preset", "tiny",
                                        "--no-build", "--chapters", "01", "02", "03", "04"],
                                       dict(env, MLCLT_ARTIFACTS=f"{tmp}/tiny"), "tiny chain")
        speeds = []
        if "speed" not in args.skip:
            from ..presets import load_preset

            for size in load_preset("colab")["models"]["sizes"]:
                speeds.append(model_speed("colab", size, device, args.steps))
                speeds.append(clt_speed("colab", size, device, args.steps))
            print("\nspeed at the colab preset's shapes")
            print(_table(speeds, [("kind", "kind", "s"), ("size", "size", "s"),
                                  ("tokens_per_s", "tokens/s", ",.0f"), ("peak_gib", "peak GiB", ".2f")]))
        if "colab" not in args.skip:
            times["colab 01-02 (short)"] = _run(
                [sys.executable, "-m", "mlclt_utils.runner", "--preset", "colab", "--no-build",
                 "--chapters", "01", "02", "--param", f"training.tokens={args.tokens}"],
                dict(env, MLCLT_ARTIFACTS=f"{tmp}/colab"), "colab chapters 01-02, short")
    print("\nwall time of each part")
    print(_table([{"part": k, "seconds": v} for k, v in times.items()],
                 [("part", "part", "s"), ("seconds", "seconds", ",.0f")]))
    if speeds:
        rows = projection("colab", speeds)
        total = sum(r["seconds"] for r in rows)
        print("\nprojected training time of the colab book (chapters 02-03 at full budget)")
        print(_table(rows, [("chapter", "chapter", "s"), ("what", "what", "s"), ("seconds", "seconds", ",.0f")]))
        print(f"total {total / 60:.0f} min of the {BUDGET_SECONDS // 60}-min budget "
              f"({'within' if total <= BUDGET_SECONDS else 'OVER'}); chapters 04-11 are not projected")
    return 0


if __name__ == "__main__":
    sys.exit(main())

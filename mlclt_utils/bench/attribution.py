"""Attribution-graph benchmark: seconds and peak memory per graph at a preset's shape.

    python -m mlclt_utils.bench attribution [--presets tiny small] [--tokens 32]

For each preset, a model of its main size and a CLT of its width with random weights (the
JumpReLU thresholds set so that about ``--l0`` features per token and layer fire, as in a
trained CLT), one prompt of ``--tokens`` random tokens, and circuit-tracer's ``attribute``
with two source-node batch sizes (circuit-tracer attributes one prompt per call; its batching
is over the source nodes of one graph). A single prompt is timed with the replacement model
built for it; a batch of ``--repeats`` prompts runs through one model, as chapter 06 does. Each configuration runs in a fresh process so that
its peak resident memory is its own; the model's plain forward pass on the same prompt is
timed for scale.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _word_tokenizer(vocab: int):
    """A word-level tokenizer over ids 0..vocab-1 with the project's special ids: circuit-tracer
    needs one to name the target, and a benchmark on random weights has no trained one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..tokenizer import SPECIAL_IDS

    special = {i: name for name, i in SPECIAL_IDS.items()}
    words = {special.get(i, f"w{i}"): i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _one(preset_name: str, batch_size: int, tokens: int, l0: float, repeats: int) -> dict:
    import warnings

    from ..clt.model import CLTConfig, CrossLayerTranscoder
    from ..graphs.attribution import graph_for_prompt
    from ..graphs.circuit_tracer import build_replacement_model
    from ..models.config import build_model, model_config
    from ..presets import load_preset
    from ..tokenizer import BOS_ID

    warnings.filterwarnings("ignore")
    preset = load_preset(preset_name)
    size = preset["models"]["sizes"][preset["models"]["main_size"]]
    vocab = preset["tokenizer"]["vocab_size"]
    cfg = model_config(size, preset["models"]["n_ctx"], vocab, seed=0)
    model = build_model(cfg).eval()
    F = preset["clt"]["features_per_layer"]
    g = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, d_features=F),
                               generator=g).eval()
    prompt = torch.randint(5, vocab, (min(tokens, cfg.n_ctx),), generator=g)
    prompt[0] = BOS_ID
    with torch.no_grad():
        names = [f"blocks.{l}.ln2.hook_normalized" for l in range(cfg.n_layers)]
        _, cache = model.run_with_cache(prompt[None], names_filter=names)
        for l in range(cfg.n_layers):
            h = cache[names[l]][0] @ clt.W_enc[l] + clt.b_enc[l]
            q = 1 - l0 / F
            clt.log_threshold[l].copy_(torch.quantile(h.flatten(), q).clamp(min=1e-3).log())
    tokenizer = _word_tokenizer(vocab)
    # one prompt on its own: the replacement model is built for it
    t0 = time.perf_counter()
    rm = build_replacement_model(model, clt, tokenizer=tokenizer)
    graph_for_prompt(rm, prompt, target=int(prompt[-1]), batch_size=batch_size)
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(repeats):
            model(prompt[None])
    forward = (time.perf_counter() - t0) / repeats
    # a batch of prompts through the one replacement model (how chapter 06 runs them):
    # circuit-tracer attributes one prompt per call, so the batch shares only the model
    prompts = [torch.cat([prompt[:1], torch.randint(5, vocab, (prompt.numel() - 1,), generator=g)])
               for _ in range(repeats)]
    times, graph = [], None
    for p in prompts:
        t0 = time.perf_counter()
        graph = graph_for_prompt(rm, p, target=int(p[-1]), batch_size=batch_size)
        times.append(time.perf_counter() - t0)
    return {"preset": preset_name, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "features": F,
            "tokens": int(prompt.numel()), "batch_size": batch_size,
            "active_features": int(graph.active_features.shape[0]),
            "seconds_single": single, "seconds_per_graph": sorted(times)[len(times) // 2],
            "forward_seconds": forward,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mlclt_utils.bench attribution", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--l0", type=float, default=15.0, help="active features per token and layer")
    ap.add_argument("--repeats", type=int, default=8, help="prompts in the batch")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.one:
        print(json.dumps(_one(opts.presets[0], opts.batch_sizes[0], opts.tokens, opts.l0, opts.repeats)))
        return
    print(f"{'preset':8s} {'layers':>6s} {'d':>5s} {'features':>8s} {'tokens':>6s} {'batch':>5s} "
          f"{'active':>7s} {'single s':>8s} {'s/graph':>8s} {'forward s':>9s} {'peak MB':>8s}")
    print("(single: one prompt, replacement model built for it; s/graph: median over a batch of "
          "prompts through one model)")
    for preset in opts.presets:
        for bs in opts.batch_sizes:
            done = subprocess.run([sys.executable, "-m", "mlclt_utils.bench", "attribution", "--one",
                                   "--presets", preset, "--batch-sizes", str(bs), "--tokens", str(opts.tokens),
                                   "--l0", str(opts.l0), "--repeats", str(opts.repeats)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{preset} batch {bs}: failed\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{r['preset']:8s} {r['n_layers']:6d} {r['d_model']:5d} {r['features']:8d} {r['tokens']:6d} "
                  f"{r['batch_size']:5d} {r['active_features']:7d} {r['seconds_single']:8.2f} "
                  f"{r['seconds_per_graph']:8.2f} "
                  f"{r['forward_seconds']:9.4f} {r['peak_rss_mb']:8.0f}")


if __name__ == "__main__":
    main()

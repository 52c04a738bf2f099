"""SAE training benchmark: tokens per second at a preset's bilingual shape.

    python -m mlclt_utils.bench sae [--presets tiny small] [--threads 2]

For each preset and bilingual model size: a model with random weights, random token rows,
and the preset's SAE settings (``bilingual.sae_*``) at the first, middle and last layer.

* **book**: ``sae.train.train_saes``, the path chapter 09 uses: SAELens's
  ``MultiSAETrainer`` fed by one model forward per batch of rows for all three layers;
* **SAELens, one SAE at a time**: SAELens's ``SAETrainer`` on the same number of tokens per
  layer, from activations collected beforehand (the collection is timed apart), one SAE
  after the other: what training the three SAEs with SAELens's single-SAE trainer costs.

Throughput is SAE training tokens per second summed over the three SAEs.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from unittest import mock

import torch


def run(presets, threads: int | None) -> None:
    from ..models.config import build_model, model_config
    from ..presets import bilingual_preset, load_preset
    from ..sae.dynamics import sae_layers, training_config
    from ..sae.train import _training_sae, hook_name, stream_activations, train_saes, trainer_config
    from ..tokenizer import BOS_ID
    from sae_lens.training import sae_trainer
    from sae_lens.training.sae_trainer import SAETrainer

    if threads:
        torch.set_num_threads(threads)
    print(f"{'preset':7s} {'size':4s} {'d_model':>7s} {'d_sae':>6s} {'k':>3s} {'tokens/SAE':>10s} "
          f"{'book tok/s':>10s} {'SAELens tok/s':>13s} {'collect s':>9s}")
    for name in presets:
        cfg = bilingual_preset(load_preset(name))
        bi = cfg["bilingual"]
        n_ctx, vocab = cfg["models"]["n_ctx"], cfg["tokenizer"]["vocab_size"]
        for size_name, size in bi["sizes"].items():
            model = build_model(model_config(size, n_ctx, vocab, seed=0)).eval()
            rows = torch.randint(5, vocab, (512, n_ctx), generator=torch.Generator().manual_seed(0))
            rows[:, 0] = BOS_ID
            scfg = training_config(bi, size["d_model"], seed=0)
            layers = sae_layers(size["n_layers"])
            t = time.perf_counter()
            train_saes(model, rows, layers, scfg, progress=False)
            book = len(layers) * scfg.train_tokens / (time.perf_counter() - t)

            t = time.perf_counter()
            acts = {l: [] for l in layers}
            n = 0
            while n < scfg.train_tokens + scfg.batch_tokens:
                for batch in stream_activations(model, rows, layers, scfg.model_batch_rows):
                    for l in layers:
                        acts[l].append(batch[hook_name(l)])
                    n += batch[hook_name(layers[0])].shape[0]
                    if n >= scfg.train_tokens + scfg.batch_tokens:
                        break
            collect = time.perf_counter() - t
            spent = 0.0
            for l in layers:
                data = torch.cat(acts[l])
                batches = iter(data[i:i + scfg.batch_tokens]
                               for i in range(0, data.shape[0] - scfg.batch_tokens + 1, scfg.batch_tokens))
                torch.manual_seed(0)
                sae = _training_sae(size["d_model"], scfg, l, model, n_ctx, "cpu")
                trainer = SAETrainer(cfg=trainer_config(scfg), sae=sae, data_provider=batches)
                t = time.perf_counter()
                with mock.patch.object(sae_trainer, "tqdm", partial(sae_trainer.tqdm, disable=True)):
                    trainer.fit()
                spent += time.perf_counter() - t
            single = len(layers) * scfg.train_tokens / spent
            print(f"{name:7s} {size_name:4s} {size['d_model']:7d} {scfg.d_sae:6d} {scfg.k:3d} "
                  f"{scfg.train_tokens:10,d} {book:10,.0f} {single:13,.0f} {collect:9.1f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mlclt_utils.bench sae", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    run(args.presets, args.threads)

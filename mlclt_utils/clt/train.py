"""Training of cross-layer transcoders: the loop, its resume state, and the stage builder.

``train_clt`` runs Adam on ``CrossLayerTranscoder.loss`` with the sparsity coefficient
lambda ramped linearly from 0 to ``lambda_max`` over ``lambda_warmup_fraction`` of the
steps. The same code runs in one process or under ``torchrun`` (data parallel): every rank
reads the same global batch ``source.batch(t)`` and takes its own slice of it; gradients
(and feature firing counts) are summed across ranks with one all-reduce per step and
divided by the number of ranks, which gives the gradient of the mean over the global
batch. The gradients are all-reduced by hand instead of through DistributedDataParallel
because the sparse path builds its own autograd graph per step (index tensors of varying
size, parameters used through custom Functions), which DDP's bucketing does not need.
Only rank 0 writes files; every rank agrees on when to stop (``distributed.all_agree``).

Files written into the stage folder: ``metrics.jsonl`` (one row per logging interval),
``checkpoints/step_*.safetensors`` and ``resume.pt`` (loaded with ``weights_only=True``),
from which an interrupted run continues and ends where an uninterrupted one would.

Command line (works under torchrun):

    python -m mlclt_utils.clt.train --run-name tiny --model s-en50 --preset tiny [--per-layer]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Mapping

import torch

from .. import distributed
from ..artifacts import Stage, atomic_path, config_hash, read_json, read_jsonl, save_tensors, write_json
from ..presets import parse_override
from .model import ACTIVATIONS, CLTConfig, CrossLayerTranscoder

REQUIRED_KEYS = ("batch_tokens", "lr", "lambda_max", "lambda_warmup_fraction", "tanh_c",
                 "preact_coeff")
SCALE_BATCHES = 4           # batches used to estimate the normalisation scales


def lambda_at(step: int, n_steps: int, lambda_max: float, warmup_fraction: float) -> float:
    """Sparsity coefficient of update ``step`` (0-based): linear from 0 to lambda_max over
    the first ``warmup_fraction`` of the steps, then constant."""
    warm = warmup_fraction * n_steps
    if warm <= 0:
        return float(lambda_max)
    return float(lambda_max) * min(1.0, step / warm)


def checkpoint_steps(n_steps: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced steps (counted in updates done) that get a checkpoint; the last is n_steps."""
    n = max(1, int(n_checkpoints))
    return sorted({max(1, round(n_steps * (i + 1) / n)) for i in range(n)})


def checkpoint_name(step: int) -> str:
    return f"checkpoints/step_{step:07d}.safetensors"


def make_optimizer(clt: CrossLayerTranscoder, lr: float) -> torch.optim.Adam:
    """Adam; the fused kernel where torch has one for the parameters' device (fewer passes
    over the weights per step), else the default."""
    params = list(clt.parameters())
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def compute_step(clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                 y: torch.Tensor, lam: float, cfg: Mapping[str, Any], sparse: bool | None = None) -> dict:
    """Loss and gradients of one (local) batch; the caller all-reduces and steps."""
    out = clt.loss(x, y, lam, tanh_c=cfg["tanh_c"], preact_coeff=cfg["preact_coeff"], sparse=sparse)
    optimizer.zero_grad(set_to_none=True)
    out["total"].backward()
    return out


def _check_cfg(cfg: Mapping[str, Any]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"the CLT training config lacks {missing}; pass the preset's 'clt' section")



def _all_reduce_grads(params: list[torch.nn.Parameter], extra: torch.Tensor, world: int) -> torch.Tensor:
    """Average the gradients over ranks and sum ``extra`` (one all-reduce); returns the summed extra."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(-1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g)).div_(world)
        i += n
    return flat[i:].view_as(extra).to(extra.dtype)


def train_clt(clt: CrossLayerTranscoder, source, n_tokens: int, cfg: Mapping[str, Any],
              stage: Stage | None = None, seed: int = 0, device: str | torch.device = "cpu",
              progress: bool = True, max_steps_this_call: int | None = None,
              log_every: int | None = None, max_seconds: float | None = None,
              sparse: bool | None = None) -> dict:
    """Train ``clt`` in place on ``n_tokens`` tokens of ``source`` (anything with
    ``batch(t) -> (x, y)`` of ``cfg["batch_tokens"]`` rows, e.g. ``ActivationBuffer``).

    ``cfg``: the preset's ``clt`` section (batch_tokens, lr, lambda_max,
    lambda_warmup_fraction, tanh_c, preact_coeff, n_checkpoints, dead_window_tokens).
    ``stage``: where metrics, checkpoints and the resume state go (None: nothing is
    written and nothing resumed). The scales are set from the first batches when training
    starts (they are buffers of the CLT, so checkpoints and the resume state keep them).
    ``max_steps_this_call`` / ``max_seconds``: return early (as if interrupted) after that
    many updates / seconds, after saving the resume state. ``sparse``: passed to
    ``CrossLayerTranscoder.loss`` (None: the fast path where it applies).

    Returns a summary: completed, step, n_steps, resumed_from, tokens, seconds,
    tokens_per_second and the last metrics row.
    """
    _check_cfg(cfg)
    info = distributed.current()
    device = torch.device(device)
    clt.to(device)
    B = int(cfg["batch_tokens"])
    n_steps = int(n_tokens) // B
    if n_steps < 1:
        raise ValueError(f"{n_tokens} training tokens are less than one batch of {B}")
    local = distributed.rank_slice(B, info)
    n_local = local.stop - local.start
    L, F = clt.cfg.n_layers, clt.cfg.d_features
    ckpts = set(checkpoint_steps(n_steps, cfg.get("n_checkpoints", 1)))
    log_every = int(log_every or max(1, n_steps // 100))
    dead_window = int(cfg.get("dead_window_tokens", 100_000))
    optimizer = make_optimizer(clt, cfg["lr"])
    params = list(clt.parameters())
    fingerprint = source.fingerprint() if hasattr(source, "fingerprint") else None
    key = config_hash({"clt": clt.cfg.to_dict(), "train": dict(cfg), "n_tokens": int(n_tokens),
                       "seed": seed, "source": fingerprint})
    folder = stage.path if stage is not None else None
    resume_path = folder / "resume.pt" if folder is not None else None
    metrics_path = folder / "metrics.jsonl" if folder is not None else None

    # ------------------------------------------------------------ state -------------
    start = 0
    last_fire = torch.zeros(L, F, dtype=torch.int64)          # tokens seen at the last firing
    acc = torch.zeros(3, L, dtype=torch.float64)               # fvu, l0, mse sums since last row
    acc_loss = torch.zeros(3, dtype=torch.float64)             # total, sparsity, preact sums
    n_acc = 0
    state = distributed.load_resume_state(resume_path, key)
    if state is not None:
        clt.load_state_dict(state["clt"])
        optimizer.load_state_dict(state["optimizer"])
        start, n_acc = int(state["step"]), int(state["n_acc"])
        last_fire, acc, acc_loss = state["last_fire"], state["acc"], state["acc_loss"]
    else:
        # normalisation scales from the first global batches (the same on every rank)
        xs, ys = zip(*(source.batch(t) for t in range(min(SCALE_BATCHES, n_steps))))
        clt.set_scales_from(torch.cat(xs).to(device), torch.cat(ys).to(device))
        if info.enabled:
            import torch.distributed as dist

            for t in list(clt.parameters()) + list(clt.buffers()):
                dist.broadcast(t.data, 0)
    if info.is_main and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_jsonl(metrics_path) if state is not None and r["step"] <= start]
        with atomic_path(metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save_resume(step: int) -> None:
        if info.is_main and resume_path is not None:
            blob = {"key": key, "step": step, "n_acc": n_acc, "last_fire": last_fire, "acc": acc,
                    "acc_loss": acc_loss,
                    "clt": {k: v.detach().cpu() for k, v in clt.state_dict().items()},
                    "optimizer": optimizer.state_dict()}
            with atomic_path(resume_path) as tmp:
                torch.save(blob, tmp)

    def metrics_row(step: int, lam: float) -> dict:
        tokens = step * B
        fvu, l0, mse = (acc / max(n_acc, 1)).tolist()
        loss = (acc_loss / max(n_acc, 1)).tolist()
        since = tokens - last_fire
        if tokens >= dead_window:
            dead = (since >= dead_window).float().mean(1)
        else:
            dead = (last_fire == 0).float().mean(1)
        return {"step": step, "tokens": tokens, "lambda": lam, "loss": loss[0], "sparsity": loss[1],
                "preact": loss[2], "mse": sum(mse), "mse_per_layer": mse, "fvu": fvu, "l0": l0,
                "dead_fraction": dead.tolist(), "dead_window_tokens": dead_window}

    # ------------------------------------------------------------- loop -------------
    from tqdm.auto import tqdm

    bar = tqdm(total=n_steps, initial=start, disable=not (progress and info.is_main),
               desc="train CLT", unit="step")
    t0 = time.perf_counter()
    clt.train()
    step = start
    last_row = None
    lam = lambda_at(step, n_steps, cfg["lambda_max"], cfg["lambda_warmup_fraction"])
    stopped = False
    while step < n_steps:
        budget_out = ((max_steps_this_call is not None and step - start >= max_steps_this_call)
                      or (max_seconds is not None and time.perf_counter() - t0 > max_seconds))
        if distributed.all_agree(budget_out):
            stopped = True
            break
        x, y = source.batch(step)
        x = x[local].to(device, non_blocking=True)
        y = y[local].to(device, non_blocking=True)
        lam = lambda_at(step, n_steps, cfg["lambda_max"], cfg["lambda_warmup_fraction"])
        out = compute_step(clt, optimizer, x, y, lam, cfg, sparse=sparse)
        fire = out["fire_counts"]
        stats = torch.stack([out["fvu"], out["l0_per_layer"], out["mse_per_layer"]]).detach()
        losses = torch.stack([out["total"].detach(), out["sparsity"].detach(), out["preact"].detach()])
        if info.enabled:
            extra = torch.cat([fire.reshape(-1).to(stats.dtype), stats.reshape(-1), losses])
            extra = _all_reduce_grads(params, extra, info.world_size)
            fire = extra[:L * F].view(L, F)
            stats = extra[L * F:L * F + stats.numel()].view_as(stats) / info.world_size
            losses = extra[L * F + stats.numel():] / info.world_size
            if clt.cfg.activation == "batchtopk":
                clt.batchtopk_threshold.copy_(distributed.mean_across_ranks(clt.batchtopk_threshold))
        optimizer.step()
        step += 1
        acc += stats.to("cpu", torch.float64)
        acc_loss += losses.to("cpu", torch.float64)
        n_acc += 1
        last_fire[fire.to("cpu") > 0] = step * B
        bar.update(1)
        if step % log_every == 0 or step == n_steps or step in ckpts:
            last_row = metrics_row(step, lam)
            acc.zero_()
            acc_loss.zero_()
            n_acc = 0
            if info.is_main and metrics_path is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last_row) + "\n")
            bar.set_postfix(fvu=f"{sum(last_row['fvu']) / L:.3f}", l0=f"{sum(last_row['l0']) / L:.1f}")
        if step in ckpts and info.is_main and folder is not None:
            save_tensors(folder / checkpoint_name(step), clt.state_dict(),
                         {"step": str(step), "clt_config": json.dumps(clt.cfg.to_dict())})
            save_resume(step)
    bar.close()
    if stopped:
        save_resume(step)
    seconds = time.perf_counter() - t0
    distributed.barrier()
    clt.release_buffers()
    clt.eval()
    if last_row is None and metrics_path is not None and metrics_path.exists():
        rows = read_jsonl(metrics_path)
        last_row = rows[-1] if rows else None
    return {"completed": step >= n_steps, "step": step, "n_steps": n_steps, "resumed_from": start,
            "tokens": step * B, "seconds": seconds,
            "tokens_per_second": (step - start) * B / max(seconds, 1e-9),
            "local_batch_tokens": n_local, "final": last_row}


# ------------------------------------------------------------------------------ stage -----

def stage_name(model_name: str, cross_layer: bool = True, activation: str = "jumprelu") -> str:
    """``clt/<model>`` for the JumpReLU CLT, ``plt/<model>`` for per-layer transcoders, with
    the activation appended for the other modes (``clt-topk/<model>``)."""
    kind = "clt" if cross_layer else "plt"
    if activation != "jumprelu":
        kind += f"-{activation}"
    return f"{kind}/{model_name}"


def stage_config(preset: Mapping[str, Any], model_name: str, cross_layer: bool | None = None,
                 activation: str | None = None) -> dict:
    clt = dict(preset["clt"])
    if cross_layer is not None:
        clt["cross_layer"] = bool(cross_layer)
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        clt["activation"] = activation
    return {"model_name": model_name, "clt": clt, "seed": preset["seed"]}


def _train_tokens(loaded) -> torch.Tensor:
    """The training token rows from ``corpus.load_data_stage`` (a dict or a tuple)."""
    train = loaded["train"] if isinstance(loaded, Mapping) else loaded[0]
    return train["tokens"].long()


def build_clt_stage(preset, run: str, model_name: str, root=None, device: str | None = None,
                    cross_layer: bool | None = None, activation: str | None = None,
                    progress: bool = True, max_steps_this_call: int | None = None,
                    cache_dir=None) -> Stage:
    """Train the CLT (or, with ``cross_layer=False``, the per-layer transcoder) of model
    ``model_name`` of ``run`` into stage ``clt/<model>`` (``plt/<model>``), unless it is
    already built from the same config; an interrupted training of the same config resumes.

    Reads the model (``models.load_model``) and its mixture's training tokens
    (``corpus.load_data_stage``); records both stages as inputs in the manifest. The CLT is
    saved with ``formats.save_clt`` into the stage folder. ``cache_dir``: optional on-disk
    activation cache (see ``ActivationBuffer``).
    """
    if isinstance(preset, str):
        from ..presets import load_preset

        preset = load_preset(preset)
    config = stage_config(preset, model_name, cross_layer, activation)
    cfg = config["clt"]
    cross = cfg["cross_layer"]
    stage = Stage(run, stage_name(model_name, cross, cfg["activation"]), root)
    info = distributed.init_distributed(device)
    if not distributed.all_agree(not stage.matches(config)):
        return stage
    from ..corpus import load_data_stage
    from ..models import load_model, parse_model_name
    from ..presets import mixture_name
    from .activations import ActivationBuffer
    from .formats import save_clt

    if device is None:
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    _, share = parse_model_name(model_name)
    tokens = _train_tokens(load_data_stage(run, share, root))
    model = load_model(run, model_name, root=root, device=device)
    inputs = [Stage(run, f"models/{model_name}", root), Stage(run, f"data/{mixture_name(share)}", root)]

    marker = stage.file("in_progress.json")
    if info.is_main:
        same = marker.exists() and read_json(marker).get("config_hash") == config_hash(config)
        stage.start(clean=not same)       # keep the resume state of the same config
        write_json(marker, {"config_hash": config_hash(config), "config": config})
    distributed.barrier()

    seed = int(preset["seed"])
    source = ActivationBuffer(model, tokens, cfg["batch_tokens"], cfg["buffer_tokens"], seed=seed,
                              cache_dir=cache_dir, write_cache=info.is_main)
    clt_cfg = CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
                        d_features=cfg["features_per_layer"], activation=cfg["activation"],
                        cross_layer=cross, k=cfg["k"], threshold_init=cfg["threshold_init"],
                        bandwidth=cfg["bandwidth"])
    clt = CrossLayerTranscoder(clt_cfg, generator=torch.Generator().manual_seed(seed))
    t0 = time.time()
    summary = train_clt(clt, source, cfg["train_tokens"], cfg, stage=stage, seed=seed, device=device,
                        progress=progress, max_steps_this_call=max_steps_this_call)
    if not summary["completed"]:
        return stage
    if info.is_main:
        save_clt(clt.to("cpu"), stage.path)
        stage.finish(config, inputs=[s for s in inputs if s.is_complete()],
                     timings={"train_seconds": time.time() - t0},
                     summary={k: v for k, v in summary.items() if k != "completed"})
        marker.unlink(missing_ok=True)
        stage.file("resume.pt").unlink(missing_ok=True)
    distributed.barrier()
    return stage


def load_clt_stage(run: str, model_name: str, root=None, cross_layer: bool = True,
                   device: str = "cpu", activation: str = "jumprelu") -> CrossLayerTranscoder:
    """The trained CLT (or per-layer transcoder) of a built stage, in eval mode."""
    from .formats import load_clt

    stage = Stage(run, stage_name(model_name, cross_layer, activation), root)
    stage.require()
    return load_clt(stage.path, device=device)


def read_metrics(run: str, model_name: str, root=None, cross_layer: bool = True,
                 activation: str = "jumprelu"):
    """Training metrics of a CLT stage as a DataFrame (list columns hold per-layer values)."""
    import pandas as pd

    path = Stage(run, stage_name(model_name, cross_layer, activation), root).file("metrics.jsonl")
    return pd.DataFrame(read_jsonl(path))


# ------------------------------------------------------------------------ command line -----


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlclt_utils.clt.train",
                                     description="Train the CLT of one model of a run (works under torchrun).")
    # torchrun reads "--run" as its own "--run-path": under torchrun write "--run-name"
    parser.add_argument("--run", "--run-name", dest="run", required=True)
    parser.add_argument("--model", required=True, help="model name, e.g. s-en50")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--root", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--per-layer", action="store_true", help="per-layer transcoder instead of a CLT")
    parser.add_argument("--cache-dir", default=None, help="on-disk activation cache folder")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="KEY=VALUE", help="preset override, e.g. clt.train_tokens=100000")
    args = parser.parse_args(argv)
    from ..presets import load_preset

    preset = load_preset(args.preset, dict(args.overrides))
    try:
        stage = build_clt_stage(preset, args.run, args.model, root=args.root, device=args.device,
                                cross_layer=False if args.per_layer else None, cache_dir=args.cache_dir)
        if distributed.current().is_main:
            print(f"CLT ready: {stage.path}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()

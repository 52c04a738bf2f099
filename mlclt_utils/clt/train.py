"""Training of cross-layer transcoders: the loop and its resume state.

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

The stage that trains a run's CLT is built by ``mlclt_utils.stages`` (works under torchrun):

    python -m mlclt_utils.stages build clt/s-en50 --preset tiny
    python -m mlclt_utils.stages build plt-topk/s-en50 --preset tiny     # per-layer, TopK
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import torch

from .. import distributed
from ..artifacts import METRICS_FILE, RESUME_FILE, Stage, atomic_path, config_hash, read_jsonl, save_tensors
from .model import CrossLayerTranscoder

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
    # optional keys of the paper's recipe: None (or absent) turns each off
    for key, low in (("grad_clip", 0.0), ("stop_l0", 0.0), ("context_length", 1)):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value <= low):
            raise ValueError(f"clt.{key} must be None or a number above {low}, got {value!r}")



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
              sparse: bool | None = None, keep_scales: bool = False) -> dict:
    """Train ``clt`` in place on ``n_tokens`` tokens of ``source`` (anything with
    ``batch(t) -> (x, y)`` of ``cfg["batch_tokens"]`` rows, e.g. ``ActivationBuffer``).

    ``cfg``: the preset's ``clt`` section (batch_tokens, lr, lambda_max,
    lambda_warmup_fraction, tanh_c, preact_coeff, n_checkpoints, dead_window_tokens, and
    the optional ``grad_clip`` and ``stop_l0``). ``grad_clip``: clip the global gradient
    norm (after the all-reduce, so every rank clips alike) to this value before each
    update; None: no clipping. ``stop_l0``: stop training early, as completed, at the
    first logged row (every ``log_every`` steps) whose mean L0 over the interval and the
    layers is below this value; the step is checkpointed and the run counts as complete,
    with ``stopped_at_l0`` in the summary. None: train for all ``n_tokens``.
    ``stage``: where metrics, checkpoints and the resume state go (None: nothing is
    written and nothing resumed). The scales are set from the first batches when training
    starts (they are buffers of the CLT, so checkpoints and the resume state keep them).
    ``max_steps_this_call`` / ``max_seconds``: return early (as if interrupted) after that
    many updates / seconds, after saving the resume state. ``sparse``: passed to
    ``CrossLayerTranscoder.loss`` (None: the fast path where it applies).

    Returns a summary: completed, stopped_at_l0, step, n_steps, resumed_from, tokens,
    seconds, tokens_per_second and the last metrics row.
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
    resume_path = folder / RESUME_FILE if folder is not None else None
    metrics_path = folder / METRICS_FILE if folder is not None else None

    # ------------------------------------------------------------ state -------------
    start = 0
    # running statistics stay on the training device: nothing is copied to the host per step
    last_fire = torch.zeros(L, F, dtype=torch.int64, device=device)  # tokens seen at the last firing
    acc = torch.zeros(3, L, dtype=torch.float64, device=device)      # fvu, l0, mse sums since last row
    acc_loss = torch.zeros(3, dtype=torch.float64, device=device)    # total, sparsity, preact sums
    n_acc = 0
    grad_clip = cfg.get("grad_clip")
    stop_l0 = cfg.get("stop_l0")
    l0_stopped = False
    state = distributed.load_resume_state(resume_path, key)
    if state is not None:
        clt.load_state_dict(state["clt"])
        optimizer.load_state_dict(state["optimizer"])
        start, n_acc = int(state["step"]), int(state["n_acc"])
        l0_stopped = bool(state.get("stopped_at_l0", False))
        last_fire, acc, acc_loss = (state[k].to(device) for k in ("last_fire", "acc", "acc_loss"))
    elif not keep_scales:
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
            blob = {"key": key, "step": step, "n_acc": n_acc, "last_fire": last_fire.cpu(), "acc": acc.cpu(),
                    "acc_loss": acc_loss.cpu(), "stopped_at_l0": l0_stopped,
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
    from ..viz.progress import progress_bar

    bar = progress_bar(total=n_steps, initial=start, disable=not (progress and info.is_main),
               desc="train CLT", unit="step")
    t0 = time.perf_counter()
    clt.train()
    step = start
    last_row = None
    lam = lambda_at(step, n_steps, cfg["lambda_max"], cfg["lambda_warmup_fraction"])
    stopped = False
    while step < n_steps and not l0_stopped:
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
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
        optimizer.step()
        step += 1
        acc += stats.to(torch.float64)
        acc_loss += losses.to(torch.float64)
        n_acc += 1
        last_fire.masked_fill_(fire > 0, step * B)
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
            if stop_l0 is not None:
                # the row is built from all-reduced statistics: every rank sees the same
                l0_stopped = distributed.all_agree(sum(last_row["l0"]) / L < float(stop_l0))
        if (step in ckpts or l0_stopped) and info.is_main and folder is not None:
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
    return {"completed": step >= n_steps or l0_stopped, "stopped_at_l0": l0_stopped,
            "step": step, "n_steps": n_steps, "resumed_from": start,
            "tokens": step * B, "seconds": seconds,
            "tokens_per_second": (step - start) * B / max(seconds, 1e-9),
            "local_batch_tokens": n_local, "final": last_row}

"""Training of a GPT-2-style model (one process or torchrun), with log-spaced checkpoints.

A model stage lives at ``<root>/<run>/models/<name>/`` (names like ``s-en50``: size ``s``
trained on the mixture with 50 % English) and holds

- ``config.json``: everything needed to rebuild the ``HookedTransformer`` plus the size
  name, mixture share and languages;
- ``model.safetensors``: the final weights;
- ``checkpoints/step_XXXXXXX.safetensors``: weights at log-spaced steps (the last one is
  the final step);
- ``metrics.jsonl``: one JSON row per evaluation (step, tokens, train_loss, lr and the
  validation loss of every language);
- ``resume.pt``: only while training is unfinished; optimizer state, step and RNG states,
  so that a rerun continues where the last run stopped;
- ``manifest.json``: written last by the stage driver (``mlclt_utils.stages``).

The order of the training data is a pure function of (seed, step): every epoch is a
fresh permutation drawn from a ``torch.Generator`` seeded by (seed, epoch). A resumed run
therefore sees exactly the batches an uninterrupted run would have seen, and ends with
the same weights.

Under ``torchrun --nproc_per_node N`` every rank takes its slice of each global batch, so
the global batch (and the result, up to float rounding) is the same as in one process.
Only the main rank writes files. From the command line:

    python -m mlclt_utils.stages build models/s-en50 --preset tiny
    torchrun --standalone --nproc_per_node 2 -m mlclt_utils.stages build models/s-en50 --preset tiny
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..artifacts import (METRICS_FILE, RESUME_FILE, atomic_path, config_hash, read_jsonl, save_tensors,
                         write_json)
from ..device import FLOAT32, Precision, default_device, training_precision
from .config import TRAINING_KEYS, build_model, config_to_dict

# ----------------------------------------------------------------------------- schedule

def log_spaced_steps(total_steps: int, n: int) -> list[int]:
    """``n`` distinct steps in [1, total_steps], spaced evenly in log, always ending at
    ``total_steps`` (all steps when ``n >= total_steps``)."""
    if total_steps < 1 or n < 1:
        raise ValueError(f"need total_steps >= 1 and n >= 1, got {total_steps} and {n}")
    if n >= total_steps:
        return list(range(1, total_steps + 1))
    if n == 1:
        return [total_steps]
    steps, prev = [], 0
    for i in range(n):
        want = round(total_steps ** (i / (n - 1)))
        room = total_steps - (n - 1 - i)  # leave a distinct step for each remaining slot
        prev = min(max(want, prev + 1), room)
        steps.append(prev)
    return steps


def learning_rate(step: int, total_steps: int, lr: float, warmup_fraction: float,
                  min_lr_ratio: float) -> float:
    """Learning rate of update number ``step`` (1-based): linear warm-up over the first
    ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio * lr`` at the end."""
    warmup = int(round(warmup_fraction * total_steps))
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if total_steps <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    low = min_lr_ratio * lr
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BatchOrder:
    """Which rows form the global batch of each step; depends only on (seed, step)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        if n_rows < batch_size:
            raise ValueError(f"the training data has {n_rows} sequences, fewer than one batch "
                             f"of {batch_size}")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.per_epoch = n_rows // batch_size
        self._epoch, self._perm = -1, None

    def rows(self, step: int) -> torch.Tensor:
        """Row indices of the batch used by update ``step`` (0-based)."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n_rows, generator=g), epoch
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]


# ----------------------------------------------------------------------------- training parts

def freeze_key_biases(model) -> None:
    """Keep the attention key biases fixed (at zero).

    Adding the same vector to every key adds a constant to all scores of a query, which the
    softmax ignores, so the key bias has zero gradient up to rounding. Adam would turn that
    rounding noise into steps of size lr, and make runs that differ only in summation order
    (one process vs several) drift apart.
    """
    for block in model.blocks:
        block.attn.b_K.requires_grad_(False)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices (names ``W_*``) only, not on biases,
    LayerNorm parameters or TransformerLens' 2-D attention biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if name.rsplit(".", 1)[-1].startswith("W_") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    try:  # the fused kernel exists on CPU and CUDA in recent torch; fall back otherwise
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def next_token_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over targets at positions 1..n_ctx-1 (the BOS at
    position 0 is only an input, never a target)."""
    logits = model(tokens, return_type="logits")
    # Score every position against the next token and mark the last position as ignored:
    # this avoids copying a sliced [batch, n_ctx-1, vocab] tensor (costly on CPU).
    targets = F.pad(tokens[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- the training forward

_LEAN_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def lean_supported(model) -> bool:
    """Whether ``lean_residual`` computes exactly what ``model`` computes: a GPT-2 style
    ``HookedTransformer`` (LayerNorm, learned positions, causal attention scaled by
    sqrt(d_head), a GELU MLP) with no hooks attached."""
    cfg = model.cfg
    plain = (cfg.normalization_type == "LN" and cfg.positional_embedding_type == "standard"
             and cfg.act_fn in _LEAN_ACTS and cfg.attention_dir == "causal"
             and cfg.use_attn_scale and cfg.attn_scale == cfg.d_head ** 0.5
             and cfg.n_key_value_heads is None and cfg.window_size is None
             and cfg.num_experts is None
             and not any(getattr(cfg, flag, False) for flag in (
                 "attn_only", "parallel_attn_mlp", "gated_mlp", "use_local_attn", "use_qk_norm",
                 "scale_attn_by_inverse_layer_idx", "post_embedding_ln",
                 "use_normalization_before_and_after"))
             and not getattr(cfg, "attn_scores_soft_cap", -1.0) > 0)
    return plain and not any(h._forward_hooks or h._backward_hooks for h in model.hook_dict.values())


def lean_residual(model, tokens: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last block, as ``model(tokens, stop_at_layer=n_layers)``
    computes it, without TransformerLens' hook points and einsums.

    Written by hand because the hooked forward spends about a third of a CPU training step
    outside its matrix products (per-head einsums, elementwise LayerNorm, a boolean mask per
    layer). Here the three attention projections are one matrix product, LayerNorm and GELU
    are single kernels and the causal mask is one additive matrix. PyTorch's
    ``scaled_dot_product_attention`` was slower at these shapes on CPU (64-token contexts),
    so there the attention is two batched products; on a GPU it is that fused kernel. The parameters are the model's own, so
    gradients reach them and checkpoints keep TransformerLens' layout. Requires
    ``lean_supported(model)``.
    """
    cfg = model.cfg
    B, n = tokens.shape
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    approximate = _LEAN_ACTS[cfg.act_fn]
    on_gpu = tokens.device.type == "cuda"
    mask = None if on_gpu else torch.full((n, n), float("-inf"), device=tokens.device).triu_(1)
    x = F.embedding(tokens, model.embed.W_E) + model.pos_embed.W_pos[:n]
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        h = F.layer_norm(x, (d,), block.ln1.w, block.ln1.b, cfg.eps).reshape(-1, d)
        W_qkv = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d, 3 * H * dh)
        b_qkv = torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(-1)
        q, k, v = torch.addmm(b_qkv, h, W_qkv).view(B, n, 3, H, dh).permute(2, 0, 3, 1, 4)
        if on_gpu:  # fused attention kernels; the scale is 1/sqrt(d_head), as attn_scale
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = torch.baddbmm(mask, q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                   alpha=1.0 / cfg.attn_scale)
            z = torch.bmm(scores.softmax(-1), v.flatten(0, 1)).view(B, H, n, dh)
        z = z.transpose(1, 2).reshape(B * n, H * dh)
        x = x + torch.addmm(attn.b_O, z, attn.W_O.reshape(H * dh, d)).view(B, n, d)
        h = F.layer_norm(x, (d,), block.ln2.w, block.ln2.b, cfg.eps).reshape(-1, d)
        u = F.gelu(torch.addmm(mlp.b_in, h, mlp.W_in), approximate=approximate)
        x = x + torch.addmm(mlp.b_out, u, mlp.W_out).view(B, n, d)
    return x


class _UnembedCrossEntropy(torch.autograd.Function):
    """Unembedding + mean cross-entropy, a chunk of rows at a time.

    The gradients are computed in the forward pass, chunk by chunk, so the full
    [rows, vocab] logits never exist in memory: on CPU the chunks stay in cache, which
    saves about a fifth of a training step. Targets equal to -100 are ignored.

    ``dtype`` (mixed precision, e.g. bfloat16): the three matrix products run in it, the
    softmax, the loss and the accumulated gradients stay float32. (Written by hand because
    autocast would run the whole unembedding through full float32 logits.)
    """

    @staticmethod
    def forward(ctx, x, W_U, b_U, targets, chunk: int, dtype=None):
        valid = targets != -100
        n_valid = valid.sum().clamp_min(1)
        total = x.new_zeros(())
        grad_x, grad_W, grad_b = torch.empty_like(x), torch.zeros_like(W_U), torch.zeros_like(b_U)
        low = dtype is not None and dtype != x.dtype
        W_low, x_low = (W_U.to(dtype), x.to(dtype)) if low else (W_U, x)
        for i in range(0, x.shape[0], chunk):
            xs, t, ok = x_low[i:i + chunk], targets[i:i + chunk].clamp_min(0), valid[i:i + chunk]
            logits = torch.mm(xs, W_low).float().add_(b_U) if low else torch.addmm(b_U, xs, W_U)
            picked = logits.gather(1, t[:, None])[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: unnormalised softmax
            norm = probs.sum(dim=-1, keepdim=True)
            total += ((top + norm.log())[:, 0] - picked).mul(ok).sum()
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n_valid on valid rows
            weight = ok / n_valid
            probs.mul_(weight[:, None] / norm)
            probs[torch.arange(len(t), device=t.device), t] -= weight
            grad_b += probs.sum(0)
            if low:
                probs = probs.to(dtype)
                grad_x[i:i + chunk] = torch.mm(probs, W_low.t())
                grad_W += torch.mm(xs.t(), probs)
            else:
                torch.mm(probs, W_U.t(), out=grad_x[i:i + chunk])
                grad_W.addmm_(xs.t(), probs)
        ctx.save_for_backward(grad_x, grad_W, grad_b)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_W, grad_b = ctx.saved_tensors
        return grad_x * grad, grad_W * grad, grad_b * grad, None, None, None


class TrainingLoss(torch.nn.Module):
    """``forward(tokens)`` = the mean next-token loss of ``model`` (what ``train_step``
    minimises; DDP wraps this module). The unembedding and the loss are fused and chunked
    (same value and gradients as ``next_token_loss`` up to rounding); under a CPU's
    bfloat16 autocast their products run in bfloat16 too. Under a GPU's autocast the logits
    are plain (one product; a loop of small chunks would only add kernel launches there).

    ``lean``: run the blocks through ``lean_residual`` when the model allows it (the
    default), or through the hooked forward (``False``: the slower reference path).
    ``compile``: the blocks through ``torch.compile`` (the chunked loss stays eager)."""

    def __init__(self, model, chunk: int = 256, compile: bool = False, lean: bool = True):
        super().__init__()
        self.model, self.chunk = model, chunk
        self.lean = lean and lean_supported(model)
        n_layers = model.cfg.n_layers
        blocks = ((lambda tokens: lean_residual(model, tokens)) if self.lean
                  else (lambda tokens: model(tokens, stop_at_layer=n_layers)))
        self.blocks = torch.compile(blocks, dynamic=False) if compile else blocks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        resid = self.blocks(tokens)  # after the last block
        targets = F.pad(tokens[:, 1:], (0, 1), value=-100).flatten()
        device = tokens.device.type
        if not torch.is_autocast_enabled(device):
            x = m.ln_final(resid).flatten(0, 1)
            return _UnembedCrossEntropy.apply(x, m.unembed.W_U, m.unembed.b_U, targets, self.chunk)
        if device != "cpu":
            x = m.ln_final(resid).flatten(0, 1)
            return F.cross_entropy(m.unembed(x).float(), targets, ignore_index=-100)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            x = m.ln_final(resid.float()).flatten(0, 1)
            return _UnembedCrossEntropy.apply(x, m.unembed.W_U, m.unembed.b_U, targets, self.chunk, dtype)


def train_step(net, optimizer, params, tokens: torch.Tensor, lr: float, grad_clip: float,
               precision: Precision = FLOAT32, scaler=None) -> torch.Tensor:
    """One update of ``net`` (a ``TrainingLoss``, maybe inside DDP); returns the detached
    loss without synchronising the device. ``precision`` (``device.training_precision``)
    sets autocast; float16 needs its ``scaler`` (``precision.make_scaler``), which skips
    the update when a gradient overflowed."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with precision.autocast(tokens.device.type):
        loss = net(tokens)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# tokens per validation batch: 4,096 ran validation 2.5x faster than 16,384 on 2 CPU cores
# (bench train's validation column), as the activations of a smaller batch stay in cache
EVAL_BATCH_TOKENS = 4096


@torch.no_grad()
def eval_loss_per_language(model, eval_sets: Mapping[str, torch.Tensor], batch_size: int = 32,
                           lean: bool | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy per language.

    Every row of ``eval_sets[lang]`` ([M, n_ctx], starting with BOS) contributes its
    targets at positions 1..n_ctx-1; the BOS position is only an input. The mean is over
    all those target tokens of the language. ``lean``: through ``lean_residual`` when the model allows it (None, the default) or
    never (False: the hooked forward).
    """
    was_training = model.training
    model.eval()
    lean = lean_supported(model) if lean is None else lean and lean_supported(model)
    device = next(model.parameters()).device
    out = {}
    for lang, rows in eval_sets.items():
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"evaluation set {lang!r} must be a non-empty [rows, n_ctx] tensor, "
                             f"got shape {tuple(rows.shape)}")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, rows.shape[0], batch_size):
            batch = rows[i:i + batch_size].to(device)
            if not lean:
                logits = model(batch, return_type="logits")
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                         reduction="sum").double()
                continue
            # the unembedding a chunk of positions at a time: the logits of a whole batch
            # ([rows, n_ctx, vocab]) would be hundreds of MB and make validation memory-bound
            x = model.ln_final(lean_residual(model, batch)).flatten(0, 1)
            targets = F.pad(batch[:, 1:], (0, 1), value=-100).flatten()
            for j in range(0, x.shape[0], 1024):
                logits = torch.addmm(model.unembed.b_U, x[j:j + 1024], model.unembed.W_U)
                total += F.cross_entropy(logits, targets[j:j + 1024], ignore_index=-100,
                                         reduction="sum").double()
        out[lang] = float(total) / (rows.shape[0] * (rows.shape[1] - 1))
    model.train(was_training)
    return out


def _check_training(training: Mapping[str, Any]) -> None:
    missing = [k for k in TRAINING_KEYS if k not in training]
    if missing:
        raise ValueError(f"training settings lack {missing}; needed: {list(TRAINING_KEYS)}")
    for key in ("tokens", "batch_size", "n_checkpoints", "eval_every"):
        if isinstance(training[key], bool) or not isinstance(training[key], int) or training[key] < 1:
            raise ValueError(f"training.{key} must be a positive integer, got {training[key]!r}")


def _check_data(train_tensors: Mapping[str, torch.Tensor], eval_sets: Mapping[str, torch.Tensor],
                n_ctx: int, d_vocab: int, languages: list[str] | None) -> None:
    if "tokens" not in train_tensors:
        raise ValueError(f"training data needs a 'tokens' tensor; got keys {sorted(train_tensors)}")
    tokens = train_tensors["tokens"]
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"training tokens must be an integer tensor [N, n_ctx], got "
                         f"{tokens.dtype} of shape {tuple(tokens.shape)}")
    if tokens.shape[1] != n_ctx:
        raise ValueError(f"training tokens have context {tokens.shape[1]} but the model's n_ctx is "
                         f"{n_ctx}; rebuild the data or the model with the same n_ctx")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        raise ValueError(f"training tokens lie in [{int(tokens.min())}, {int(tokens.max())}], outside "
                         f"the model's vocabulary [0, {d_vocab})")
    lang = train_tensors.get("language")
    if lang is not None:
        if lang.shape != (tokens.shape[0],):
            raise ValueError(f"'language' has shape {tuple(lang.shape)}, expected ({tokens.shape[0]},)")
        if languages is not None and lang.numel() and int(lang.max()) >= len(languages):
            raise ValueError(f"'language' index {int(lang.max())} is outside the languages {languages}")
    for name, rows in eval_sets.items():
        if languages is not None and name not in languages:
            raise ValueError(f"evaluation language {name!r} is not one of {languages}")
        if rows.ndim != 2 or rows.shape[1] != n_ctx:
            raise ValueError(f"evaluation set {name!r} has shape {tuple(rows.shape)}; expected "
                             f"[rows, {n_ctx}]")
        if rows.numel() and int(rows.max()) >= d_vocab:
            raise ValueError(f"evaluation set {name!r} has token ids >= d_vocab {d_vocab}")


def _data_fingerprint(tokens: torch.Tensor) -> list:
    """Cheap identity of a token tensor: shape, sum and a hash of the first rows."""
    head = tokens[:256].contiguous().cpu().numpy().tobytes()
    return [list(tokens.shape), int(tokens.sum()), hashlib.sha256(head).hexdigest()[:16]]


def _state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
             "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def _rewrite_rows(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def checkpoint_name(step: int) -> str:
    return f"checkpoints/step_{step:07d}.safetensors"


def train_model(stage, model_cfg, train_tensors: Mapping[str, torch.Tensor],
                eval_sets: Mapping[str, torch.Tensor], training: Mapping[str, Any], seed: int = 0,
                device: str | None = None, languages: list[str] | None = None,
                progress: bool = True, info: Mapping[str, Any] | None = None,
                stop_after_step: int | None = None, init_state: Mapping[str, torch.Tensor] | None = None
                ) -> dict:
    """Train a model from ``model_cfg`` on ``train_tensors`` and write it into ``stage``'s folder.

    ``train_tensors``: ``{"tokens": [N, n_ctx], "language": [N]}``; ``eval_sets``:
    ``{lang: [M, n_ctx]}`` (validation). ``training``: the preset's training section.
    ``languages``: the ISO codes that ``train_tensors["language"]`` indexes.
    ``info``: extra JSON fields for ``config.json`` (size name, mixture share...).

    Resumes from ``resume.pt`` when it was written by a run with the same settings and
    data (also with another number of processes: the global batch is the same).
    ``stop_after_step`` makes the call return right after that update, as if the process
    had been killed (for tests of resuming). ``init_state``: weights to start from instead
    of a fresh initialisation (finetuning, chapter 08); the optimizer starts fresh. Does not write the manifest (the stage
    driver, ``mlclt_utils.stages``, does). Returns a summary dict; ``completed`` is False after a stop.
    """
    _check_training(training)
    dist = distributed.init_distributed(device)
    device = torch.device(device or default_device(dist.local_rank if dist.enabled else None))
    if dist.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    n_ctx, d_vocab = model_cfg.n_ctx, model_cfg.d_vocab
    languages = list(languages) if languages is not None else None
    _check_data(train_tensors, eval_sets, n_ctx, d_vocab, languages)
    batch_size = training["batch_size"]
    total = training["tokens"] // (batch_size * n_ctx)
    if total < 1:
        raise ValueError(f"training.tokens {training['tokens']} is less than one batch "
                         f"({batch_size} x {n_ctx} tokens)")
    rank_rows = distributed.rank_slice(batch_size, dist)
    tokens_all = train_tensors["tokens"].long()
    order = BatchOrder(tokens_all.shape[0], batch_size, seed)
    ckpt_steps = set(log_spaced_steps(total, training["n_checkpoints"]))
    resume_every = max(1, math.ceil(total / 10))
    eval_rows = max(1, math.ceil(training["eval_tokens_per_language"] / n_ctx))
    val_sets = {lang: rows[:eval_rows] for lang, rows in eval_sets.items()}
    eval_batch = max(1, EVAL_BATCH_TOKENS // n_ctx)
    precision = training_precision(device, bool(training.get("mixed_precision", True)))
    lr_at = lambda step: learning_rate(step, total, training["lr"],  # noqa: E731
                                       training["warmup_fraction"], training["min_lr_ratio"])
    path = stage.path
    metrics_path, resume_path = path / METRICS_FILE, path / RESUME_FILE
    key = config_hash({"model": config_to_dict(model_cfg), "training": dict(training), "seed": seed,
                       "data": _data_fingerprint(tokens_all),
                       "init": None if init_state is None else _state_fingerprint(init_state)})

    _seed_everything(seed)
    model = build_model(model_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device, print_details=False)
    freeze_key_biases(model)
    optimizer = make_optimizer(model, training["lr"], training["weight_decay"])
    scaler = precision.make_scaler(device.type)
    params = [p for p in model.parameters() if p.requires_grad]

    # Resume when a state of the same settings exists (every rank reads the same file).
    start = 0
    loss_sum, loss_count = 0.0, 0  # train loss since the last metrics row (mean over ranks)
    state = distributed.load_resume_state(resume_path, key)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, loss_sum, loss_count = state["step"], state["loss_sum"], state["loss_count"]
        _set_rng_state(state["rng"])
    if dist.is_main:
        path.mkdir(parents=True, exist_ok=True)
        # keep the metrics rows up to the resumed step; later ones will be written again
        _rewrite_rows(metrics_path, [r for r in read_jsonl(metrics_path)
                                     if state is not None and r["step"] <= start])
        write_json(path / "config.json", {"hooked_transformer": config_to_dict(model_cfg),
                                          "languages": languages, "seed": seed, "total_steps": total,
                                          "checkpoint_steps": sorted(ckpt_steps), **dict(info or {})})

    net = TrainingLoss(model, compile=bool(training.get("compile", False)))
    if dist.enabled:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # the attention-mask buffers never change, so they need no syncing before each forward
        sync = ({"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False})
        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, **sync)

    def record(step: int, train_loss: float | None) -> None:
        if dist.is_main:
            row = {"step": step, "tokens": step * batch_size * n_ctx, "train_loss": train_loss,
                   "lr": lr_at(step) if step else 0.0,
                   "val_loss": eval_loss_per_language(model, val_sets, eval_batch)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_resume(step: int) -> None:
        if dist.is_main:
            blob = {"key": key, "step": step, "loss_sum": loss_sum, "loss_count": loss_count,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                    "scaler": scaler.state_dict() if scaler is not None else None}
            with atomic_path(resume_path) as tmp:
                torch.save(blob, tmp)

    if start == 0:
        record(0, None)
    from ..viz.progress import progress_bar

    bar = progress_bar(total=total, initial=start, disable=not (progress and dist.is_main),
               desc=f"train {stage.name}", unit="step")
    running = torch.zeros(1, device=device)  # summed on the device: no sync per step
    t0 = time.perf_counter()
    model.train()
    for step in range(start + 1, total + 1):
        batch = tokens_all[order.rows(step - 1)[rank_rows]].to(device, non_blocking=True)
        running += train_step(net, optimizer, params, batch, lr_at(step), training["grad_clip"],
                              precision, scaler)
        loss_count += 1
        bar.update(1)
        is_row = step % training["eval_every"] == 0 or step in ckpt_steps or step == total
        is_resume = step < total and (step % resume_every == 0 or step in ckpt_steps)
        if is_row or is_resume:  # the same steps on every rank
            loss_sum += distributed.mean_across_ranks(running).item()
            running.zero_()
        if is_row:
            train_loss = loss_sum / loss_count
            loss_sum, loss_count = 0.0, 0
            record(step, train_loss)
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if step in ckpt_steps and dist.is_main:
            save_tensors(path / checkpoint_name(step), model.state_dict(), {"step": str(step)})
        if is_resume:
            save_resume(step)
        if stop_after_step is not None and stop_after_step <= step < total:
            bar.close()
            distributed.barrier()
            return {"completed": False, "step": step, "total_steps": total, "resumed_from": start}
    bar.close()
    seconds = time.perf_counter() - t0
    if dist.is_main:
        save_tensors(path / "model.safetensors", model.state_dict())
        resume_path.unlink(missing_ok=True)
    distributed.barrier()
    rows = read_jsonl(metrics_path)
    return {"completed": True, "step": total, "total_steps": total, "resumed_from": start,
            "precision": precision.reason,
            "tokens": total * batch_size * n_ctx, "train_seconds": seconds,
            "tokens_per_second": (total - start) * batch_size * n_ctx / max(seconds, 1e-9),
            "final_val_loss": rows[-1]["val_loss"] if rows else None}



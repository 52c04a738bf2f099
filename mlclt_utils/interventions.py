"""Interventions on CLT features in the original model (chapter 07).

A ``Steer`` changes one feature of one source layer at every position: scaled (``scale``:
new = scale x its current activation, 0 clamps it off, a negative value reverses it) or
set (``value``: new = value wherever the token is not BOS). The model runs unchanged except
that each target layer's MLP output gets the change in the CLT's reconstruction that the
new activations cause: (new - current) x decoder / output scale, summed over the steered
features that write to it. The current activation is read in the steered forward pass
itself, so the effects of earlier layers' steering propagate (circuit-tracer's
``feature_intervention`` without frozen attention does the same; a test checks that both
give the same logits). Written with TransformerLens hooks rather than through
circuit-tracer because generation needs the steering at positions that do not exist yet.

``greedy_generate`` continues a prompt greedily (no sampling, for the baseline and the
steered model alike), re-running the whole context at every step so that the steering
applies to every position, generated ones included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .clt.evaluate import encode_layer


@dataclass(frozen=True)
class Steer:
    layer: int
    feature: int
    scale: float | None = None
    value: float | None = None

    def __post_init__(self):
        if (self.scale is None) == (self.value is None):
            raise ValueError(f"a Steer takes exactly one of scale= or value=, got scale={self.scale!r}, "
                             f"value={self.value!r}")


def check_steers(clt, steers: Sequence[Steer]) -> None:
    L, F = clt.cfg.n_layers, clt.cfg.d_features
    for s in steers:
        if not isinstance(s, Steer):
            raise TypeError(f"expected Steer objects, got {type(s).__name__}")
        if not 0 <= s.layer < L:
            raise ValueError(f"steer layer {s.layer} is out of range; the CLT has layers 0..{L - 1}")
        if not 0 <= s.feature < F:
            raise ValueError(f"steer feature {s.feature} is out of range; layers have features 0..{F - 1}")


def steering_hooks(model, clt, steers: Sequence[Steer], tokens: Tensor, bos_id: int | None = None):
    """TransformerLens forward hooks [(name, fn)] that apply ``steers`` (see the module
    docstring) in a forward pass over ``tokens`` [batch, pos]; BOS positions are left alone."""
    from functools import partial

    check_steers(clt, steers)
    cfg = clt.cfg
    by_layer: dict[int, list[Steer]] = {}
    for s in steers:
        by_layer.setdefault(s.layer, []).append(s)
    if bos_id is None:
        bos_id = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    keep = (tokens != bos_id)[..., None] if bos_id is not None else None
    pending: dict[int, Tensor] = {}                 # target layer -> [batch, pos, d] to add

    def read_input(x, hook, layer):
        steer = by_layer[layer]
        feats = torch.tensor([s.feature for s in steer], device=x.device)
        current = encode_layer(clt, x.to(clt.W_enc.dtype), layer)[..., feats]          # [b, p, n]
        new = current.clone()
        for j, s in enumerate(steer):
            new[..., j] = current[..., j] * s.scale if s.scale is not None else s.value
        if keep is not None:
            new = torch.where(keep.to(x.device), new, current)
        delta = new - current
        W = clt.W_dec[layer][feats]                                                     # [n, T, d]
        for t in range(W.shape[1]):
            k = layer + t if cfg.cross_layer else layer
            add = (delta @ W[:, t, :]) / clt.output_scale[k]
            pending[k] = pending.get(k, 0) + add.to(x.dtype)
        return x

    def write_output(out, hook, layer):
        add = pending.pop(layer, None)
        return out if add is None else out + add

    hooks = [(f"blocks.{layer}.{cfg.input_hook}", partial(read_input, layer=layer))
             for layer in sorted(by_layer)]
    targets = sorted({(l + t if cfg.cross_layer else l) for l in by_layer
                      for t in range(clt.W_dec[l].shape[1])})
    hooks += [(f"blocks.{k}.{cfg.output_hook}", partial(write_output, layer=k)) for k in targets]
    return hooks


@torch.no_grad()
def steered_logits(model, clt, tokens: Tensor, steers: Sequence[Steer], bos_id: int | None = None) -> Tensor:
    """Logits [batch, pos, vocab] of ``model`` on ``tokens`` with ``steers`` applied."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    tokens = tokens.to(model.cfg.device)
    hooks = steering_hooks(model, clt, steers, tokens, bos_id)
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@torch.no_grad()
def greedy_generate(model, clt, tokens: Sequence[int] | Tensor, steers: Sequence[Steer] = (),
                    max_new_tokens: int = 10, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation (token ids, prompt excluded) of one prompt, with or without
    steering; stops early at a token of ``stop_ids`` or at the model's context length."""
    ids = [int(t) for t in torch.as_tensor(tokens).flatten().tolist()]
    out: list[int] = []
    for _ in range(max_new_tokens):
        if len(ids) >= model.cfg.n_ctx:
            break
        ctx = torch.tensor([ids])
        logits = steered_logits(model, clt, ctx, steers) if steers else model(ctx.to(model.cfg.device))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out

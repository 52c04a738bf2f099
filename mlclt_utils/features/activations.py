"""Per-token activations of units, streamed over token rows, summarised as compact tensors.

A *unit* is anything with one activation per token and layer: a CLT feature, an MLP neuron
(after the nonlinearity), a residual-stream dimension. ``UnitSource`` is the one interface
the statistics of ``features`` read; chapters 04-05 use CLT features and the residual
stream, chapter 10 MLP neurons, chapter 09 SAE latents (``SAELatents``).

``collect_unit_stats`` makes one pass over the rows, one batch at a time (never more than
one batch of dense activations in memory), and keeps per layer:

* ``fired``  [rows, units] bool: the unit fired (activation > 0) anywhere in the row;
* ``counts`` [units]: number of tokens on which it fired;
* ``means``  [rows, units]: its mean activation over the row's tokens;
* ``n_tokens``: the number of tokens seen; ``lengths`` [rows]: tokens per row.

BOS and padding positions are left out of everything, as in CLT training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..clt.activations import kept_mask
from ..tokenizer import BOS_ID, PAD_ID


class UnitSource:
    """Activations of one kind of unit at every layer, for a batch of token rows."""

    kind = "units"

    def __init__(self, model):
        self.model = model

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    def hook(self, layer: int) -> str:
        raise NotImplementedError

    def transform(self, x: Tensor, layer: int) -> Tensor:
        return x

    @torch.no_grad()
    def activations(self, tokens: Tensor) -> list[Tensor]:
        """``[batch, pos, units]`` per layer, in one forward pass."""
        names = [self.hook(layer) for layer in range(self.n_layers)]
        _, cache = self.model.run_with_cache(tokens, names_filter=names)
        return [self.transform(cache[n].float(), layer) for layer, n in enumerate(names)]


class CLTFeatures(UnitSource):
    """The features of a cross-layer transcoder, read on the model's own MLP inputs."""

    kind = "clt"

    def __init__(self, model, clt):
        super().__init__(model)
        self.clt = clt.eval()

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.clt.cfg.input_hook}"

    def transform(self, x: Tensor, layer: int) -> Tensor:
        from ..clt.evaluate import encode_layer

        return encode_layer(self.clt, x.to(self.clt.W_enc.dtype), layer)


class MLPNeurons(UnitSource):
    """MLP hidden units after the nonlinearity (``blocks.l.mlp.hook_post``)."""

    kind = "mlp"

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.mlp.hook_post"


class ResidualStream(UnitSource):
    """The residual stream after each block; its units are the model's dimensions."""

    kind = "resid"

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"


class SAELatents(UnitSource):
    """The latents of residual-stream SAEs (SAELens ``SAE``s, ``{layer: sae}``) read on
    ``blocks.l.hook_resid_post``. Its layers are the SAEs' layers: ``activations`` returns
    one tensor per entry of ``layers``, in that order."""

    kind = "sae"

    def __init__(self, model, saes):
        super().__init__(model)
        self.saes = dict(sorted(saes.items()))
        self.layers = list(self.saes)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def hook(self, i: int) -> str:
        return f"blocks.{self.layers[i]}.hook_resid_post"

    def transform(self, x: Tensor, i: int) -> Tensor:
        sae = self.saes[self.layers[i]]
        return sae.encode(x.to(sae.W_enc.dtype))


@dataclass
class UnitStats:
    fired: list[Tensor]        # per layer [rows, units] bool
    counts: list[Tensor]       # per layer [units] int64
    means: list[Tensor]        # per layer [rows, units] float32
    n_tokens: int
    lengths: Tensor            # [rows]

    def to_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        out = {f"{prefix}lengths": self.lengths, f"{prefix}n_tokens": torch.tensor(self.n_tokens)}
        for layer, (f, c, m) in enumerate(zip(self.fired, self.counts, self.means)):
            out[f"{prefix}fired.{layer}"] = f.to(torch.uint8)
            out[f"{prefix}counts.{layer}"] = c
            out[f"{prefix}means.{layer}"] = m
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str = "") -> "UnitStats":
        n_layers = sum(1 for k in tensors if k.startswith(f"{prefix}fired."))
        return cls(fired=[tensors[f"{prefix}fired.{l}"].bool() for l in range(n_layers)],
                   counts=[tensors[f"{prefix}counts.{l}"] for l in range(n_layers)],
                   means=[tensors[f"{prefix}means.{l}"] for l in range(n_layers)],
                   n_tokens=int(tensors[f"{prefix}n_tokens"]), lengths=tensors[f"{prefix}lengths"])


def kept_positions(tokens: Tensor, bos_id: int = BOS_ID, pad_id: int | None = PAD_ID) -> Tensor:
    """[batch, pos] True where a token counts: the positions a CLT is trained on
    (``clt.activations.kept_mask``) that are not padding."""
    keep = kept_mask(tokens, bos_id)
    if pad_id is not None:
        keep &= tokens != pad_id
    return keep


@torch.no_grad()
def collect_unit_stats(source: UnitSource, rows: Tensor, batch_size: int = 16,
                       bos_id: int = BOS_ID, pad_id: int | None = PAD_ID) -> UnitStats:
    """One streamed pass of ``source`` over token ``rows`` [N, T] (see the module docstring)."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty [N, T] tensor of token ids, got shape {tuple(rows.shape)}")
    device = next(source.model.parameters()).device
    fired, counts, means = None, None, None
    n_tokens = 0
    lengths = kept_positions(rows, bos_id, pad_id).sum(1)
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start:start + batch_size].to(device)
        keep = kept_positions(chunk, bos_id, pad_id)
        n = keep.sum(1).clamp(min=1).float()
        acts = source.activations(chunk)
        if fired is None:
            fired = [[] for _ in acts]
            means = [[] for _ in acts]
            counts = [torch.zeros(a.shape[-1], dtype=torch.long) for a in acts]
        for layer, a in enumerate(acts):
            a = a * keep[..., None]
            on = a > 0
            fired[layer].append(on.any(1).cpu())
            counts[layer] += on.sum((0, 1)).cpu()
            means[layer].append((a.sum(1) / n[:, None]).cpu())
        n_tokens += int(keep.sum())
    return UnitStats(fired=[torch.cat(f) for f in fired], counts=counts,
                     means=[torch.cat(m) for m in means], n_tokens=n_tokens, lengths=lengths)

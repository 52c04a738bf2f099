"""A BatchTopK crosscoder: one dictionary of latents read from and written to two models at
once (model diffing, chapter 08: a base model and its finetuned copy at one layer).

Each latent j has an encoder row per model and a decoder vector per model. For paired
activations x = (x_a, x_b) of the same token in the two models,

    pre_j  = sum_m x_m W_enc[m, :, j] + b_enc[j]
    z      = BatchTopK(relu(pre) * s),  s_j = ||W_dec[j, a]|| + ||W_dec[j, b]||
    x_hat_m = sum_j z_j W_dec[j, m] + b_dec[m]

BatchTopK keeps the ``k * batch`` largest decoder-norm-scaled activations of the whole batch
(Bussmann et al., 2024); at inference a single threshold, the running mean of the smallest
kept value, replaces the batch selection, so a token's latents do not depend on its batch.
The loss is the squared error summed over both models (no sparsity penalty: TopK sets the
sparsity), plus the usual auxiliary loss that lets dead latents explain the residual.

Reading a latent (Lindsey et al., 2024; Minder et al., 2025):

* :meth:`Crosscoder.relative_norms`: ``||d_b|| / (||d_a|| + ||d_b||)``; about 0.5 for a
  latent both models use alike, near 0 for one only model a uses, near 1 for one only b uses;
* :func:`latent_scaling`: for a latent that looks specific to b, how much of it model a's
  activations still carry (its decoder direction fitted to a's activations, or to a's error
  once every other latent is removed). A ratio near 1 says the latent is in a too and only
  looks b-specific: complete shrinkage or latent decoupling, the two ways Minder et al.
  show a BatchTopK / L1 crosscoder fakes model-specific latents.

Written here: no pip package ships a crosscoder (the field's versions are research code), and
the book needs one small enough to read next to its CLT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class CrosscoderConfig:
    d_in: int                       # width of each model's activation
    d_latent: int                   # latents shared by the two models
    k: int = 16                     # active latents per token, on average over a batch
    lr: float = 1e-3
    train_tokens: int = 100_000
    batch_tokens: int = 512
    seed: int = 0
    aux_k: int = 64                 # dead latents the auxiliary loss may use
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 20_000       # a latent silent this long counts as dead
    threshold_momentum: float = 0.99

    def __post_init__(self):
        for name in ("d_in", "d_latent", "k", "train_tokens", "batch_tokens", "aux_k", "dead_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.k > self.d_latent:
            raise ValueError(f"k {self.k} is larger than d_latent {self.d_latent}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


class Crosscoder(nn.Module):
    """Two models (index 0: ``a``, the base; 1: ``b``, the finetuned), one set of latents."""

    def __init__(self, cfg: CrosscoderConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        d, f = cfg.d_in, cfg.d_latent
        W_dec = torch.randn(f, 2, d, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.1      # each model's decoder norm 0.1
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).clone())    # [2, d, f], the transpose
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.b_dec = nn.Parameter(torch.zeros(2, d))
        self.register_buffer("threshold", torch.zeros(()))

    # ------------------------------------------------------------------ forward
    def _check(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[1] != 2 or x.shape[2] != self.cfg.d_in:
            raise ValueError(f"x must be [n, 2, {self.cfg.d_in}] (both models' activations of each "
                             f"token), got {tuple(x.shape)}")
        return x

    def decoder_norms(self) -> Tensor:
        """[latents, 2]: each latent's decoder norm in model a and in model b."""
        return self.W_dec.norm(dim=-1)

    def scaled_preactivations(self, x: Tensor) -> Tensor:
        pre = torch.einsum("nmd,mdf->nf", self._check(x), self.W_enc) + self.b_enc
        return torch.relu(pre) * self.decoder_norms().sum(-1)

    def encode(self, x: Tensor) -> Tensor:
        """[n, latents]: BatchTopK over the batch while training, the running threshold in
        eval mode (values are unscaled activations, as the decoder reads them)."""
        scaled = self.scaled_preactivations(x)
        if self.training:
            keep = min(self.cfg.k * x.shape[0], scaled.numel())
            flat = scaled.flatten()
            idx = flat.topk(keep, sorted=False).indices
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[idx] = True
            mask = mask.view_as(scaled) & (scaled > 0)
            with torch.no_grad():
                kept = scaled[mask]
                if kept.numel():
                    m = self.cfg.threshold_momentum
                    low = kept.min()
                    self.threshold.copy_(low if float(self.threshold) == 0 else m * self.threshold + (1 - m) * low)
        else:
            mask = scaled > self.threshold
        return torch.where(mask, scaled / self.decoder_norms().sum(-1).clamp_min(1e-12), 0.0)

    def decode(self, z: Tensor) -> Tensor:
        """[n, 2, d]: both models' reconstructions."""
        return torch.einsum("nf,fmd->nmd", z, self.W_dec) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ reading
    def relative_norms(self) -> Tensor:
        """[latents]: ``||d_b|| / (||d_a|| + ||d_b||)`` (0.5 shared, 0 a-only, 1 b-only)."""
        n = self.decoder_norms().detach()
        return n[:, 1] / n.sum(-1).clamp_min(1e-12)

    def swapped(self) -> "Crosscoder":
        """The same crosscoder with the two models' roles exchanged (a becomes b)."""
        import copy

        out = copy.deepcopy(self)
        with torch.no_grad():
            out.W_dec.copy_(self.W_dec.flip(1))
            out.W_enc.copy_(self.W_enc.flip(0))
            out.b_dec.copy_(self.b_dec.flip(0))
        return out


def train_crosscoder(acts_a: Tensor, acts_b: Tensor, cfg: CrosscoderConfig, progress: bool = False) -> Crosscoder:
    """A crosscoder trained on paired activations ``acts_a``, ``acts_b`` [N, d] (row i: the
    same token in both models), shuffled with ``cfg.seed``, cycled as ``train_tokens`` asks.
    Seeded: the same inputs give the same weights (the global RNG is left alone)."""
    from ..viz.progress import progress_bar

    if acts_a.shape != acts_b.shape or acts_a.ndim != 2 or acts_a.shape[1] != cfg.d_in:
        raise ValueError(f"acts_a and acts_b must both be [N, {cfg.d_in}], got {tuple(acts_a.shape)} "
                         f"and {tuple(acts_b.shape)}")
    x = torch.stack([acts_a, acts_b], dim=1).float()
    cc = Crosscoder(cfg)
    with torch.no_grad():
        cc.b_dec.copy_(x[: min(len(x), 4096)].mean(0))
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(cfg.seed)
    steps = max(1, cfg.train_tokens // cfg.batch_tokens)
    order, at = torch.randperm(len(x), generator=g), 0
    silent = torch.zeros(cfg.d_latent)                 # tokens since each latent last fired
    cc.train()
    for _ in progress_bar(iterable=range(steps), desc="crosscoder", disable=not progress):
        if at + cfg.batch_tokens > len(x):
            order, at = torch.randperm(len(x), generator=g), 0
        batch = x[order[at:at + cfg.batch_tokens]]
        at += cfg.batch_tokens
        z = cc.encode(batch)
        recon = cc.decode(z)
        err = batch - recon
        loss = err.pow(2).sum(-1).sum(-1).mean()
        silent = torch.where((z > 0).any(0), torch.zeros_like(silent), silent + len(batch))
        dead = silent > cfg.dead_tokens
        if dead.any():
            # auxiliary loss: the dead latents' top activations try to explain the residual
            scaled = cc.scaled_preactivations(batch)[:, dead]
            k = min(cfg.aux_k, int(dead.sum()))
            top = scaled.topk(k, dim=-1)
            za = torch.zeros_like(scaled).scatter(-1, top.indices, top.values)
            za = za / cc.decoder_norms()[dead].sum(-1).clamp_min(1e-12)
            aux = torch.einsum("nf,fmd->nmd", za, cc.W_dec[dead])
            loss = loss + cfg.aux_coefficient * (err.detach() - aux).pow(2).sum(-1).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return cc.eval()


@torch.no_grad()
def latent_scaling(cc: Crosscoder, acts_a: Tensor, acts_b: Tensor, latents) -> "pd.DataFrame":
    """For each latent j of ``latents`` and each model m, the least-squares scale beta of
    ``f_j(x) d_j`` (its activation times its decoder vector in the *other* model's direction,
    i.e. b's vector, the model it looks specific to) against two targets in model m: the
    activation itself (``beta_reconstruction``) and the error left when every other latent's
    reconstruction is removed (``beta_error``). Columns ``latent, model, beta_reconstruction,
    beta_error``, plus per latent the ratios a / b (``nu_reconstruction``, ``nu_error``): near 0
    the latent is truly b's own; near 1, model a carries it too."""
    import pandas as pd

    x = torch.stack([acts_a, acts_b], dim=1).float()
    z = cc.encode(x)
    recon = cc.decode(z)
    rows = []
    for j in [int(i) for i in latents]:
        f = z[:, j]
        on = f > 0
        if not on.any():
            rows.append({"latent": j, "beta_reconstruction_a": float("nan"), "beta_reconstruction_b": float("nan"),
                         "beta_error_a": float("nan"), "beta_error_b": float("nan")})
            continue
        d = cc.W_dec[j, 1]                                         # b's direction for the latent
        row = {"latent": j}
        for m, name in ((0, "a"), (1, "b")):
            without_j = recon[:, m] - f[:, None] * cc.W_dec[j, m]
            for target, kind in ((x[:, m], "reconstruction"), (x[:, m] - without_j, "error")):
                num = (f[on] * (target[on] @ d)).sum()
                den = (f[on] ** 2).sum() * (d @ d)
                row[f"beta_{kind}_{name}"] = float(num / den.clamp_min(1e-12))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["nu_reconstruction"] = out["beta_reconstruction_a"] / out["beta_reconstruction_b"]
    out["nu_error"] = out["beta_error_a"] / out["beta_error_b"]
    return out

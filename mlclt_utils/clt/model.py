"""The cross-layer transcoder (CLT) and its per-layer and TopK variants.

For layers l = 0..L-1 the CLT reads the MLP input x_l (``blocks.l.ln2.hook_normalized``)
and predicts the MLP output y_l (``blocks.l.hook_mlp_out``):

    x~_l = x_l * input_scale[l]                     (per-layer normalisation)
    a_l  = act(W_enc[l] x~_l + b_enc[l])            (F features per layer)
    y^_k = sum_{l <= k} W_dec[l -> k] a_l + b_dec[k]  (normalised space)
    y_k  ~ y^_k / output_scale[k]                   (raw space)

``act`` is JumpReLU (z * 1[z > theta], theta = exp(log_threshold) learned per feature),
TopK (the k largest pre-activations of each token and layer, after a ReLU) or BatchTopK
(the k * n_tokens largest of a layer over the whole batch, so k per token on average;
during training a per-layer threshold is tracked as a running mean of the smallest kept
activation, buffer ``batchtopk_threshold``, and in eval mode it replaces the batch
selection, so that inference does not depend on the other tokens of the batch; under
torchrun the selection is over the global batch of all ranks, see ``_batch_threshold``).
With ``cross_layer=False`` every layer decodes only to itself: a per-layer transcoder (PLT).

The loss (in normalised space, averaged over tokens) is

    sum_k mean ||y~_k - y^_k||^2
    + lambda * sum_{l,f} tanh(c * a_{l,f} * ||W_dec,l,f||)
    + mu * sum_{l,f} ReLU(theta_{l,f} - h_{l,f}) * ||W_dec,l,f||

where h is the pre-activation and ||W_dec,l,f|| the norm of feature f's decoder rows
concatenated over all its target layers. The TopK modes fix L0 through k, so they train
on the reconstruction term only.

Gradients of theta. The step in a = h * H(h - theta) has no useful derivative, so theta
gets the straight-through pseudo-derivative of Rajamanoharan et al. (2024):
d a / d theta = -(theta / eps) * K((h - theta) / eps) with K the rectangle kernel on
|u| < 1/2 (eps = ``bandwidth``), at every position within eps / 2 of theta, on both
sides, as circuit-tracer and featflow do. The sparsity term reaches theta only through
a (so through that kernel, with d tanh / d a = c ||W_dec|| where a = 0); the
pre-activation term ReLU(theta - h) is differentiable in theta and gets its exact
derivative ||W_dec|| * #(h < theta), no kernel.

Why this is written here rather than taken from a library: no installed library trains
cross-layer transcoders with this loss (circuit-tracer only runs trained ones, sae-lens
trains single-layer SAEs), and none has a sparse CPU training kernel. Once features are
sparse, almost all of a dense step multiplies zeros, so ``loss`` has a fast JumpReLU path:
a sparse mode (``_SparseJumpEncode``, ``_SparseDecode``) that works on the active
(token, feature) pairs only, and a dense mode (``_DenseJumpEncode``) for the start of
training when many features fire. ``tests/test_clt_model.py`` checks both against plain
autograd (``loss(..., sparse=False)``): same values and gradients.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch import Tensor

ACTIVATIONS = ("jumprelu", "topk", "batchtopk")


@dataclass
class CLTConfig:
    n_layers: int
    d_model: int
    d_features: int                 # F features per layer
    activation: str = "jumprelu"    # "jumprelu" | "topk" | "batchtopk"
    cross_layer: bool = True        # False: per-layer transcoder
    k: int = 32                     # active features per token and layer (topk, batchtopk)
    threshold_init: float = 0.03    # JumpReLU theta at initialisation
    bandwidth: float = 0.1          # width of the straight-through rectangle kernel (eps)
    input_hook: str = "ln2.hook_normalized"
    output_hook: str = "hook_mlp_out"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        for name in ("n_layers", "d_model", "d_features", "k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CLTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.threshold_init <= 0 or self.bandwidth <= 0:
            raise ValueError("threshold_init and bandwidth must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CLTConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------- JumpReLU (dense) -----

class _JumpReLU(torch.autograd.Function):
    """a = z * 1[z > theta] with a straight-through gradient for theta.

    d a / d z = 1 at active positions (z > theta), 0 elsewhere.
    d a / d theta = -(theta / eps) * K((z - theta) / eps), K(u) = 1[|u| < 1/2]: the
    rectangle-kernel pseudo-derivative of z * H(z - theta) (Rajamanoharan et al. 2024). It
    is two-sided: every position within eps / 2 of theta counts, on either side, whether
    or not the feature fired there. At a position that did not fire, the upstream gradient
    is still defined (what a small activation there would do to the loss), and it is what
    tells theta to come down when firing there would have helped.
    """

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        active = z > theta
        ctx.save_for_backward(z, theta, active)
        ctx.bandwidth = bandwidth
        return z * active

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, theta, active = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * active if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            window = (z - theta).abs() < eps / 2             # both sides of theta
            g = -(theta / eps) * grad * window
            grad_theta = g.reshape(-1, *theta.shape).sum(0)
        return grad_z, grad_theta, None


def jumprelu(z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(z, theta, bandwidth)


def _world_size() -> int:
    """Number of torch.distributed ranks (1 when it is not initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ------------------------------------------------------------------- sparse kernels -----
#
# The fast JumpReLU path computes the pre-activations as [L, N, F] (layer-major) into a
# reused buffer. When few pairs (layer, token, feature) are active, the active pairs found
# by ``nonzero`` come out sorted by (layer, token, feature): per layer they already form a
# CSR matrix [N, F], and one stable sort by (layer, feature) gives the transposed matrices
# needed by the backward pass. The products go through torch's CSR kernels (MKL on x86
# CPUs, 32-bit indices so that nothing is converted on each call): CSR @ dense, and the
# sampled dense-dense product for the gradient of the active values. When many pairs are
# active (early in training) index lists cost more than they save, so above
# ``DENSE_ABOVE`` active pairs per (token, feature) the same maths runs on dense tensors
# (``_DenseJumpEncode``), and within the sparse mode each decoder layer still switches to
# a dense product above ``DECODER_DENSE_ABOVE``.
#
# The threshold's pseudo-gradient is two-sided (see ``_JumpReLU``): it also needs the
# upstream gradient at the pairs that did not fire but lie within eps / 2 below theta.
# Those "window" pairs are kept in a second, separate pair list: they add nothing to the
# forward pass or to the decoder's weight gradient (their activation is 0), only one
# sampled product in the backward pass (the gradient of their zero activations), so they
# cost about a third of an active pair. The choice of mode counts them with that weight.

# measured crossovers at the reference shape of clt/bench.py on a 2-core AVX-512 CPU: the
# sparse kernels win up to ~10 % active pairs; a single layer far denser than the others
# is better decoded densely
DENSE_ABOVE = 0.10
DECODER_DENSE_ABOVE = 0.15
WINDOW_PAIR_COST = 1 / 3       # cost of a window pair relative to an active pair

_quiet = [False]


def _crow(counts: Tensor) -> Tensor:
    """CSR row pointers from the number of entries of each row."""
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def _csr(crow: Tensor, col: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    idx = torch.int32 if vals.numel() < 2**31 and shape[1] < 2**31 else torch.int64
    if _quiet[0]:
        return torch.sparse_csr_tensor(crow.to(idx), col.to(idx), vals, shape, check_invariants=False)
    with warnings.catch_warnings():     # torch warns once that CSR support is "beta"
        warnings.simplefilter("ignore")
        _quiet[0] = True
        return torch.sparse_csr_tensor(crow.to(idx), col.to(idx), vals, shape, check_invariants=False)


class _ActivePairs:
    """Index bookkeeping of the active (layer, token, feature) pairs of one batch.

    ``row`` = l * N + n and ``col`` = f, sorted by (row, col); ``lf`` = l * F + f;
    ``crow`` the CSR row pointers over the L * N rows. ``perm`` sorts the pairs by
    (lf, row) and ``crow_t`` holds the row pointers of that transposed order.
    """

    def __init__(self, flat: Tensor, L: int, N: int, F: int):
        self.L, self.N, self.F = L, N, F
        self.row = flat // F
        self.col = flat - self.row * F
        self.lf = torch.div(self.row, N, rounding_mode="floor") * F + self.col
        self.count = torch.bincount(self.lf, minlength=L * F)
        self.crow = _crow(torch.bincount(self.row, minlength=L * N))
        self.bounds = self.crow[:: N].tolist()                 # pair range of each layer
        self._perm = None

    @property
    def perm(self) -> Tensor:
        if self._perm is None:
            self._perm = torch.argsort(self.lf, stable=True)
            self.crow_t = _crow(self.count)
            self.row_t = self.row[self._perm]
        return self._perm

    def layer_csr(self, l: int, vals: Tensor) -> Tensor:
        """S_l [N, F] with the given values of layer l's pairs."""
        lo, hi = self.bounds[l], self.bounds[l + 1]
        crow = self.crow[l * self.N: (l + 1) * self.N + 1] - lo
        return _csr(crow, self.col[lo:hi], vals[lo:hi], (self.N, self.F))

    def layer_csr_t(self, l: int, vals_sorted: Tensor) -> Tensor:
        """S_l^T [F, N] from values already permuted by ``perm``."""
        self.perm
        lo, hi = self.bounds[l], self.bounds[l + 1]     # same range in both orders
        crow = self.crow_t[l * self.F: (l + 1) * self.F + 1] - lo
        return _csr(crow, self.row_t[lo:hi] - l * self.N, vals_sorted[lo:hi], (self.F, self.N))

    def layer_dense(self, l: int, vals: Tensor) -> Tensor:
        lo, hi = self.bounds[l], self.bounds[l + 1]
        out = torch.zeros(self.N * self.F, dtype=vals.dtype, device=vals.device)
        out[(self.row[lo:hi] - l * self.N) * self.F + self.col[lo:hi]] = vals[lo:hi]
        return out.view(self.N, self.F)

    def layer_is_dense(self, l: int, threshold: float) -> bool:
        return self.bounds[l + 1] - self.bounds[l] > threshold * self.N * self.F


@torch.no_grad()
def _jump_preactivations(xt: Tensor, W_enc: Tensor, b_enc: Tensor, lower: Tensor,
                         holder: dict) -> tuple[Tensor, Tensor]:
    """h = x~ W_enc + b_enc ([L, N, F], one batched GEMM) and the mask h > lower [L, F]
    (the bottom of the threshold's kernel window: the pairs that fired or lie in it).

    Fresh [L, N, F] allocations cost as much as the GEMM itself (page faults on every
    step), so both live in buffers kept in ``holder`` and reused by the next call; neither
    is kept by autograd."""
    L, N, _ = xt.shape
    F = W_enc.shape[-1]
    h = holder.get("h")
    if h is None or h.shape != (L, N, F) or h.dtype != xt.dtype or h.device != xt.device:
        h = holder["h"] = torch.empty(L, N, F, dtype=xt.dtype, device=xt.device)
        holder["mask"] = torch.empty(L, N, F, dtype=torch.bool, device=xt.device)
    mask = holder["mask"]
    torch.baddbmm(b_enc.unsqueeze(1), xt, W_enc, out=h)
    torch.gt(h, lower.unsqueeze(1), out=mask)
    return h, mask


@torch.no_grad()
def _split_pairs(h: Tensor, mask: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices of the active pairs (h > theta) and of the window pairs below theta
    (theta - eps/2 < h <= theta), both sorted, from the mask of ``_jump_preactivations``:
    one pass over the dense mask, then a split of the (short) list of its pairs."""
    L, N, F = h.shape
    flat = mask.view(-1).nonzero().squeeze(1)
    layer = torch.div(flat, N * F, rounding_mode="floor")
    lf = layer * F + (flat - torch.div(flat, F, rounding_mode="floor") * F)
    fired = h.view(-1)[flat] > theta.reshape(-1)[lf]
    return flat[fired], flat[~fired]


def _pre_sum(xt: Tensor, x_sum: Tensor, W_enc: Tensor, b_enc: Tensor, theta: Tensor,
             active_excess: Tensor) -> Tensor:
    """P[l, f] = sum_n ReLU(theta - h) = N theta - sum_n h + sum_active (h - theta); the column
    sum of h is (sum_n x~) W_enc + N b_enc, so no pass over the dense h is needed."""
    N = xt.shape[1]
    col_sum_h = torch.bmm(x_sum.unsqueeze(1), W_enc).squeeze(1) + N * b_enc
    return N * theta - col_sum_h + active_excess


class _SparseJumpEncode(torch.autograd.Function):
    """JumpReLU encoder that returns only the active pairs, and the pre-activation sums.

    Forward (given h from ``_jump_preactivations`` and the pair lists from
    ``_split_pairs``): the active pairs, their values a = h, the window pairs below theta
    with their values a = 0, and P[l, f] = sum_n ReLU(theta - h) (see ``_pre_sum``).

    Backward: dL/dh = -gP[l, f] where h < theta (from P), g_a at active pairs (from a).
    So x~^T dL/dh = -(sum_n x~) gP^T + x~^T S with S sparse at the active pairs: the
    encoder gradient needs no dense [N, F] matrix. theta gets the two-sided
    rectangle-kernel term -(theta / eps) g_a from the active pairs within eps / 2 above
    theta and from every window pair below it (whose g_a arrives through the zero
    values), and gP * #(h < theta) from P (the exact derivative of the ReLU penalty).

    ``holder`` receives the ``_ActivePairs`` of both lists (``pairs``, ``wpairs``); no
    gradient flows to x~ (the data).
    """

    @staticmethod
    def forward(ctx, h: Tensor, split: tuple[Tensor, Tensor], xt: Tensor, W_enc: Tensor,
                b_enc: Tensor, log_threshold: Tensor, bandwidth: float, holder: dict):
        L, N, F = h.shape
        theta = log_threshold.exp()
        flat, flat_window = split
        vals = h.view(-1)[flat]
        pairs = _ActivePairs(flat, L, N, F)
        wpairs = _ActivePairs(flat_window, L, N, F)
        wvals = torch.zeros(wpairs.lf.numel(), dtype=vals.dtype, device=vals.device)
        holder["pairs"], holder["wpairs"] = pairs, wpairs
        lf = pairs.lf
        x_sum = xt.sum(1)                                              # [L, d]
        excess = torch.zeros(L * F, dtype=vals.dtype, device=vals.device)
        excess.index_add_(0, lf, vals - theta.reshape(-1)[lf])
        pre_sum = _pre_sum(xt, x_sum, W_enc, b_enc, theta, excess.view(L, F))
        ctx.save_for_backward(xt, x_sum, theta, vals)
        ctx.pairs, ctx.wpairs, ctx.bandwidth = pairs, wpairs, bandwidth
        return vals, wvals, pre_sum

    @staticmethod
    def backward(ctx, g_vals, g_wvals, g_pre):
        xt, x_sum, theta, vals = ctx.saved_tensors
        pairs, wpairs = ctx.pairs, ctx.wpairs
        L, N, d = xt.shape
        F = theta.shape[-1]
        lf = pairs.lf
        eps = ctx.bandwidth
        if g_vals is None:
            g_vals = torch.zeros_like(vals)
        if g_pre is None:
            g_pre = torch.zeros_like(theta)
        # the sparse part of dL/dh, at the active pairs
        s_vals = g_vals + g_pre.reshape(-1)[lf]
        grad_W = grad_b = grad_log = None
        if ctx.needs_input_grad[3]:
            # the pairs of all layers form one block-diagonal matrix M [L*N, L*F];
            # grad W_enc (as [L*F, d]) = M^T @ x~ (as [L*N, d]).
            perm = pairs.perm
            Mt = _csr(pairs.crow_t, pairs.row_t, s_vals[perm], (L * F, L * N))
            gw = torch.sparse.mm(Mt, xt.reshape(L * N, d))              # [L*F, d]
            grad_W = gw.view(L, F, d).transpose(1, 2) - x_sum.unsqueeze(2) * g_pre.unsqueeze(1)
        if ctx.needs_input_grad[4]:
            grad_b = torch.zeros(L * F, dtype=vals.dtype, device=vals.device)
            grad_b.index_add_(0, lf, s_vals)
            grad_b = grad_b.view(L, F) - N * g_pre
        if ctx.needs_input_grad[5]:
            theta_flat = theta.reshape(-1)
            theta_nz = theta_flat[lf]
            window = (vals - theta_nz) < eps / 2                      # above theta
            g_theta = torch.zeros(L * F, dtype=vals.dtype, device=vals.device)
            g_theta.index_add_(0, lf, -(theta_nz / eps) * g_vals * window)
            if g_wvals is not None and g_wvals.numel():               # below theta
                wlf = wpairs.lf
                g_theta.index_add_(0, wlf, -(theta_flat[wlf] / eps) * g_wvals)
            g_theta = g_theta.view(L, F) + g_pre * (N - pairs.count.view(L, F))
            grad_log = g_theta * theta
        ctx.pairs = ctx.wpairs = None
        return None, None, None, grad_W, grad_b, grad_log, None, None


def _float_mask(cond: str, a: Tensor, b: Tensor) -> Tensor:
    """1.0 where ``a > b`` (cond "gt") or ``a < b`` ("lt"), else 0.0, in a's dtype. Products
    with float masks are several times faster on CPU than ``where`` or products with
    bool masks."""
    out = torch.empty_like(a)
    return (torch.gt if cond == "gt" else torch.lt)(a, b, out=out)


class _DenseJumpEncode(torch.autograd.Function):
    """The same maths as ``_SparseJumpEncode`` on dense tensors, for batches where many
    features fire; it also computes the tanh sparsity sum, so that the whole encoder side
    makes a handful of passes over the [N, F] tensors of each layer instead of the dozens
    that autograd would make.

    Returns the activations of each layer a_l = h_l * 1[h_l > theta_l] ([N, F] each), the
    sparsity sum S = sum tanh(c a ||W_dec||), the pre-activation sums P [L, F] and the
    firing counts. The firing positions h > theta and the kernel window |h - theta| < eps / 2
    (both sides, see ``_JumpReLU``) are kept from the forward pass as float masks, since h
    itself lives in a reused buffer.
    """

    @staticmethod
    def forward(ctx, h: Tensor, xt: Tensor, W_enc: Tensor, b_enc: Tensor,
                log_threshold: Tensor, bandwidth: float, norms: Tensor, tanh_c: float):
        L = h.shape[0]
        theta = log_threshold.exp()
        a, fired, counts, a_sums, T, window = [], [], [], [], [], []
        scale = tanh_c * norms                                         # [L, F]
        for l in range(L):
            w = torch.sub(h[l], theta[l]).abs_()
            window.append(torch.lt(w, bandwidth / 2, out=w))           # 1.0 in the window
            m = _float_mask("gt", h[l], theta[l])
            fired.append(m)
            counts.append(m.sum(0))
            a_l = torch.mul(m, h[l])
            a.append(a_l)
            a_sums.append(a_l.sum(0))
            T.append(torch.tanh_(a_l * scale[l]))
        count = torch.stack(counts).round().to(torch.int64)            # [L, F]
        x_sum = xt.sum(1)
        pre_sum = _pre_sum(xt, x_sum, W_enc, b_enc, theta, torch.stack(a_sums) - theta * count)
        sparsity = sum(t.sum() for t in T)
        ctx.save_for_backward(xt, x_sum, theta, count, scale, *a, *fired, *T, *window)
        ctx.bandwidth, ctx.tanh_c, ctx.L = bandwidth, tanh_c, L
        ctx.mark_non_differentiable(count)
        return (*a, sparsity, pre_sum, count)

    @staticmethod
    def backward(ctx, *grads):
        L = ctx.L
        xt, x_sum, theta, count, scale, *rest = ctx.saved_tensors
        a, fired, T, window = rest[:L], rest[L:2 * L], rest[2 * L:3 * L], rest[3 * L:]
        g_a, g_sparsity, g_pre = grads[:L], grads[L], grads[L + 1]
        N, d, F = xt.shape[1], xt.shape[2], theta.shape[1]
        eps = ctx.bandwidth
        if g_pre is None:
            g_pre = torch.zeros_like(theta)
        if g_sparsity is None:
            g_sparsity = torch.zeros((), dtype=theta.dtype, device=theta.device)
        grad_W = xt.new_empty(L, d, F)
        grad_b, g_theta, g_norms = torch.empty_like(theta), torch.empty_like(theta), torch.empty_like(theta)
        one = torch.ones((), dtype=theta.dtype, device=theta.device)
        for l in range(L):
            # d tanh(c n a) = (1 - T^2) c n: to the activation and to the decoder norm
            # (the scalar g_sparsity is folded into the per-feature factors: one pass less)
            dT = torch.addcmul(one, T[l], T[l], value=-1.0)
            g_norms[l] = (ctx.tanh_c * g_sparsity) * (dT * a[l]).sum(0)
            factor = scale[l] * g_sparsity
            g_al = dT.mul_(factor) if g_a[l] is None else torch.addcmul(g_a[l], dT, factor, out=dT)
            # two-sided straight-through threshold gradient: every position in the window
            g_theta[l] = -(theta[l] / eps) * torch.mul(window[l], g_al).sum(0)
            # dL/dh: g_a at active positions, -gP where h < theta (see _SparseJumpEncode)
            S = g_al.add_(g_pre[l]).mul_(fired[l])
            grad_W[l] = xt[l].t() @ S
            grad_b[l] = S.sum(0)
        grad_W -= x_sum.unsqueeze(2) * g_pre.unsqueeze(1)
        grad_b -= N * g_pre
        g_theta += g_pre * (N - count)
        return None, None, grad_W, grad_b, g_theta * theta, None, g_norms, None


class _SparseDecode(torch.autograd.Function):
    """Decoder on the active pairs: y^[:, targets(l)] += S_l @ W_dec[l] for each source l.

    Forward: one CSR @ dense product per source layer. Backward: grad W_dec[l] =
    S_l^T @ g_y (only the rows of active features are non-zero) and the gradient of each
    active value is the dot product of its decoder row with its token's output gradient,
    i.e. g_y @ W_dec[l]^T sampled at the active pairs only.

    ``wvals`` are the (zero) values of the window pairs ``wpairs`` below the threshold:
    they change nothing in the forward pass, and their gradient is the same sampled
    product at those pairs (taken from a dense product where a layer's pairs are dense).
    """

    @staticmethod
    def forward(ctx, vals: Tensor, wvals: Tensor, pairs: _ActivePairs, wpairs: _ActivePairs,
                cross: bool, *W_dec: Tensor):
        L, N, F = pairs.L, pairs.N, pairs.F
        d = W_dec[0].shape[-1]
        out = torch.zeros(N, L, d, dtype=vals.dtype, device=vals.device)
        mats = []
        for l in range(L):
            dense = pairs.layer_is_dense(l, DECODER_DENSE_ABOVE)
            S = pairs.layer_dense(l, vals) if dense else pairs.layer_csr(l, vals)
            mats.append(S)
            W = W_dec[l].reshape(F, -1)
            prod = S @ W if dense else torch.sparse.mm(S, W)
            if cross:
                out[:, l:, :] += prod.view(N, L - l, d)
            else:
                out[:, l, :] += prod
        ctx.save_for_backward(vals, wvals, *W_dec)
        ctx.mats, ctx.pairs, ctx.wpairs, ctx.cross = mats, pairs, wpairs, cross
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):
        vals, wvals, *W_dec = ctx.saved_tensors
        mats, pairs, wpairs, cross = ctx.mats, ctx.pairs, ctx.wpairs, ctx.cross
        L, N, F = pairs.L, pairs.N, pairs.F
        g_vals = torch.empty_like(vals)
        g_wvals = torch.empty_like(wvals) if ctx.needs_input_grad[1] else None
        vals_sorted = None
        g_W = []
        for l in range(L):
            lo, hi = pairs.bounds[l], pairs.bounds[l + 1]
            g = (g_out[:, l:, :] if cross else g_out[:, l, :]).reshape(N, -1)   # [N, T*d]
            W = W_dec[l].reshape(F, -1)
            S = mats[l]
            G = None                                 # g @ W^T [N, F], where computed densely
            if g_wvals is not None:
                wlo, whi = wpairs.bounds[l], wpairs.bounds[l + 1]
                if whi > wlo:
                    if S.layout == torch.strided or wpairs.layer_is_dense(l, DECODER_DENSE_ABOVE):
                        G = g @ W.t()
                        rows, cols = wpairs.row[wlo:whi] - l * N, wpairs.col[wlo:whi]
                        g_wvals[wlo:whi] = G.view(-1)[rows * F + cols]
                    else:
                        Sw = wpairs.layer_csr(l, wvals)
                        g_wvals[wlo:whi] = torch.sparse.sampled_addmm(Sw, g, W.t(), beta=0.0).values()
            if S.layout == torch.strided:
                rows, cols = pairs.row[lo:hi] - l * N, pairs.col[lo:hi]
                G = g @ W.t() if G is None else G
                g_vals[lo:hi] = G.view(-1)[rows * F + cols]
                g_W.append((S.t() @ g).view_as(W_dec[l]))
            else:
                if G is not None:
                    rows, cols = pairs.row[lo:hi] - l * N, pairs.col[lo:hi]
                    g_vals[lo:hi] = G.view(-1)[rows * F + cols]
                else:
                    g_vals[lo:hi] = torch.sparse.sampled_addmm(S, g, W.t(), beta=0.0).values()
                if vals_sorted is None:
                    vals_sorted = vals[pairs.perm]
                St = pairs.layer_csr_t(l, vals_sorted)
                g_W.append(torch.sparse.mm(St, g).view_as(W_dec[l]))
        ctx.mats = ctx.pairs = ctx.wpairs = None
        return (g_vals, g_wvals, None, None, None, *g_W)


# ----------------------------------------------------------------------------- model -----

class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: CLTConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        L, d, F = cfg.n_layers, cfg.d_model, cfg.d_features
        # Initialisation as in circuit-tracer's and featflow's CLTs: encoder uniform in
        # +/- 1/sqrt(F), decoders in +/- 1/sqrt(L d). At the reference shape of the benchmark
        # it trains to a lower FVU at a lower L0 in every layer than the fan-in scales
        # (1/sqrt(d), 1/sqrt(L F)) used before; see book/methods.md.
        g = generator
        bound_enc = 1.0 / math.sqrt(F)
        self.W_enc = nn.Parameter(torch.empty(L, d, F).uniform_(-bound_enc, bound_enc, generator=g))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.log_threshold = nn.Parameter(torch.full((L, F), math.log(cfg.threshold_init)))
        bound_dec = 1.0 / math.sqrt(L * d)
        self.W_dec = nn.ParameterList([
            nn.Parameter(torch.empty(F, len(self.target_layers(l)), d)
                         .uniform_(-bound_dec, bound_dec, generator=g))
            for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.register_buffer("input_scale", torch.ones(L))
        self.register_buffer("output_scale", torch.ones(L))
        # BatchTopK: the per-layer threshold that replaces the batch selection at inference,
        # a running mean of the smallest kept activation during training.
        self.register_buffer("batchtopk_threshold", torch.zeros(L))
        self._work: dict = {}    # reused work buffers of the sparse path (not saved)

    # ---------------------------------------------------------------- structure -----
    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def target_layers(self, source: int) -> list[int]:
        """Layers that source layer ``source`` writes to."""
        if not 0 <= source < self.cfg.n_layers:
            raise IndexError(f"source layer {source} outside 0..{self.cfg.n_layers - 1}")
        return list(range(source, self.cfg.n_layers)) if self.cfg.cross_layer else [source]

    def release_buffers(self) -> None:
        """Free the work buffers that the fast training path keeps between steps."""
        self._work.clear()

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def decoder_norms(self) -> Tensor:
        """[L, F]: norm of each feature's decoder rows concatenated over its targets."""
        return torch.stack([W.pow(2).sum((1, 2)).sqrt() for W in self.W_dec])

    # --------------------------------------------------------------- forward ---------
    def pre_activations(self, x: Tensor) -> Tensor:
        """Raw MLP inputs [..., L, d] -> pre-activations h [..., L, F] (scaling inside), in
        the CLT's dtype (a loaded CLT may be bf16/fp16 beside a float32 model)."""
        xt = x.to(self.W_enc.dtype) * self.input_scale.unsqueeze(-1)
        return torch.einsum("...ld,ldf->...lf", xt, self.W_enc) + self.b_enc

    def _activate(self, h: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.activation == "jumprelu":
            return jumprelu(h, self.threshold, cfg.bandwidth)
        if cfg.activation == "topk":
            k = min(cfg.k, cfg.d_features)
            vals, idx = h.topk(k, dim=-1)
            return torch.zeros_like(h).scatter(-1, idx, vals.relu())
        # batchtopk
        if not self.training:
            return h * (h > self.batchtopk_threshold.unsqueeze(-1))
        L, F = cfg.n_layers, cfg.d_features
        hb = h.reshape(-1, L, F).transpose(0, 1).reshape(L, -1)          # [L, N*F]
        if _world_size() > 1:
            return self._global_batchtopk(hb).reshape(L, -1, F).transpose(0, 1).reshape(h.shape)
        n_tok = hb.shape[1] // F
        keep = min(cfg.k * n_tok, hb.shape[1])
        vals, idx = hb.topk(keep, dim=-1)
        vals = vals.relu()
        with torch.no_grad():
            # smallest positive kept value per layer, as a running mean
            pos = torch.where(vals > 0, vals, torch.full_like(vals, float("inf"))).amin(-1)
            pos = torch.where(torch.isfinite(pos), pos, self.batchtopk_threshold)
            self.batchtopk_threshold.mul_(0.99).add_(0.01 * pos)
        a = torch.zeros_like(hb).scatter(-1, idx, vals)
        return a.reshape(L, -1, F).transpose(0, 1).reshape(h.shape)

    def _global_batchtopk(self, hb: Tensor) -> Tensor:
        """BatchTopK over the global batch when torch.distributed runs with several ranks.

        Each rank holds a slice of the batch; selecting k * n_local on every slice would keep
        a different set than the single-process selection over the whole batch (a rank whose
        tokens have larger pre-activations would get no more than its share). So the ranks
        agree on one threshold per layer, the (k * n_global)-th largest pre-activation of the
        global batch: the union of every rank's local top-(k * n_global) values holds it, so
        one all-gather of those values gives it exactly. Each rank then keeps h >= that
        threshold (and h > 0), which is the single-process selection up to ties. The running
        inference threshold is updated with the global smallest kept value, identical on
        every rank. Every rank must call this together (training forward passes only)."""
        import torch.distributed as dist

        L, F = self.cfg.n_layers, self.cfg.d_features
        with torch.no_grad():
            n_local = torch.tensor([hb.shape[1] // F], dtype=torch.int64, device=hb.device)
            dist.all_reduce(n_local)
            keep = min(self.cfg.k * int(n_local), int(n_local) * F)
            local = hb.topk(min(keep, hb.shape[1]), dim=-1).values
            padded = torch.full((L, keep), float("-inf"), dtype=hb.dtype, device=hb.device)
            padded[:, :local.shape[1]] = local
            gathered = [torch.empty_like(padded) for _ in range(_world_size())]
            dist.all_gather(gathered, padded)
            kth = torch.cat(gathered, dim=1).topk(keep, dim=-1).values[:, -1]        # [L]
            mask = (hb >= kth[:, None]) & (hb > 0)
            pos = torch.where(mask, hb, torch.full_like(hb, float("inf"))).amin(-1)
            dist.all_reduce(pos, op=dist.ReduceOp.MIN)
            pos = torch.where(torch.isfinite(pos), pos, self.batchtopk_threshold)
            self.batchtopk_threshold.mul_(0.99).add_(0.01 * pos)
        return hb * mask

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., L, F] of raw MLP inputs [..., L, d]."""
        return self._activate(self.pre_activations(x))

    def _decode_layers(self, a: list[Tensor]) -> Tensor:
        """Normalised reconstruction [N, L, d] from per-layer activations a[l] [N, F]."""
        L, d = self.cfg.n_layers, self.cfg.d_model
        n = a[0].shape[0]
        outs = [self.b_dec[k].expand(n, d) for k in range(L)]
        for l in range(L):
            targets = self.target_layers(l)
            W = self.W_dec[l]
            contrib = (a[l] @ W.reshape(W.shape[0], -1)).view(n, len(targets), d)
            for j, k in enumerate(targets):
                outs[k] = outs[k] + contrib[:, j, :]
        return torch.stack(outs, dim=1)

    def _decode_normalised(self, acts: Tensor) -> Tensor:
        L, d = self.cfg.n_layers, self.cfg.d_model
        lead = acts.shape[:-2]
        a = acts.reshape(-1, L, acts.shape[-1])
        return self._decode_layers([a[:, l, :] for l in range(L)]).reshape(*lead, L, d)

    def decode(self, acts: Tensor) -> Tensor:
        """Reconstruction of the RAW MLP outputs [..., L, d] from activations [..., L, F]."""
        return self._decode_normalised(acts) / self.output_scale.unsqueeze(-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        acts = self.encode(x)
        return self.decode(acts), acts

    # ------------------------------------------------------------------ scales -------
    @torch.no_grad()
    def set_scales_from(self, x: Tensor, y: Tensor) -> None:
        """Per-layer s = sqrt(d_model) / E||.|| on a sample of raw inputs/outputs [N, L, d]."""
        d = self.cfg.d_model
        L = self.cfg.n_layers
        xn = x.reshape(-1, L, d).float().norm(dim=-1).mean(0)
        yn = y.reshape(-1, L, d).float().norm(dim=-1).mean(0)
        self.input_scale.copy_(math.sqrt(d) / xn.clamp_min(1e-12))
        self.output_scale.copy_(math.sqrt(d) / yn.clamp_min(1e-12))

    # -------------------------------------------------------------------- loss -------
    def loss(self, x: Tensor, y: Tensor, lambda_sparsity: float, tanh_c: float = 4.0,
             preact_coeff: float = 1e-4, sparse: bool | None = None) -> dict:
        """Training loss on raw MLP inputs/outputs [..., L, d], in normalised space.

        Returns a dict of tensors: ``total``, ``mse`` (sum over layers of the per-layer mean
        squared error, i.e. mean over tokens of ||y~ - y^||^2), ``sparsity`` and ``preact``
        (the unweighted penalty terms, averaged over tokens), ``l0`` (mean active features
        per token and layer), and, detached, ``mse_per_layer`` [L], ``fvu`` [L] (against the
        batch variance of the target), ``l0_per_layer`` [L], ``fire_counts`` [L, F] (tokens
        on which each feature fired). The TopK modes train on ``mse`` alone.

        ``sparse``: use the fast JumpReLU path (sparse kernels when few features fire, a
        fused dense mode otherwise; same values and gradients as plain autograd, no
        gradient to ``x``). ``None`` picks it for JumpReLU on the CPU, where it is tuned and
        tested; on GPUs plain autograd is the default (``sparse=True`` forces the fast path).
        """
        L, d = self.cfg.n_layers, self.cfg.d_model
        x = x.reshape(-1, L, d)
        y = y.reshape(-1, L, d)
        N = x.shape[0]
        yt = y * self.output_scale.unsqueeze(-1)
        norms = self.decoder_norms()
        jump = self.cfg.activation == "jumprelu"
        if sparse is None:
            sparse = jump and not x.requires_grad and x.device.type == "cpu"
        if sparse and not jump:
            raise ValueError("the sparse path exists for the JumpReLU activation only")
        if sparse:
            xt = (x * self.input_scale.unsqueeze(-1)).transpose(0, 1).contiguous()   # [L, N, d]
            eps = self.cfg.bandwidth
            theta = self.threshold.detach()
            h, mask = _jump_preactivations(xt, self.W_enc, self.b_enc, theta - eps / 2, self._work)
            # mode: the sparse kernels while the active pairs, plus the window pairs at a
            # third of their cost, stay below DENSE_ABOVE of all pairs
            budget = DENSE_ABOVE * mask.numel()
            n_mask = int(torch.count_nonzero(mask))          # fired + window pairs
            if WINDOW_PAIR_COST * n_mask > budget:
                split = None
            elif n_mask > budget:
                # undecided: count the fired pairs (one pass into the reused mask buffer)
                # before listing pairs that the dense mode would throw away
                n_fired = int(torch.count_nonzero(torch.gt(h, theta.unsqueeze(1), out=mask)))
                split = None
                if n_fired + WINDOW_PAIR_COST * (n_mask - n_fired) <= budget:
                    torch.gt(h, (theta - eps / 2).unsqueeze(1), out=mask)
                    split = _split_pairs(h, mask, theta)
            else:
                split = _split_pairs(h, mask, theta)
            if split is None:
                args = (h, xt, self.W_enc, self.b_enc, self.log_threshold, eps)
                *a, sparsity, pre_sum, fire_counts = _DenseJumpEncode.apply(*args, norms, tanh_c)
                y_hat = self._decode_layers(a)
                sparsity = sparsity / N
            else:
                vals, wvals, pre_sum = _SparseJumpEncode.apply(
                    h, split, xt, self.W_enc, self.b_enc, self.log_threshold, eps, self._work)
                pairs, wpairs = self._work.pop("pairs"), self._work.pop("wpairs")
                y_hat = _SparseDecode.apply(vals, wvals, pairs, wpairs, self.cfg.cross_layer,
                                            *self.W_dec)
                y_hat = y_hat + self.b_dec
                flat_norms = norms.reshape(-1)
                # the window pairs add 0 to the value; their gradient carries c ||W_dec||
                sparsity = (torch.tanh(tanh_c * vals * flat_norms[pairs.lf]).sum()
                            + torch.tanh(tanh_c * wvals * flat_norms[wpairs.lf]).sum()) / N
                fire_counts = pairs.count.view(L, -1)
            preact = (pre_sum * norms).sum() / N
        else:
            h = self.pre_activations(x)
            a = self._activate(h)
            y_hat = self._decode_normalised(a)
            fire_counts = (a > 0).sum(0)
            if jump:
                sparsity = torch.tanh(tanh_c * a * norms).sum() / N
                preact = (torch.relu(self.threshold - h) * norms).sum() / N
            else:
                sparsity = preact = torch.zeros((), dtype=x.dtype, device=x.device)
        err = (y_hat - yt).pow(2).sum(-1)                                 # [N, L]
        mse_per_layer = err.mean(0)
        mse = mse_per_layer.sum()
        if jump:
            total = mse + lambda_sparsity * sparsity + preact_coeff * preact
        else:
            total = mse
        with torch.no_grad():
            var = (yt - yt.mean(0)).pow(2).sum(-1).mean(0)
            l0_per_layer = fire_counts.sum(-1).to(x.dtype) / N
        return {
            "total": total, "mse": mse, "sparsity": sparsity, "preact": preact,
            "l0": l0_per_layer.mean(),
            "mse_per_layer": mse_per_layer.detach(), "fvu": mse_per_layer.detach() / var.clamp_min(1e-12),
            "l0_per_layer": l0_per_layer, "fire_counts": fire_counts,
        }

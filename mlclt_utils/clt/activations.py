"""MLP inputs and outputs of a TransformerLens model, for training and evaluating CLTs.

``collect_mlp_io`` returns them for a token tensor in one go (evaluation). For training,
``ActivationBuffer`` streams them through a shuffling buffer whose memory is bounded by
``buffer_tokens`` whatever the number of training tokens, and ``TensorSource`` serves
activations already in memory. Both serve batch ``t`` as a deterministic function of
``(seed, t)``: the training loop asks for ``source.batch(t)``, so resuming at step t needs
no saved buffer contents.

BOS positions (position 0 of every row, and any BOS token) are left out everywhere: their
activations are outliers with huge norms that would dominate the reconstruction loss.

How the buffer works. The kept tokens of the training set, in a per-epoch random order of
the rows, form one stream. The stream is cut into chunks of C = buffer_tokens / 2 tokens.
Each chunk is split at random into an early half and a late half. Refill r serves the late
half of chunk r-1 together with the early half of chunk r, shuffled: the buffer is refilled
with half a buffer of fresh tokens whenever it drains, every token is served exactly once
per epoch, and at most about buffer_tokens rows are held at once (chunk r, the late half of
chunk r-1, and the shuffled refill being assembled). The random choices of chunk c and refill
r come from generators seeded with (seed, c) and (seed, r), so batch t only depends on the
two chunks around it: resuming recomputes those two chunks and nothing else. Refill 0 holds
only the early half of chunk 0.

Under torchrun every rank builds the same global batches (the model forward is cheap next
to a CLT step) and keeps its own slice of each.

On-disk cache (``cache_dir``): each chunk is saved as a safetensors file (written to a
temporary name and renamed) in a sub-folder named by a hash of the model weights, the
tokens, the hooks, the chunk size and the seed, and reused by later runs that match.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import torch
from torch import Tensor

from ..artifacts import canonical_json, load_tensors, save_tensors
from ..tokenizer import BOS_ID

DEFAULT_INPUT_HOOK = "ln2.hook_normalized"
DEFAULT_OUTPUT_HOOK = "hook_mlp_out"


# --------------------------------------------------------------------------- helpers -----

def _bos_id(model, bos_id: int | None) -> int:
    if bos_id is not None:
        return int(bos_id)
    value = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    if isinstance(value, int):
        return value
    return BOS_ID


def kept_mask(tokens: Tensor, bos_id: int) -> Tensor:
    """True at the positions whose activations are used: not position 0, not a BOS token."""
    keep = tokens != bos_id
    keep[..., 0] = False
    return keep


def context_windows(tokens: Tensor, context_length: int, bos_id: int) -> Tensor:
    """Token rows [R, T] cut into short contexts [R * W, context_length] for CLT training.

    Each window is a BOS followed by the next ``context_length - 1`` tokens of its row (the
    tokens after the row's own BOS, in order, W = (T - 1) // (context_length - 1) windows
    per row, a last incomplete one dropped), so every trained position sees at most
    ``context_length - 1`` tokens of context, as in the paper's 16-token contexts. Windows
    are in row-major order. Rows already no longer than ``context_length`` are returned as
    they are."""
    tokens = torch.as_tensor(tokens).long()
    c = int(context_length)
    if c < 2:
        raise ValueError(f"context_length must be at least 2 (a BOS and one token), got {c}")
    if tokens.shape[-1] <= c:
        return tokens
    body = tokens[:, 1:]
    n = body.shape[1] // (c - 1)
    body = body[:, :n * (c - 1)].reshape(-1, c - 1)
    bos = torch.full((body.shape[0], 1), int(bos_id), dtype=tokens.dtype)
    return torch.cat([bos, body], dim=1)


def hook_names(n_layers: int, input_hook: str = DEFAULT_INPUT_HOOK,
               output_hook: str = DEFAULT_OUTPUT_HOOK) -> tuple[list[str], list[str]]:
    return ([f"blocks.{l}.{input_hook}" for l in range(n_layers)],
            [f"blocks.{l}.{output_hook}" for l in range(n_layers)])


@torch.no_grad()
def _forward_rows(model, tokens: Tensor, names_in: list[str], names_out: list[str],
                  keep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x, y [n_kept, L, d] of one batch of rows, in (row, position) order, on the CPU."""
    wanted = set(names_in) | set(names_out)
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in wanted,
                                    return_type=None)
    keep = keep.to(device)
    x = torch.stack([cache[n][keep] for n in names_in], dim=1)
    y = torch.stack([cache[n][keep] for n in names_out], dim=1)
    return x.to("cpu", dtype), y.to("cpu", dtype)


def collect_mlp_io(model, tokens: Tensor, batch_size: int = 32, languages: Tensor | None = None,
                   bos_id: int | None = None, input_hook: str = DEFAULT_INPUT_HOOK,
                   output_hook: str = DEFAULT_OUTPUT_HOOK, dtype: torch.dtype = torch.float32):
    """MLP inputs x and outputs y [n, L, d] at every kept position of ``tokens`` [rows, n_ctx].

    BOS positions are left out (see ``kept_mask``). With ``languages`` (one index per row)
    the per-token language index [n] is returned too: ``(x, y, lang)``.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    names_in, names_out = hook_names(model.cfg.n_layers, input_hook, output_hook)
    keep = kept_mask(tokens, _bos_id(model, bos_id))
    xs, ys = [], []
    for i in range(0, tokens.shape[0], batch_size):
        x, y = _forward_rows(model, tokens[i:i + batch_size], names_in, names_out,
                             keep[i:i + batch_size], dtype)
        xs.append(x)
        ys.append(y)
    L, d = model.cfg.n_layers, model.cfg.d_model
    x = torch.cat(xs) if xs else torch.empty(0, L, d, dtype=dtype)
    y = torch.cat(ys) if ys else torch.empty(0, L, d, dtype=dtype)
    if languages is None:
        return x, y
    languages = torch.as_tensor(languages)
    lang = languages.view(-1, 1).expand_as(tokens)[keep]
    return x, y, lang


def _generator(seed: int, tag: str, index: int) -> torch.Generator:
    """A generator seeded by (seed, tag, index), stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}/{tag}/{index}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def model_fingerprint(model) -> str:
    """Hash of a model's weights (for the activation cache key)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_fingerprint(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------- sources -----

class TensorSource:
    """Batches of activations already in memory: batch t of epoch e is a slice of a random
    permutation seeded by (seed, e); the last incomplete batch of an epoch is dropped."""

    def __init__(self, x: Tensor, y: Tensor, batch_tokens: int, seed: int = 0):
        if x.shape != y.shape or x.dim() != 3:
            raise ValueError(f"x and y must both be [n, L, d]; got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] < batch_tokens:
            raise ValueError(f"{x.shape[0]} activation rows are fewer than one batch of {batch_tokens}")
        self.x, self.y = x, y
        self.batch_tokens, self.seed = batch_tokens, seed
        self.n_layers, self.d_model = x.shape[1], x.shape[2]
        self._per_epoch = x.shape[0] // batch_tokens
        self._epoch, self._perm = -1, None

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        e, i = divmod(t, self._per_epoch)
        if e != self._epoch:
            self._epoch = e
            self._perm = torch.randperm(self.x.shape[0], generator=_generator(self.seed, "epoch", e))
        idx = self._perm[i * self.batch_tokens:(i + 1) * self.batch_tokens]
        return self.x[idx], self.y[idx]

    def fingerprint(self) -> str:
        return f"tensors:{tensor_fingerprint(self.x)}:{tensor_fingerprint(self.y)}:{self.seed}"


class ActivationBuffer:
    """Streams MLP inputs/outputs of ``model`` over ``tokens`` [rows, n_ctx] into a
    shuffling buffer of at most about ``buffer_tokens`` rows; ``batch(t)`` gives training
    batch t (``batch_tokens`` rows), a deterministic function of (seed, t).

    See the module docstring for the scheme. ``cache_dir=None`` disables the disk cache;
    ``write_cache=False`` reads the cache but never writes it (non-main ranks).
    ``context_length`` (preset key ``clt.context_length``): train on short contexts, the
    rows cut by ``context_windows`` (None: whole rows).
    """

    def __init__(self, model, tokens: Tensor, batch_tokens: int, buffer_tokens: int, seed: int = 0,
                 lm_batch_size: int = 32, cache_dir: str | os.PathLike | None = None,
                 write_cache: bool = True, bos_id: int | None = None,
                 input_hook: str = DEFAULT_INPUT_HOOK, output_hook: str = DEFAULT_OUTPUT_HOOK,
                 dtype: torch.dtype = torch.float32, context_length: int | None = None):
        self.model = model
        self.tokens = torch.as_tensor(tokens).long()
        self.batch_tokens = int(batch_tokens)
        self.seed = int(seed)
        self.lm_batch_size = int(lm_batch_size)
        self.dtype = dtype
        self.n_layers, self.d_model = model.cfg.n_layers, model.cfg.d_model
        self.names_in, self.names_out = hook_names(self.n_layers, input_hook, output_hook)
        self.bos_id = _bos_id(model, bos_id)
        self.context_length = context_length
        if context_length is not None:
            n_ctx = self.tokens.shape[-1]
            self.tokens = context_windows(self.tokens, context_length, self.bos_id)
            # as many tokens per model forward as with whole rows
            self.lm_batch_size *= max(1, n_ctx // self.tokens.shape[-1])
        self.keep = kept_mask(self.tokens, self.bos_id)
        self.kept_per_row = self.keep.sum(1)
        self.tokens_per_epoch = int(self.kept_per_row.sum())
        # chunk size: half the buffer, a multiple of two batches (each refill serves whole batches)
        unit = 2 * self.batch_tokens
        self.chunk_tokens = max(unit, (int(buffer_tokens) // 2) // unit * unit)
        if self.tokens_per_epoch < self.chunk_tokens:
            # a tiny data set: one chunk per epoch would repeat tokens within a refill
            self.chunk_tokens = max(unit, self.tokens_per_epoch // unit * unit)
        if self.tokens_per_epoch < unit:
            raise ValueError(f"the tokens hold only {self.tokens_per_epoch} usable positions, "
                             f"fewer than two batches of {self.batch_tokens}")
        self.buffer_tokens = 2 * self.chunk_tokens
        self._batches_round0 = (self.chunk_tokens // 2) // self.batch_tokens
        self._batches_per_round = self.chunk_tokens // self.batch_tokens
        self._round: tuple[int, Tensor, Tensor] | None = None
        self._late: tuple[int, Tensor, Tensor] | None = None
        self._epoch_cache: tuple[int, Tensor, Tensor] | None = None
        self.chunks_computed = 0      # model passes actually run (cache misses), for tests
        self.cache_dir = None
        self.write_cache = write_cache
        if cache_dir is not None:
            key = canonical_json({"model": model_fingerprint(model), "tokens": tensor_fingerprint(self.tokens),
                                  "hooks": [self.names_in, self.names_out], "bos": self.bos_id,
                                  "chunk": self.chunk_tokens, "seed": self.seed, "dtype": str(dtype),
                                  "lm_batch": self.lm_batch_size})
            self.cache_dir = Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ stream ------
    def _epoch(self, e: int) -> tuple[Tensor, Tensor]:
        """Row order of epoch e and the kept tokens before each row in that order."""
        if self._epoch_cache is None or self._epoch_cache[0] != e:
            perm = torch.randperm(self.tokens.shape[0], generator=_generator(self.seed, "epoch", e))
            before = torch.zeros(perm.numel() + 1, dtype=torch.int64)
            torch.cumsum(self.kept_per_row[perm], 0, out=before[1:])
            self._epoch_cache = (e, perm, before)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _stream(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Activations of stream positions [start, stop)."""
        xs, ys = [], []
        K = self.tokens_per_epoch
        p = start
        while p < stop:
            e, w = divmod(p, K)
            end = min(K, w + (stop - p))
            perm, before = self._epoch(e)
            i0 = int(torch.searchsorted(before, torch.tensor(w), right=True)) - 1
            i1 = int(torch.searchsorted(before, torch.tensor(end), right=False))
            rows = perm[i0:i1]
            parts_x, parts_y = [], []
            for j in range(0, rows.numel(), self.lm_batch_size):
                r = rows[j:j + self.lm_batch_size]
                x, y = _forward_rows(self.model, self.tokens[r], self.names_in, self.names_out,
                                     self.keep[r], self.dtype)
                parts_x.append(x)
                parts_y.append(y)
            lo = w - int(before[i0])
            x = torch.cat(parts_x)[lo:lo + end - w]
            y = torch.cat(parts_y)[lo:lo + end - w]
            xs.append(x)
            ys.append(y)
            p += end - w
        return torch.cat(xs), torch.cat(ys)

    def _chunk(self, c: int) -> tuple[Tensor, Tensor]:
        path = self.cache_dir / f"chunk_{c:07d}.safetensors" if self.cache_dir else None
        if path is not None and path.exists():
            t = load_tensors(path)
            return t["x"], t["y"]
        C = self.chunk_tokens
        x, y = self._stream(c * C, (c + 1) * C)
        self.chunks_computed += 1
        if path is not None and self.write_cache:
            save_tensors(path, {"x": x, "y": y})
        return x, y

    def _halves(self, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_early, y_early, x_late, y_late) of chunk c."""
        x, y = self._chunk(c)
        q = torch.randperm(x.shape[0], generator=_generator(self.seed, "split", c))
        half = x.shape[0] // 2
        e, l = q[:half], q[half:]
        return x[e], y[e], x[l], y[l]

    def _build_round(self, r: int) -> None:
        self._round = None                           # release the old refill first
        xe, ye, xl, yl = self._halves(r)
        if r == 0:
            parts = [(xe, ye)]
        else:
            if self._late is not None and self._late[0] == r - 1:
                _, xl_prev, yl_prev = self._late
            else:
                _, _, xl_prev, yl_prev = self._halves(r - 1)
            parts = [(xl_prev, yl_prev), (xe, ye)]
        n = sum(p[0].shape[0] for p in parts)
        dest = torch.randperm(n, generator=_generator(self.seed, "refill", r))
        X = torch.empty(n, self.n_layers, self.d_model, dtype=self.dtype)
        Y = torch.empty_like(X)
        i = 0
        for px, py in parts:
            k = px.shape[0]
            X.index_copy_(0, dest[i:i + k], px)
            Y.index_copy_(0, dest[i:i + k], py)
            i += k
        self._late = (r, xl, yl)
        self._round = (r, X, Y)

    # -------------------------------------------------------------------- api -------
    def locate(self, t: int) -> tuple[int, int]:
        """(refill index, batch index within the refill) of training batch t."""
        if t < self._batches_round0:
            return 0, t
        r, i = divmod(t - self._batches_round0, self._batches_per_round)
        return r + 1, i

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        r, i = self.locate(t)
        if self._round is None or self._round[0] != r:
            self._build_round(r)
        _, X, Y = self._round
        s = slice(i * self.batch_tokens, (i + 1) * self.batch_tokens)
        return X[s], Y[s]

    def resident_rows(self) -> int:
        """Activation rows held between calls (the current refill and the carried half)."""
        n = 0
        if self._round is not None:
            n += self._round[1].shape[0]
        if self._late is not None:
            n += self._late[1].shape[0]
        return n

    def fingerprint(self) -> str:
        return (f"buffer:{tensor_fingerprint(self.tokens)}:{self.seed}:{self.chunk_tokens}:"
                f"{self.batch_tokens}")

    def __iter__(self):
        t = 0
        while True:
            yield self.batch(t)
            t += 1


"""TopK SAEs on the residual stream, trained with SAELens's own classes and trainer.

One ``TopKTrainingSAE`` per layer, all trained in lockstep by SAELens's ``MultiSAETrainer``
on one shared stream: the model runs ONCE per batch of token rows and every layer's
``blocks.{l}.hook_resid_post`` is read from that one forward pass. The trained SAEs come
back as SAELens inference ``TopKSAE``s, converted exactly as SAELens's
``save_inference_model`` converts them (decoder norms folded into the weights), so
``save_sae`` / ``SAE.load_from_disk`` give back the very same SAE.

Why the project streams the activations itself instead of using SAELens's
``LanguageModelSAETrainingRunner`` / ``MultiSAETrainingRunner``: those runners load a
dataset by name (Hugging Face hub), tokenize it themselves and pack sequences with their
own separator rule. The project's models, tokenizer and token rows are local files (no
network), and its rule for which positions count is its own: the BOS column and every
BOS / PAD position are left out (``features.activations.kept_positions``), exactly as in
CLT training and in the feature statistics. So we hand ``MultiSAETrainer`` a plain
``MultiHookDataProvider`` (an iterator of ``{hook_name: [batch_tokens, d_model]}``) built
from our own rows, and let SAELens do everything else (SAE classes, loss, TopK auxiliary
loss for dead latents, Adam, dead-latent tracking, saving).

Settings fixed here, SAELens-wise:

* activation normalisation (``SAETrainingConfig.normalize_activations``): ``"none"`` (the raw
  residual stream) or ``"constant_norm_rescale"``, SAELens's name for scaling every token's
  vector to norm sqrt(d_in) before encoding and back after decoding, the rule of the
  bilingual-SAE study's code (which scales to norm 1; sqrt(d_in) keeps SAELens's initialisation
  and learning rates in their usual range). SAELens's training SAE refuses this setting
  together with the TopK auxiliary loss (the aux residual would be in the other space), so the
  training stream hands the SAE vectors already rescaled (:func:`normalise`) and the trained
  inference SAE is given ``normalize_activations="constant_norm_rescale"``: from then on its
  ``encode`` rescales the raw stream itself, and its config on disk says so;
* wandb: ``LoggingConfig(log_to_wandb=False)`` (every wandb call in the trainer is behind
  that flag; ``WANDB_MODE=disabled`` is also set unless the environment says otherwise);
  no checkpoints, no final checkpoint, no evaluator: nothing is written and nothing goes
  to the network during training;
* TopK: SAELens's training default ``rescale_acts_by_decoder_norm=True`` (the TopK choice
  uses decoder-norm-scaled pre-activations); the conversion to the inference SAE folds the
  norms into the weights.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Iterator
from unittest import mock

import torch
from torch import Tensor

from ..features.activations import kept_positions
from ..tokenizer import BOS_ID, PAD_ID

os.environ.setdefault("WANDB_MODE", "disabled")

MIX_BATCHES = 4          # the mixing buffer holds at least this many SAE batches
NORMALISATIONS = ("none", "constant_norm_rescale")


def hook_name(layer: int) -> str:
    """The residual-stream hook an SAE of ``layer`` reads: ``blocks.{layer}.hook_resid_post``."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class SAETrainingConfig:
    """Settings of a TopK SAE training run (one SAE per layer, all alike)."""

    d_sae: int                     # latents (paper: 16 x d_model)
    k: int = 32                    # TopK
    train_tokens: int = 200_000    # activation vectors per SAE
    batch_tokens: int = 1024       # SAE batch size in tokens
    lr: float = 4e-4
    seed: int = 0
    model_batch_rows: int = 16     # token rows per model forward
    dead_window_tokens: int | None = None  # a latent silent this long counts as dead (TopK aux loss);
    # None: SAELens's default dead_feature_window (1000 steps)
    init_tokens: int = 4096        # the decoder bias starts at the mean of this many activations (0: at zero)
    normalize_activations: str = "none"    # or "constant_norm_rescale": every token's vector to norm sqrt(d)

    def __post_init__(self):
        for name in ("d_sae", "k", "train_tokens", "batch_tokens", "model_batch_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.k > self.d_sae:
            raise ValueError(f"k {self.k} is larger than d_sae {self.d_sae}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if isinstance(self.init_tokens, bool) or not isinstance(self.init_tokens, int) or self.init_tokens < 0:
            raise ValueError(f"init_tokens must be a non-negative integer, got {self.init_tokens!r}")
        if self.normalize_activations not in NORMALISATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALISATIONS}, "
                             f"got {self.normalize_activations!r}")
        if self.dead_window_tokens is not None and self.dead_window_tokens <= 0:
            raise ValueError(f"dead_window_tokens must be positive or None, got {self.dead_window_tokens!r}")

    @property
    def dead_feature_window_steps(self) -> int | None:
        """``dead_window_tokens`` in SAELens's unit (training steps), or None for its default."""
        if self.dead_window_tokens is None:
            return None
        return max(1, math.ceil(self.dead_window_tokens / self.batch_tokens))


# ----------------------------------------------------------------------------- activations

def normalise(x: Tensor) -> Tensor:
    """Every vector of ``x`` [..., d] scaled to norm sqrt(d), as SAELens's
    ``constant_norm_rescale`` scales an SAE's input (a zero vector stays zero)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x * (x.shape[-1] ** 0.5 / norm.clamp_min(torch.finfo(x.dtype).tiny))


def input_scale(sae, h: Tensor) -> Tensor:
    """What ``sae`` divides each vector of ``h`` [..., d] by before encoding: ``|h| / sqrt(d)``
    for a ``constant_norm_rescale`` SAE, 1 otherwise; multiply a decoder output by it to put
    it back in the units of ``h``."""
    if getattr(sae.cfg, "normalize_activations", "none") == "constant_norm_rescale":
        return h.norm(dim=-1, keepdim=True) / h.shape[-1] ** 0.5
    return torch.ones_like(h[..., :1])


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _kept_activations(model, tokens: Tensor, layers: list[int]) -> dict[str, Tensor]:
    """One forward pass of ``model`` on ``tokens`` [B, T]; every layer's residual stream at
    the kept positions, as ``{hook_name: [n_kept, d_model]}`` (row-major order)."""
    tokens = tokens.to(_model_device(model))
    keep = kept_positions(tokens, BOS_ID, PAD_ID)
    names = [hook_name(l) for l in layers]
    # stop after the last layer needed: no later blocks, no unembedding
    _, cache = model.run_with_cache(tokens, names_filter=names, stop_at_layer=max(layers) + 1)
    return {n: cache[n][keep] for n in names}


def stream_activations(model, rows: Tensor, layers: list[int], batch_rows: int) -> Iterator[dict[str, Tensor]]:
    """Residual-stream activations of ``layers`` over token ``rows`` [N, T], in order.

    Runs the model once per ``batch_rows`` rows and yields, per batch, a dict
    ``blocks.{l}.hook_resid_post -> [n_kept_tokens, d_model]`` with the activations at the
    kept positions only (not BOS, not PAD: ``features.activations.kept_positions``), in
    row-major order; the vectors of all layers belong to the same tokens.
    """
    layers = _check_layers(model, layers)
    rows = _check_rows(rows)
    for start in range(0, rows.shape[0], batch_rows):
        yield _kept_activations(model, rows[start:start + batch_rows], layers)


def _check_layers(model, layers) -> list[int]:
    layers = [int(l) for l in layers]
    if not layers:
        raise ValueError("layers is empty")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {layers} has duplicates")
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are not layers of a {model.cfg.n_layers}-layer model")
    return layers


def _check_rows(rows) -> Tensor:
    rows = torch.as_tensor(rows)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rows must be a non-empty [N, T] tensor of token ids, got "
                         f"{tuple(rows.shape)} {rows.dtype}")
    return rows.long()


def _cycled_stream(model, rows: Tensor, layers: list[int], batch_rows: int, seed: int,
                   device: torch.device, rescale: bool = False) -> Iterator[dict[str, Tensor]]:
    """Endless ``stream_activations``: the rows in a fresh seeded random order each epoch
    (``rescale``: every vector through :func:`normalise`)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=gen)
        for start in range(0, rows.shape[0], batch_rows):
            acts = _kept_activations(model, rows[order[start:start + batch_rows]], layers)
            acts = {n: a.to(device=device, dtype=torch.float32) for n, a in acts.items()}
            yield {n: normalise(a) for n, a in acts.items()} if rescale else acts


def _data_provider(model, rows, layers, cfg: SAETrainingConfig, device) -> Iterator[dict[str, Tensor]]:
    """SAELens ``MultiHookDataProvider``: ``{hook_name: [batch_tokens, d_model]}`` batches,
    drawn from the cycled stream through SAELens's multi-hook mixing buffer (one shared
    shuffle, so each batch holds the same tokens at every hook)."""
    from sae_lens.training.mixing_buffer import multi_hook_concat_split_iter

    names = [hook_name(l) for l in layers]
    per_forward = cfg.model_batch_rows * rows.shape[1]
    buffer = max(MIX_BATCHES * cfg.batch_tokens, 2 * per_forward)
    batches = multi_hook_concat_split_iter(
        buffer_size=buffer, batch_size=cfg.batch_tokens,
        activations_loader=_cycled_stream(model, rows, layers, cfg.model_batch_rows, cfg.seed, device,
                                          rescale=cfg.normalize_activations != "none"),
        hook_names=names, mix_fraction=0.5)
    for batch in batches:
        yield {n: t.contiguous() for n, t in batch.items()}


# ----------------------------------------------------------------------------- training

def _training_sae(d_in: int, cfg: SAETrainingConfig, layer: int, model, context_size: int, device: str):
    """A fresh SAELens ``TopKTrainingSAE`` for one layer (weights from the global RNG)."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    metadata = SAEMetadata(
        model_name=getattr(model.cfg, "model_name", None), model_class_name=type(model).__name__,
        hook_name=hook_name(layer), hook_head_index=None, context_size=context_size,
        prepend_bos=True, exclude_special_tokens=[BOS_ID, PAD_ID], dataset_path=None)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, dtype="float32", device=str(device),
        normalize_activations="none", metadata=metadata)
    return TopKTrainingSAE(sae_cfg)


@torch.no_grad()
def _init_decoder_bias(saes: dict, model, rows: Tensor, layers: list[int], cfg: SAETrainingConfig) -> None:
    """Start every SAE's decoder bias at the mean activation of the first ``init_tokens``
    kept positions of ``rows``: the usual start of a TopK SAE (SAELens 5 offered it as
    ``b_dec_init_method="mean"``; SAELens 6 starts at zero and has no data-based start). The
    residual stream of these models has a mean as large as its spread (norm 42 against 62
    per token on the small preset), which a zero start must first learn. Measured on the
    small preset's s model: dead latents 74-80 % against 77-82 % from zero, FVU alike; the
    width of the SAE matters far more (presets.py, "bilingual")."""
    seen = {hook_name(l): [] for l in layers}
    n = 0
    for batch in stream_activations(model, rows, layers, cfg.model_batch_rows):
        for name, a in batch.items():
            seen[name].append(a)
        n += next(iter(batch.values())).shape[0]
        if n >= cfg.init_tokens:
            break
    for l in layers:
        sae = saes[f"layer_{l}"]
        acts = torch.cat(seen[hook_name(l)])[:cfg.init_tokens]
        if cfg.normalize_activations != "none":
            acts = normalise(acts)
        mean = acts.mean(0)
        sae.b_dec.copy_(mean.to(sae.b_dec))


def to_inference_sae(sae, normalize_activations: str = "none"):
    """The SAELens inference SAE of a training SAE, built as ``save_inference_model`` +
    ``SAE.load_from_disk`` would build it (an inference SAE is returned as it is).
    ``normalize_activations``: the rescaling the training stream applied, written into the
    inference SAE's config so that it rescales raw input itself."""
    from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE

    if not isinstance(sae, TrainingSAE):
        return sae
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    cfg_dict = sae.cfg.get_inference_sae_cfg_dict()
    cfg_dict["normalize_activations"] = normalize_activations
    cfg = SAEConfig.from_dict(cfg_dict)
    with torch.random.fork_rng(devices=_rng_devices(cfg.device)):   # its random init is overwritten
        inference = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    inference.process_state_dict_for_loading(state)
    inference.load_state_dict(state)
    return inference.eval()


def _rng_devices(device: str) -> list[int]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return [dev.index if dev.index is not None else torch.cuda.current_device()]
    return []


def trainer_config(cfg: SAETrainingConfig, device: str = "cpu"):
    """SAELens's ``SAETrainerConfig`` for ``cfg``: constant learning rate, no checkpoints, no
    evaluator, no wandb."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    trainer_kwargs = {}
    if cfg.dead_feature_window_steps is not None:
        trainer_kwargs["dead_feature_window"] = cfg.dead_feature_window_steps
    return SAETrainerConfig(
        total_training_samples=cfg.train_tokens, train_batch_size_samples=cfg.batch_tokens,
        # lr_end must be given (the runner configs set it to lr / 10 in __post_init__; the bare
        # SAETrainerConfig does not, and SAETrainer asserts it); unused by the constant schedule
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant", device=str(device), autocast=False,
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), **trainer_kwargs)


def train_saes(model, rows: Tensor, layers: list[int], cfg: SAETrainingConfig,
               device: str = "cpu", progress: bool = True, return_training: bool = False) -> dict:
    """Train one TopK SAE per layer in ``layers`` on the residual stream of ``model``.

    All SAEs are trained in lockstep by SAELens's ``MultiSAETrainer``, on a stream that runs
    the model once per ``cfg.model_batch_rows`` token rows and feeds every layer's kept
    positions (no BOS, no PAD), shuffled through a small mixing buffer. The rows are read in
    a random order drawn from ``cfg.seed``, again in a new order whenever ``train_tokens``
    needs more tokens than the rows hold. Seeded: the same inputs give the same weights
    (the global torch RNG is left as it was).

    Returns ``{layer: SAE}``: SAELens inference ``TopKSAE``s (``return_training=True``: the
    ``TopKTrainingSAE``s as the trainer left them; with ``constant_norm_rescale`` these expect
    input already through :func:`normalise`, the inference SAEs take the raw stream).
    """
    from sae_lens.training import multi_sae_trainer
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    layers = _check_layers(model, layers)
    rows = _check_rows(rows)
    if not bool(kept_positions(rows, BOS_ID, PAD_ID).any()):
        raise ValueError("rows hold no kept positions (only BOS / PAD): nothing to train on")
    device = str(device)
    names = {f"layer_{l}": hook_name(l) for l in layers}

    trainer_cfg = trainer_config(cfg, device)

    quiet = nullcontext() if progress else mock.patch.object(
        multi_sae_trainer, "tqdm", partial(multi_sae_trainer.tqdm, disable=True))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)), quiet:
            torch.manual_seed(cfg.seed)
            saes = {f"layer_{l}": _training_sae(model.cfg.d_model, cfg, l, model, rows.shape[1], device)
                    for l in layers}
            if cfg.init_tokens:
                _init_decoder_bias(saes, model, rows, layers, cfg)
            trainer = MultiSAETrainer(
                cfg=trainer_cfg, saes=saes, hook_names=names,
                data_provider=_data_provider(model, rows, layers, cfg, torch.device(device)))
            trained = trainer.fit()
    finally:
        model.train(was_training)
    out = {l: trained[f"layer_{l}"].eval() for l in layers}
    if return_training:
        return out
    return {l: to_inference_sae(s, cfg.normalize_activations) for l, s in out.items()}


# ----------------------------------------------------------------------------- files

def save_sae(sae, path) -> None:
    """Write ``sae`` to the folder ``path`` in SAELens's format (``cfg.json`` and
    ``sae_weights.safetensors``): a training SAE as SAELens saves its final inference model
    (``save_inference_model``), an inference SAE with ``save_model``."""
    from sae_lens.saes.sae import TrainingSAE

    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(path)
    else:
        sae.save_model(path)


def load_sae(path, device: str = "cpu"):
    """An SAE saved by ``save_sae`` (or any SAELens SAE folder): ``sae_lens.SAE.load_from_disk``."""
    from sae_lens import SAE

    return SAE.load_from_disk(path, device=device)


# ----------------------------------------------------------------------------- quality

@torch.no_grad()
def sae_quality(sae, acts: Tensor, batch_size: int = 4096) -> dict:
    """Reconstruction quality of ``sae`` on activation vectors ``acts`` [n, d_in].

    * ``fvu``: fraction of variance unexplained, sum((x - x_hat)^2) / sum((x - mean(x))^2),
      the denominator taken about the vectors' own mean;
    * ``l0``: mean number of active (non-zero) latents per vector;
    * ``dead_share``: fraction of latents that never fire on ``acts``;
    * ``n_tokens``: the number of vectors.
    """
    acts = torch.as_tensor(acts)
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise ValueError(f"acts must be a non-empty [n, d] tensor, got shape {tuple(acts.shape)}")
    was_training = sae.training
    sae.eval()
    dtype = getattr(sae, "dtype", torch.float32)
    dev = sae.W_enc.device
    mean = acts.double().mean(0)
    err = total = 0.0
    active = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=dev)
    try:
        for start in range(0, acts.shape[0], batch_size):
            x = acts[start:start + batch_size].to(device=dev, dtype=dtype)
            z = sae.encode(x)
            if z.is_sparse:
                z = z.to_dense()
            x_hat = sae.decode(z)
            err += float((x.double() - x_hat.double()).pow(2).sum())
            total += float((x.double() - mean.to(dev)).pow(2).sum())
            on = z != 0
            active += int(on.sum())
            fired |= on.any(0)
    finally:
        sae.train(was_training)
    return {"fvu": err / total if total > 0 else float("nan"), "l0": active / acts.shape[0],
            "dead_share": float((~fired).float().mean()), "n_tokens": int(acts.shape[0])}

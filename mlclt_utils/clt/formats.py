"""File formats of cross-layer transcoders.

Two formats here (circuit-tracer's classes are in ``mlclt_utils.graphs.circuit_tracer``):

* The project format (``save_clt`` / ``load_clt``): ``clt.safetensors`` with every
  parameter and buffer of ``CrossLayerTranscoder`` (state-dict names), and
  ``config.json`` with the ``CLTConfig`` and a format version. Round trips are bit-exact.
* The layout of the paper's released CLTs (reference package ``featflow``):
  ``load_featflow_clt`` / ``save_featflow_clt`` / ``load_featflow_clt_from_hub``.

Conversions between layouts are hand-written because each library defines its own tensor
layout and there is no shared converter; each one is a few reshapes, checked by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import load_tensors, read_json, save_tensors, write_json
from .model import CLTConfig, CrossLayerTranscoder

FORMAT_NAME = "mlclt-clt"
FORMAT_VERSION = 1
WEIGHTS_FILE = "clt.safetensors"
CONFIG_FILE = "config.json"


# ------------------------------------------------------------------ project format -----

def save_clt(clt: CrossLayerTranscoder, folder) -> Path:
    """Write ``clt`` to ``folder/clt.safetensors`` + ``folder/config.json`` (atomically:
    the weights first, the config last, each written to a temporary name and renamed)."""
    folder = Path(folder)
    state = {k: v.detach() for k, v in clt.state_dict().items()}
    save_tensors(folder / WEIGHTS_FILE, state, metadata={"format": FORMAT_NAME,
                                                          "format_version": str(FORMAT_VERSION)})
    write_json(folder / CONFIG_FILE, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                      "clt": clt.cfg.to_dict()})
    return folder


def load_clt(folder, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """Load a CLT written by ``save_clt``, in eval mode."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder} holds no CLT in the project format "
                                f"(expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = read_json(cfg_path)
    if meta.get("format") != FORMAT_NAME or int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r} is not readable by this package "
                         f"({FORMAT_NAME} up to version {FORMAT_VERSION})")
    clt = CrossLayerTranscoder(CLTConfig.from_dict(meta["clt"]))
    clt.load_state_dict(load_tensors(weights_path), strict=True)
    return clt.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------ featflow layout -----

FEATFLOW_WEIGHTS_FILE = "clt_weights.safetensors"
FEATFLOW_CONFIG_FILE = "clt_cfg.json"
_CONFIG_NAMES = (FEATFLOW_CONFIG_FILE, "cfg.json", "config.json")

# accepted names of each tensor, first match wins
_ALIASES = {
    "W_enc": ("W_enc", "w_enc"),
    "b_enc": ("b_enc",),
    "W_dec": ("W_dec", "w_dec"),
    "b_dec": ("b_dec",),
    "log_threshold": ("log_threshold",),
    "threshold": ("threshold", "jumprelu_threshold"),
    "scale_in": ("estimated_norm_scaling_factor_in", "norm_scaling_factor_in", "input_scale",
                 "scaling_factor_in"),
    "scale_out": ("estimated_norm_scaling_factor_out", "norm_scaling_factor_out",
                  "output_scale", "scaling_factor_out"),
}


def triangle_pairs(n_layers: int) -> list[tuple[int, int]]:
    """The (source, target) pairs of the featflow decoder stack, in storage order: sources
    0..L-1 in turn, and for each source its targets source..L-1 (the row-major upper
    triangle, as ``torch.triu_indices(L, L)``)."""
    return [(l, k) for l in range(n_layers) for k in range(l, n_layers)]


def _pick(tensors: dict, name: str):
    for key in _ALIASES[name]:
        if key in tensors:
            return tensors[key]
    return None


def _read_featflow_files(path: Path) -> tuple[dict, dict]:
    if path.is_file():
        files, folder = [path], path.parent
    elif path.is_dir():
        main = path / FEATFLOW_WEIGHTS_FILE
        files = [main] if main.exists() else sorted(path.glob("*.safetensors"))
        folder = path
    else:
        raise FileNotFoundError(f"no CLT checkpoint at {path}")
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors file")
    tensors: dict = {}
    for f in files:
        tensors.update(load_tensors(f))
    cfg = {}
    for name in _CONFIG_NAMES:
        if (folder / name).exists():
            cfg = json.loads((folder / name).read_text())
            break
    return tensors, cfg


# What the encoder of a featflow-layout CLT was trained to read, times its input scale
# factors (``estimated_norm_scaling_factor_in``):
#   "ln2"            the output of ln2, after its gain and bias (what the MLP reads);
#   "ln2_normalized" ln2.hook_normalized, before gain and bias (this project's convention,
#                    and what ``save_featflow_clt`` writes);
#   "resid_mid"      the raw residual stream before ln2 (``hook_resid_mid``).
INPUT_CONVENTIONS = ("ln2", "ln2_normalized", "resid_mid")

# load_featflow_clt's check on a model's own activations warns above this FVU
FVU_WARN_ABOVE = 0.5

_NO_PROCESSING = ("Load the model with HookedTransformer.from_pretrained_no_processing(...) "
                  "(or from_pretrained(..., fold_ln=False, center_writing_weights=False, "
                  "center_unembed=False)) so that ln2 keeps its gain and bias.")


def _ln2_affine(model, layer: int, convention: str):
    """(w, b) of ln2 in ``layer`` as float64 CPU tensors (b may be None for RMSNorm), after
    checking that the model can serve ``convention`` exactly."""
    ln = model.blocks[layer].ln2
    w, b = getattr(ln, "w", None), getattr(ln, "b", None)
    kind = type(ln).__name__
    folded = kind.endswith("Pre") or getattr(model.cfg, "normalization_type", None) in ("LNPre", "RMSPre")
    if w is None and convention == "resid_mid" and not folded:
        return None, None                 # no normalisation at all: the residual is as trained
    if w is None:
        what = ("its gain and bias, which the encoder must absorb," if convention == "ln2" else
                "the residual stream it was trained on (folding also centres the residual "
                "stream),")
        raise ValueError(
            f"model block {layer}'s ln2 is {kind} (no gain or bias): its LayerNorm weights were "
            f"folded into the next layer, as HookedTransformer.from_pretrained does by default. "
            f"A CLT trained with input_convention={convention!r} cannot be applied exactly to "
            f"such a model: it lacks {what} and the folding cannot be undone. {_NO_PROCESSING}")
    return w.detach().double().cpu(), None if b is None else b.detach().double().cpu()


@torch.no_grad()
def fidelity_check(clt: CrossLayerTranscoder, model, tokens, n_batches: int = 4,
                   batch_size: int = 8) -> dict:
    """Reconstruction of ``model``'s MLP outputs by ``clt`` on up to ``n_batches`` batches of
    ``batch_size`` rows of ``tokens`` ([rows, n_ctx] token ids, or text for
    ``model.to_tokens``), BOS positions excluded. Per layer: ``fvu`` (against the target's
    variance), ``mse``, and ``zero_mse``, the error of predicting 0; ``worse_than_zero``
    lists the layers where mse > zero_mse."""
    from .activations import collect_mlp_io

    if isinstance(tokens, (str, list, tuple)) and not torch.is_tensor(tokens):
        tokens = model.to_tokens(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    tokens = tokens[:n_batches * batch_size]
    cfg = clt.cfg
    x, y = collect_mlp_io(model, tokens, batch_size, input_hook=cfg.input_hook,
                          output_hook=cfg.output_hook)
    if x.shape[0] == 0:
        raise ValueError("the check tokens hold no position besides BOS")
    x, y = x.to(clt.W_enc.device, clt.W_enc.dtype), y.to(clt.W_enc.device, clt.W_enc.dtype)
    y_hat, _ = clt(x)
    y, y_hat = y.double(), y_hat.double()
    mse = (y - y_hat).pow(2).sum(-1).mean(0)
    var = (y - y.mean(0)).pow(2).sum(-1).mean(0)
    zero = y.pow(2).sum(-1).mean(0)
    fvu = mse / var.clamp_min(1e-300)
    return {"fvu": fvu.tolist(), "mse": mse.tolist(), "zero_mse": zero.tolist(),
            "worse_than_zero": [l for l in range(cfg.n_layers) if mse[l] > zero[l]],
            "n_tokens": int(x.shape[0])}


def load_featflow_clt(path, model=None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, input_convention: str = "ln2",
                      check_tokens=None, check_batches: int = 4,
                      check_batch_size: int = 8) -> CrossLayerTranscoder:
    """Load a CLT stored in the layout of the paper's released CLTs (package ``featflow``).

    ``path``: a ``.safetensors`` file, or a folder holding ``clt_weights.safetensors`` (else
    every ``*.safetensors`` in it, merged), with an optional config ``clt_cfg.json`` /
    ``cfg.json`` / ``config.json`` (keys used: ``d_in``, ``d_latent`` or ``d_features``,
    ``n_layers``, ``cross_layer_decoders``, ``jumprelu_bandwidth``; sizes are otherwise
    read from the tensors).

    Tensors (first matching name wins):

    * ``W_enc`` / ``w_enc`` [L, d, F]; ``b_enc`` [L, F];
    * ``W_dec`` / ``w_dec`` [L(L+1)/2, F, d] for cross-layer decoders, stacked in the order
      of ``triangle_pairs``: sources 0..L-1, for each source its targets source..L-1;
      or [L, F, d] for per-layer decoders;
    * ``b_dec`` [L(L+1)/2, d] (one bias per decoder block, summed over the sources of each
      target, as featflow does) or [L, d];
    * ``log_threshold`` [L, F] (or ``threshold`` / ``jumprelu_threshold`` [L, F], logged);
    * input / output scale factors [L]: ``estimated_norm_scaling_factor_in`` / ``_out``
      (also ``norm_scaling_factor_in/_out``, ``input_scale``/``output_scale``,
      ``scaling_factor_in/_out``); ones when absent.

    Other tensors (featflow's ``feature_count``, ``layer_mask``) are ignored.

    ``input_convention`` says what the stored encoder reads (times the input scale
    factors); the file does not record it, so it is an explicit choice (``INPUT_CONVENTIONS``):

    * ``"ln2"`` (default): the output of ``ln2`` after its gain and bias. This project's
      CLT reads ``ln2.hook_normalized``, before them, so with ``model`` each layer's ln2
      gain ``w`` and bias ``b`` are folded into the encoder, exactly: W_enc' = diag(w) W_enc,
      b_enc' = b_enc + s_in (b W_enc) (no bias for RMSNorm). Without a model nothing is
      folded, which is right only if every ln2 gain is 1 and bias 0.
    * ``"ln2_normalized"``: ``ln2.hook_normalized`` itself; nothing is folded.
    * ``"resid_mid"``: the raw residual stream ``hook_resid_mid``; the CLT then reads that
      hook (``cfg.input_hook``), nothing is folded.

    A model whose LayerNorm weights were folded (``HookedTransformer.from_pretrained``'s
    default: ln2 becomes ``LayerNormPre``, without gain or bias, and the residual stream
    is centred) is refused for ``"ln2"`` and ``"resid_mid"``, with a ValueError saying to
    load it with ``HookedTransformer.from_pretrained_no_processing``: the gain, bias and
    uncentred residual the CLT needs are gone from such a model. (``"ln2_normalized"`` is
    unaffected by folding.)

    ``check_tokens`` (with ``model``): token rows [rows, n_ctx] (or text) on which, after
    loading, ``fidelity_check`` measures the reconstruction of the model's MLP outputs
    over ``check_batches`` batches of ``check_batch_size`` rows. A UserWarning naming
    ``input_convention`` is raised when any layer's FVU exceeds ``FVU_WARN_ABOVE`` (0.5) or
    any layer does worse than predicting zero: the usual cause is a wrong convention or a
    model other than the one the CLT was trained on. The measurement is kept on the
    returned module as ``clt.fidelity``.
    """
    if input_convention not in INPUT_CONVENTIONS:
        raise ValueError(f"input_convention {input_convention!r} is not one of {INPUT_CONVENTIONS}")
    if check_tokens is not None and model is None:
        raise ValueError("check_tokens needs the model whose MLP outputs the CLT reconstructs")
    tensors, cfg = _read_featflow_files(Path(path))
    W_enc = _pick(tensors, "W_enc")
    if W_enc is None or W_enc.ndim != 3:
        raise ValueError(f"{path}: no encoder W_enc [L, d, F] (looked for {_ALIASES['W_enc']})")
    W_enc = W_enc.double()
    L, d, F = W_enc.shape
    if cfg.get("d_in") not in (None, d):
        raise ValueError(f"{path}: config d_in {cfg['d_in']} differs from W_enc's d {d}; "
                         "W_enc must be [L, d, F]")
    n_feat = cfg.get("d_latent", cfg.get("d_features"))
    if n_feat not in (None, F):
        raise ValueError(f"{path}: config d_latent {n_feat} differs from W_enc's F {F}")
    if cfg.get("n_layers") not in (None, L):
        raise ValueError(f"{path}: config n_layers {cfg['n_layers']} differs from W_enc's L {L}")

    W_dec = _pick(tensors, "W_dec")
    if W_dec is None:
        raise ValueError(f"{path}: no decoder W_dec (looked for {_ALIASES['W_dec']})")
    pairs = triangle_pairs(L)
    cross = cfg.get("cross_layer_decoders")
    if cross is None:
        cross = W_dec.shape[0] == len(pairs)
    n_blocks = len(pairs) if cross else L
    if tuple(W_dec.shape) != (n_blocks, F, d):
        raise ValueError(f"{path}: W_dec has shape {tuple(W_dec.shape)}, expected "
                         f"{(n_blocks, F, d)} for {'cross-layer' if cross else 'per-layer'} decoders")
    b_enc = _pick(tensors, "b_enc")
    b_enc = torch.zeros(L, F, dtype=torch.float64) if b_enc is None else b_enc.double()
    b_dec = _pick(tensors, "b_dec")
    if b_dec is None:
        b_dec_t = torch.zeros(L, d, dtype=torch.float64)
    elif b_dec.shape[0] == L:
        b_dec_t = b_dec.double()
    elif cross and b_dec.shape[0] == len(pairs):
        b_dec_t = torch.zeros(L, d, dtype=torch.float64)
        for i, (_, k) in enumerate(pairs):
            b_dec_t[k] += b_dec[i].double()
    else:
        raise ValueError(f"{path}: b_dec has shape {tuple(b_dec.shape)}, expected [{L}, {d}] "
                         f"or [{len(pairs)}, {d}]")
    log_thr = _pick(tensors, "log_threshold")
    if log_thr is None:
        thr = _pick(tensors, "threshold")
        if thr is None:
            raise ValueError(f"{path}: no JumpReLU threshold (log_threshold or threshold)")
        log_thr = thr.double().reshape(L, F).log()
    scale_in = _pick(tensors, "scale_in")
    scale_out = _pick(tensors, "scale_out")

    hook = {"resid_mid": "hook_resid_mid"}.get(input_convention, "ln2.hook_normalized")
    clt_cfg = CLTConfig(n_layers=L, d_model=d, d_features=F, activation="jumprelu",
                        cross_layer=bool(cross),
                        bandwidth=float(cfg.get("jumprelu_bandwidth", 1.0)), input_hook=hook)
    clt = CrossLayerTranscoder(clt_cfg)
    s_in = torch.ones(L, dtype=torch.float64) if scale_in is None else scale_in.double().reshape(L)
    s_out = torch.ones(L, dtype=torch.float64) if scale_out is None else scale_out.double().reshape(L)
    if model is not None:
        if model.cfg.n_layers != L or model.cfg.d_model != d:
            raise ValueError(f"{path}: the CLT has {L} layers of width {d}, the model "
                             f"{model.cfg.n_layers} of width {model.cfg.d_model}")
        for l in range(L):
            if input_convention == "ln2_normalized":
                break
            w, b = _ln2_affine(model, l, input_convention)
            if input_convention == "ln2":
                if b is not None:
                    b_enc[l] = b_enc[l] + s_in[l] * (b @ W_enc[l])
                W_enc[l] = w[:, None] * W_enc[l]
    with torch.no_grad():
        clt.W_enc.copy_(W_enc)
        clt.b_enc.copy_(b_enc)
        clt.log_threshold.copy_(log_thr.double().reshape(L, F))
        clt.b_dec.copy_(b_dec_t)
        clt.input_scale.copy_(s_in)
        clt.output_scale.copy_(s_out)
        if cross:
            for i, (l, k) in enumerate(pairs):
                clt.W_dec[l][:, k - l, :].copy_(W_dec[i])
        else:
            for l in range(L):
                clt.W_dec[l][:, 0, :].copy_(W_dec[l])
    clt = clt.to(device=device, dtype=dtype).eval()
    if check_tokens is not None:
        clt.fidelity = fidelity_check(clt, model, check_tokens, check_batches, check_batch_size)
        fvu, bad = clt.fidelity["fvu"], clt.fidelity["worse_than_zero"]
        if max(fvu) > FVU_WARN_ABOVE or bad:
            import warnings

            warnings.warn(
                f"load_featflow_clt({str(path)!r}, input_convention={input_convention!r}): the "
                f"CLT reconstructs this model's MLP outputs badly: FVU per layer "
                f"{[round(v, 3) for v in fvu]} (warning above {FVU_WARN_ABOVE})"
                + (f", layers {bad} worse than predicting zero" if bad else "")
                + f". Check input_convention (one of {INPUT_CONVENTIONS}: what the encoder was "
                "trained to read) and that this is the model the CLT was trained on.",
                UserWarning, stacklevel=2)
    return clt


def save_featflow_clt(clt: CrossLayerTranscoder, folder) -> Path:
    """Write ``clt`` in the featflow layout that ``load_featflow_clt`` reads:
    ``folder/clt_weights.safetensors`` + ``folder/clt_cfg.json``. The decoder bias is
    stored per decoder block as featflow does, with each target's bias on its own
    (source = target) block and zeros elsewhere. JumpReLU CLTs only (featflow has no TopK)."""
    cfg = clt.cfg
    if cfg.activation != "jumprelu":
        raise ValueError(f"the featflow layout holds JumpReLU CLTs only, not {cfg.activation!r}")
    L, d, F = cfg.n_layers, cfg.d_model, cfg.d_features
    folder = Path(folder)
    if cfg.cross_layer:
        pairs = triangle_pairs(L)
        W_dec = torch.stack([clt.W_dec[l][:, k - l, :] for l, k in pairs])
        b_dec = torch.zeros(len(pairs), d, dtype=clt.b_dec.dtype)
        for i, (l, k) in enumerate(pairs):
            if l == k:
                b_dec[i] = clt.b_dec[k]
    else:
        W_dec = torch.stack([clt.W_dec[l][:, 0, :] for l in range(L)])
        b_dec = clt.b_dec
    tensors = {"W_enc": clt.W_enc, "b_enc": clt.b_enc, "W_dec": W_dec, "b_dec": b_dec,
               "log_threshold": clt.log_threshold,
               "estimated_norm_scaling_factor_in": clt.input_scale,
               "estimated_norm_scaling_factor_out": clt.output_scale}
    save_tensors(folder / FEATFLOW_WEIGHTS_FILE, {k: v.detach().cpu() for k, v in tensors.items()})
    write_json(folder / FEATFLOW_CONFIG_FILE, {
        "d_in": d, "d_latent": F, "n_layers": L, "cross_layer_decoders": cfg.cross_layer,
        "jumprelu_init_threshold": cfg.threshold_init, "jumprelu_bandwidth": cfg.bandwidth})
    return folder


def load_featflow_clt_from_hub(repo_id: str, subfolder: str | None = None,
                               revision: str | None = None, model=None,
                               device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32,
                               **options) -> CrossLayerTranscoder:
    """Download a released CLT from the Hugging Face hub (only when called) and load it with
    ``load_featflow_clt``. ``subfolder``: the folder of one CLT inside the repository;
    ``options``: ``load_featflow_clt``'s ``input_convention`` and check arguments."""
    from huggingface_hub import snapshot_download

    patterns = None
    if subfolder:
        patterns = [f"{subfolder.strip('/')}/*"]
    local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    if subfolder:
        local = local / subfolder.strip("/")
    return load_featflow_clt(local, model=model, device=device, dtype=dtype, **options)


__all__ = [
    "save_clt", "load_clt", "triangle_pairs", "load_featflow_clt", "save_featflow_clt",
    "load_featflow_clt_from_hub", "fidelity_check", "INPUT_CONVENTIONS",
]

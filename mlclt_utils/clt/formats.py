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
import math
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
             dtype: torch.dtype | None = None) -> CrossLayerTranscoder:
    """Load a CLT written by ``save_clt``, in eval mode (``dtype=None``: as stored)."""
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
    state = load_tensors(weights_path)
    with torch.device("meta"):
        clt = CrossLayerTranscoder(CLTConfig.from_dict(meta["clt"]))
    _materialize(clt, device, dtype or state["W_enc"].dtype)
    clt.load_state_dict(state, strict=True)
    return clt.eval()


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


class _LazyTensors:
    """The tensors of one or more ``.safetensors`` files, read only when asked for (whole,
    or one row of the first dimension at a time): a released CLT is several GB, so the
    loader never holds a second full copy of it."""

    def __init__(self, files):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def row(self, name: str, i: int) -> torch.Tensor:
        return self._where[name].get_slice(name)[i]


def _open_featflow(path: Path) -> tuple[_LazyTensors, dict]:
    if path.is_file():
        files, folder = [path], path.parent
    elif path.is_dir():
        main = path / FEATFLOW_WEIGHTS_FILE
        files = [main] if main.exists() else sorted(path.glob("*.safetensors"))
        folder = path
    else:
        raise FileNotFoundError(f"no CLT checkpoint at {path}")
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors file (expected {FEATFLOW_WEIGHTS_FILE})")
    cfg = {}
    for name in _CONFIG_NAMES:
        if (folder / name).exists():
            cfg = json.loads((folder / name).read_text())
            break
    return _LazyTensors(files), cfg


def _name(tensors: _LazyTensors, name: str) -> str | None:
    return next((key for key in _ALIASES[name] if key in tensors), None)


def featflow_clt_size(path, dtype: torch.dtype = torch.float32) -> dict:
    """What loading the featflow-layout CLT at ``path`` needs, read from the file headers
    only: layers, features, parameters and gigabytes at ``dtype`` (the loader's peak is this
    plus one decoder block)."""
    tensors, _ = _open_featflow(Path(path))
    enc, dec = _name(tensors, "W_enc"), _name(tensors, "W_dec")
    if enc is None or dec is None:
        raise ValueError(f"{path}: no encoder W_enc [L, d, F] or decoder W_dec "
                         f"(looked for {_ALIASES['W_enc']} and {_ALIASES['W_dec']})")
    L, d, F = tensors.shape(enc)
    # the loaded CLT's parameters: encoder, decoder blocks, thresholds and one bias per layer
    n = L * d * F + math.prod(tensors.shape(dec)) + 2 * L * F + L * d
    size = torch.empty((), dtype=dtype).element_size()
    return {"n_layers": L, "d_model": d, "features_per_layer": F, "parameters": int(n),
            "gigabytes": n * size / 1e9, "dtype": str(dtype).replace("torch.", "")}


def _materialize(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Give every parameter and floating buffer of a module built on the meta device real,
    uninitialised storage of ``dtype`` on ``device``, one tensor at a time (``to_empty``
    would allocate float32 first)."""
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[key] = torch.nn.Parameter(
                    torch.empty(p.shape, device=device, dtype=dtype), requires_grad=p.requires_grad)
        for key, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[key] = torch.empty(b.shape, device=device,
                                                dtype=dtype if b.is_floating_point() else b.dtype)


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

    ``dtype`` / ``device``: the CLT is built there directly and filled one encoder layer and
    one decoder block at a time, so the peak memory is the CLT at ``dtype`` plus one block
    (``featflow_clt_size`` says how much before anything is read). The ln2 folding is done
    in float64 per layer before the cast.
    """
    if input_convention not in INPUT_CONVENTIONS:
        raise ValueError(f"input_convention {input_convention!r} is not one of {INPUT_CONVENTIONS}")
    if check_tokens is not None and model is None:
        raise ValueError("check_tokens needs the model whose MLP outputs the CLT reconstructs")
    tensors, cfg = _open_featflow(Path(path))
    names = {k: _name(tensors, k) for k in _ALIASES}
    if names["W_enc"] is None or len(tensors.shape(names["W_enc"])) != 3:
        raise ValueError(f"{path}: no encoder W_enc [L, d, F] (looked for {_ALIASES['W_enc']})")
    L, d, F = tensors.shape(names["W_enc"])
    if cfg.get("d_in") not in (None, d):
        raise ValueError(f"{path}: config d_in {cfg['d_in']} differs from W_enc's d {d}; "
                         "W_enc must be [L, d, F]")
    n_feat = cfg.get("d_latent", cfg.get("d_features"))
    if n_feat not in (None, F):
        raise ValueError(f"{path}: config d_latent {n_feat} differs from W_enc's F {F}")
    if cfg.get("n_layers") not in (None, L):
        raise ValueError(f"{path}: config n_layers {cfg['n_layers']} differs from W_enc's L {L}")

    if names["W_dec"] is None:
        raise ValueError(f"{path}: no decoder W_dec (looked for {_ALIASES['W_dec']})")
    dec_shape = tensors.shape(names["W_dec"])
    pairs = triangle_pairs(L)
    cross = cfg.get("cross_layer_decoders")
    if cross is None:
        cross = dec_shape[0] == len(pairs)
    n_blocks = len(pairs) if cross else L
    if dec_shape != (n_blocks, F, d):
        raise ValueError(f"{path}: W_dec has shape {dec_shape}, expected "
                         f"{(n_blocks, F, d)} for {'cross-layer' if cross else 'per-layer'} decoders")

    def small(name, default):
        return default if names[name] is None else tensors.get(names[name]).double()

    b_enc = small("b_enc", torch.zeros(L, F, dtype=torch.float64))
    b_dec = small("b_dec", torch.zeros(L, d, dtype=torch.float64))
    if b_dec.shape[0] != L:
        if not (cross and b_dec.shape[0] == len(pairs)):
            raise ValueError(f"{path}: b_dec has shape {tuple(b_dec.shape)}, expected [{L}, {d}] "
                             f"or [{len(pairs)}, {d}]")
        summed = torch.zeros(L, d, dtype=torch.float64)
        for i, (_, k) in enumerate(pairs):
            summed[k] += b_dec[i]
        b_dec = summed
    if names["log_threshold"] is not None:
        log_thr = tensors.get(names["log_threshold"]).double().reshape(L, F)
    elif names["threshold"] is not None:
        log_thr = tensors.get(names["threshold"]).double().reshape(L, F).log()
    else:
        raise ValueError(f"{path}: no JumpReLU threshold (log_threshold or threshold)")
    s_in = small("scale_in", torch.ones(L, dtype=torch.float64)).reshape(L)
    s_out = small("scale_out", torch.ones(L, dtype=torch.float64)).reshape(L)

    ln2 = [(None, None)] * L
    if model is not None:
        if model.cfg.n_layers != L or model.cfg.d_model != d:
            raise ValueError(f"{path}: the CLT has {L} layers of width {d}, the model "
                             f"{model.cfg.n_layers} of width {model.cfg.d_model}")
        if input_convention == "ln2":
            ln2 = [_ln2_affine(model, l, input_convention) for l in range(L)]
        elif input_convention == "resid_mid":
            for l in range(L):
                _ln2_affine(model, l, input_convention)       # refuses a folded model

    hook = {"resid_mid": "hook_resid_mid"}.get(input_convention, "ln2.hook_normalized")
    clt_cfg = CLTConfig(n_layers=L, d_model=d, d_features=F, activation="jumprelu",
                        cross_layer=bool(cross),
                        bandwidth=float(cfg.get("jumprelu_bandwidth", 1.0)), input_hook=hook)
    # built on the meta device and given storage in ``dtype`` directly: a released CLT
    # (24,576 features per layer over 12 layers) is about 6.8 GB in float32
    with torch.device("meta"):
        clt = CrossLayerTranscoder(clt_cfg)
    _materialize(clt, device, dtype)
    with torch.no_grad():
        for l in range(L):                              # the encoder one layer at a time
            W = tensors.row(names["W_enc"], l).double()
            w, b = ln2[l]
            if b is not None:
                b_enc[l] = b_enc[l] + s_in[l] * (b @ W)
            if w is not None:
                W = w[:, None] * W
            clt.W_enc[l].copy_(W)
        clt.b_enc.copy_(b_enc)
        clt.log_threshold.copy_(log_thr)
        clt.b_dec.copy_(b_dec)
        clt.input_scale.copy_(s_in)
        clt.output_scale.copy_(s_out)
        clt.batchtopk_threshold.zero_()
        for i, (l, k) in enumerate(pairs if cross else [(l, l) for l in range(L)]):
            clt.W_dec[l][:, k - l, :].copy_(tensors.row(names["W_dec"], i))
    clt.eval()
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
    from ..sources import local_folder

    local, _ = local_folder({"hub": repo_id, "subfolder": subfolder, "revision": revision})
    return load_featflow_clt(local, model=model, device=device, dtype=dtype, **options)


__all__ = [
    "save_clt", "load_clt", "triangle_pairs", "load_featflow_clt", "save_featflow_clt",
    "load_featflow_clt_from_hub", "featflow_clt_size", "fidelity_check", "INPUT_CONVENTIONS",
]

"""File formats of cross-layer transcoders, and the bridge to circuit-tracer.

Three formats:

* The project format (``save_clt`` / ``load_clt``): ``clt.safetensors`` with every
  parameter and buffer of ``CrossLayerTranscoder`` (state-dict names), and
  ``config.json`` with the ``CLTConfig`` and a format version. Round trips are bit-exact.
* The layout of the paper's released CLTs (reference package ``featflow``):
  ``load_featflow_clt`` / ``save_featflow_clt`` / ``load_featflow_clt_from_hub``.
* circuit-tracer's own classes (``to_circuit_tracer``, ``build_replacement_model``), so that
  its attribution graphs run on the project's models and CLTs with no hub access.

Conversions between layouts are hand-written because each library defines its own tensor
layout and there is no shared converter; each one is a few reshapes, checked by the tests.
"""

from __future__ import annotations

import copy
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


def load_featflow_clt(path, model=None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
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

    featflow's CLTs read the output of ``ln2`` after its gain and bias; this project's CLT
    reads ``ln2.hook_normalized``, before them. When ``model`` (a HookedTransformer with
    LayerNorm weights) is given, each layer's ln2 gain ``w`` and bias ``b`` are folded into
    the encoder, exactly: W_enc' = diag(w) W_enc, b_enc' = b_enc + s_in (b W_enc). Without a
    model the CLT is used as stored, which is right for models whose ln2 has no affine part
    (LayerNorm folded into the MLP weights).
    """
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

    clt_cfg = CLTConfig(n_layers=L, d_model=d, d_features=F, activation="jumprelu",
                        cross_layer=bool(cross),
                        bandwidth=float(cfg.get("jumprelu_bandwidth", 1.0)))
    clt = CrossLayerTranscoder(clt_cfg)
    s_in = torch.ones(L, dtype=torch.float64) if scale_in is None else scale_in.double().reshape(L)
    s_out = torch.ones(L, dtype=torch.float64) if scale_out is None else scale_out.double().reshape(L)
    if model is not None:
        for l in range(L):
            ln = model.blocks[l].ln2
            w = getattr(ln, "w", None)
            b = getattr(ln, "b", None)
            if w is None:
                continue  # no affine part: nothing to fold
            w, b = w.detach().double().cpu(), b.detach().double().cpu()
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
    return clt.to(device=device, dtype=dtype).eval()


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
                               dtype: torch.dtype = torch.float32) -> CrossLayerTranscoder:
    """Download a released CLT from the Hugging Face hub (only when called) and load it with
    ``load_featflow_clt``. ``subfolder``: the folder of one CLT inside the repository."""
    from huggingface_hub import snapshot_download

    patterns = None
    if subfolder:
        patterns = [f"{subfolder.strip('/')}/*"]
    local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    if subfolder:
        local = local / subfolder.strip("/")
    return load_featflow_clt(local, model=model, device=device, dtype=dtype)


# ------------------------------------------------------------------ circuit-tracer -----

def _export_thresholds(clt: CrossLayerTranscoder) -> torch.Tensor:
    """[L, F] thresholds of an elementwise JumpReLU equal to the CLT's activation."""
    cfg = clt.cfg
    if cfg.activation == "jumprelu":
        return clt.log_threshold.detach().exp()
    if cfg.activation == "batchtopk":
        # at inference BatchTopK keeps h > threshold[l]: a JumpReLU with one threshold per layer
        return clt.batchtopk_threshold.detach()[:, None].expand(cfg.n_layers, cfg.d_features)
    raise ValueError("circuit-tracer supports elementwise activations only (ReLU, JumpReLU); "
                     "a TopK CLT picks the k largest features of each token, which it cannot "
                     "express. Export a JumpReLU or BatchTopK CLT instead.")


@torch.no_grad()
def to_circuit_tracer(clt: CrossLayerTranscoder, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """The same transcoder as circuit-tracer's class, with the normalisation folded in.

    A cross-layer CLT becomes ``circuit_tracer...CrossLayerTranscoder``; a per-layer one a
    ``TranscoderSet`` of ``SingleLayerTranscoder``. Both read ``cfg.input_hook``
    (``ln2.hook_normalized``) and write ``cfg.output_hook`` (``hook_mlp_out``) of each block,
    and work on raw activations: W_enc' = s_in[l] W_enc[l] (transposed to circuit-tracer's
    [L, F, d]), W_dec'[l -> k] = W_dec[l -> k] / s_out[k], b_dec'[k] = b_dec[k] / s_out[k];
    b_enc and the thresholds are unchanged. Pre-activations, activations and reconstructions
    are then the same functions of the raw MLP input as the project's module (equal up to
    float rounding).
    """
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    cfg = clt.cfg
    L, d, F = cfg.n_layers, cfg.d_model, cfg.d_features
    device = torch.device(device)
    s_in = clt.input_scale.detach().double()
    s_out = clt.output_scale.detach().double()
    thr = _export_thresholds(clt).double()
    W_enc = (clt.W_enc.detach().double() * s_in[:, None, None]).transpose(1, 2)   # [L, F, d]
    b_enc = clt.b_enc.detach().double()
    b_dec = clt.b_dec.detach().double() / s_out[:, None]

    def cast(t):
        return t.to(device=device, dtype=dtype).contiguous()

    if cfg.cross_layer:
        from circuit_tracer.transcoder.cross_layer_transcoder import (
            CrossLayerTranscoder as CTCrossLayerTranscoder)

        ct = CTCrossLayerTranscoder(L, F, d, activation_function="jump_relu", lazy_decoder=False,
                                    feature_input_hook=cfg.input_hook,
                                    feature_output_hook=cfg.output_hook, device=device, dtype=dtype)
        ct.W_enc.copy_(cast(W_enc))
        ct.b_enc.copy_(cast(b_enc))
        ct.b_dec.copy_(cast(b_dec))
        ct.activation_function.threshold.copy_(cast(thr[:, None, :]))
        for l in range(L):
            W = clt.W_dec[l].detach().double() / s_out[l:][None, :, None]
            ct.W_dec[l].copy_(cast(W))
        return ct.eval()

    from circuit_tracer.transcoder.single_layer_transcoder import (SingleLayerTranscoder,
                                                                   TranscoderSet)

    layers = {}
    for l in range(L):
        t = SingleLayerTranscoder(d, F, JumpReLU(cast(thr[l])), layer_idx=l, device=device,
                                  dtype=dtype)
        t.W_enc.copy_(cast(W_enc[l]))
        t.b_enc.copy_(cast(b_enc[l]))
        t.W_dec.copy_(cast(clt.W_dec[l].detach().double()[:, 0, :] / s_out[l]))
        t.b_dec.copy_(cast(b_dec[l]))
        layers[l] = t
    return TranscoderSet(layers, feature_input_hook=cfg.input_hook,
                         feature_output_hook=cfg.output_hook).eval()


def _wrapped_name(key: str) -> str:
    """State-dict name of a HookedTransformer weight inside circuit-tracer's model, which
    wraps every MLP (``blocks.N.mlp.old_mlp.*``) and the unembedding (``unembed.old_unembed.*``)."""
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "mlp":
        return ".".join(parts[:3] + ["old_mlp"] + parts[3:])
    if parts[0] == "unembed":
        return ".".join(["unembed", "old_unembed"] + parts[1:])
    return key


@torch.no_grad()
def build_replacement_model(model, clt, tokenizer=None):
    """circuit-tracer's ``ReplacementModel`` (TransformerLens backend) of ``model`` with
    ``clt`` (a project CLT, or a transcoder already made by ``to_circuit_tracer``), built
    from the model's config and weights without any hub access.

    circuit-tracer freezes attention patterns and the LayerNorm scales (``hook_scale``) in
    its backward passes, so reading ``ln2.hook_normalized`` keeps the attribution linear:
    between the residual stream and that hook only the centring and the division by the
    frozen scale remain. ``tokenizer``: defaults to ``model.tokenizer``; circuit-tracer needs
    one to name logit targets, and its BOS id must not be 0.
    """
    from circuit_tracer import ReplacementModel

    if isinstance(clt, CrossLayerTranscoder):
        transcoder = to_circuit_tracer(clt, dtype=model.cfg.dtype, device=model.cfg.device)
    else:
        transcoder = clt
    replacement = ReplacementModel.from_config(copy.deepcopy(model.cfg), transcoder)
    state = {_wrapped_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = replacement.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("transcoders.")]
    if missing or unexpected:
        raise RuntimeError(f"model weights do not fit circuit-tracer's model: missing {missing}, "
                           f"unexpected {unexpected}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        if getattr(tokenizer, "bos_token_id", None) == 0:
            raise ValueError("circuit-tracer cannot use a tokenizer whose BOS id is 0")
        # assigned directly: TransformerLens' set_tokenizer would reload it by name from the hub
        replacement.tokenizer = tokenizer
    return replacement.eval()


__all__ = [
    "save_clt", "load_clt", "triangle_pairs", "load_featflow_clt", "save_featflow_clt",
    "load_featflow_clt_from_hub", "to_circuit_tracer", "build_replacement_model",
]

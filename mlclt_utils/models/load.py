"""Loading a trained model's weights from its folder, reading its metrics, and greedy
generation. Finding a run's models in the artifact store is the stage registry's work
(``stages.load_model``, ``stages.read_metrics``): this module never reaches up into it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..artifacts import METRICS_FILE, ManifestMismatch, load_tensors, read_json, read_jsonl  # noqa: F401
from ..tokenizer import BOS_ID, EOS_ID
from .config import build_model, config_from_dict
from .train import checkpoint_name

# ----------------------------------------------------------------------------- loading

def checkpoint_steps(folder) -> list[int]:
    """Steps with saved weights in a model folder, ascending (the last is the final step)."""
    return sorted(int(p.stem.split("_")[1]) for p in (Path(folder) / "checkpoints").glob("step_*.safetensors"))


def load_model_from(folder, tokenizer_folder=None, step: int | None = None, device: str = "cpu"):
    """The model saved in ``folder`` (``step=None``: the final weights, else the checkpoint
    at ``step``), in eval mode, with the tokenizer of ``tokenizer_folder`` attached."""
    folder = Path(folder)
    cfg = config_from_dict(read_json(folder / "config.json")["hooked_transformer"], init_weights=False)
    weights = folder / ("model.safetensors" if step is None else checkpoint_name(step))
    if not weights.exists():
        raise ValueError(f"model {cfg.model_name!r} has no checkpoint at step {step}; available: "
                         f"{checkpoint_steps(folder)}")
    tokenizer = None
    if tokenizer_folder is not None:
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_folder)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(load_tensors(weights))
    model.to(device, print_details=False)
    model.eval()
    return model


def val_loss_columns(metrics, languages) -> dict[str, str]:
    """Language -> the column of ``read_metrics``'s frame holding its validation loss."""
    return {lang: f"val_loss_{lang}" for lang in languages if f"val_loss_{lang}" in metrics.columns}


def trained_steps(steps: list[int], metrics, share: float = 0.1) -> list[int]:
    """The checkpoints at which training has moved the loss: the logged loss (mean validation
    loss over languages, else the training loss), read at the checkpoint's step, has fallen
    by at least ``share`` of its whole fall. Earlier checkpoints are shown, not counted."""
    import numpy as np

    cols = [c for c in metrics.columns if c.startswith("val_loss_")] or ["train_loss"]
    m = metrics.dropna(subset=cols).sort_values("step")
    if m.empty:
        return list(steps)
    loss = m[cols].mean(1).to_numpy()
    at = np.interp(np.asarray(steps, dtype=float), m["step"].to_numpy(dtype=float), loss)
    cut = loss[0] - share * (loss[0] - loss.min())
    return [int(s) for s, v in zip(steps, at) if v <= cut]


# ----------------------------------------------------------------------------- generation

def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=special)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


def _special_id(tokenizer, attr: str, default: int) -> int:
    value = getattr(tokenizer, attr, None)
    return int(value) if isinstance(value, int) else default


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: Mapping[str, str], max_new_tokens: int
                         ) -> dict[str, str]:
    """Greedy (argmax, no sampling) continuation of each prompt; stops at EOS.

    Each prompt is encoded without special tokens and preceded by BOS, as in training.
    Returns only the generated text (special tokens removed).
    """
    bos = _special_id(tokenizer, "bos_token_id", BOS_ID)
    eos = _special_id(tokenizer, "eos_token_id", EOS_ID)
    device = next(model.parameters()).device
    n_ctx = model.cfg.n_ctx
    out = {}
    for lang, prompt in prompts.items():
        ids = [bos] + _encode(tokenizer, prompt)
        new: list[int] = []
        for _ in range(max_new_tokens):
            window = torch.tensor([(ids + new)[-n_ctx:]], device=device)
            nxt = int(model(window, return_type="logits")[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
        out[lang] = tokenizer.decode(new, skip_special_tokens=True)
    return out


def is_degenerate(text: str, lang: str) -> bool:
    """True for a continuation that mostly repeats itself: fewer than half of its words (of
    its characters, for languages written without spaces) are distinct, or it is (nearly)
    empty. A rough reading aid for the book, not a measure of fluency."""
    from ..languages import NO_SPACE_LANGUAGES

    units = [c for c in text if not c.isspace()] if lang in NO_SPACE_LANGUAGES else text.split()
    if len("".join(units)) < 3:
        return True
    return len(units) >= 4 and len(set(units)) < len(units) / 2

"""Which device a run uses and in which precision it trains: the one place that decides.

Mixed precision is chosen from what the card does natively. bfloat16 needs compute
capability 8.0 or higher (A100, L4, H100...); older cards such as Colab's free T4 (7.5)
emulate it slowly, so they get float16 with a gradient scaler instead. The CPU trains in
float32: most CPUs (this project's CI machine among them) have no native bfloat16 matrix
units, and there autocast would convert back and forth for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def default_device(local_rank: int | None = None) -> str:
    """``"cuda"`` when a GPU is visible (``"cuda:<local_rank>"``, this process's card,
    under torchrun), else ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda" if local_rank is None else f"cuda:{local_rank}"
    return "cpu"


def describe_device(device: str | torch.device | None = None) -> str:
    """A short human description, e.g. ``"cuda (Tesla T4, compute capability 7.5)"``."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    return device.type


@dataclass(frozen=True)
class Precision:
    """How a training step runs: ``dtype`` of autocast (None: plain float32), whether a
    gradient scaler is needed (float16), and why this was chosen."""

    dtype: torch.dtype | None
    scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]

    def autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def make_scaler(self, device_type: str):
        """A ``torch.amp.GradScaler`` for float16, else None."""
        return torch.amp.GradScaler(device_type) if self.scaler else None


FLOAT32 = Precision(None, False, "float32")


def training_precision(device: str | torch.device, mixed: bool = True) -> Precision:
    """The precision of a training step on ``device``. ``mixed=False`` (the preset's
    ``training.mixed_precision``) keeps float32 everywhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return Precision(None, False, f"float32 on {device.type}: no native bfloat16 matrix units assumed")
    if not mixed:
        return Precision(None, False, "float32: mixed precision turned off")
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return Precision(torch.bfloat16, False,
                         f"bfloat16 autocast: compute capability {major}.{minor} supports it natively")
    return Precision(torch.float16, True,
                     f"float16 autocast with a gradient scaler: compute capability {major}.{minor} "
                     f"(< 8.0) would only emulate bfloat16")

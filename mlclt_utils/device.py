"""Which device a run uses and in which precision it trains: the one place that decides.

Mixed precision is chosen from what the card does natively. bfloat16 needs compute
capability 8.0 or higher (A100, L4, H100...); older cards such as Colab's free T4 (7.5)
emulate it slowly, so they get float16 with a gradient scaler instead. A CPU trains in
bfloat16 autocast only when it has native bfloat16 instructions (AMX-BF16 or AVX512-BF16,
e.g. Intel Sapphire Rapids and later, AMD Zen 4); elsewhere autocast would convert back and
forth for nothing, so it trains in float32.
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


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bfloat16 instruction sets this CPU lists (Linux ``/proc/cpuinfo``; none
    elsewhere, where float32 is the safe choice). ``MLCLT_CPU_BF16=0`` turns them off."""
    import os

    if os.environ.get("MLCLT_CPU_BF16", "1") == "0":
        return []
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return [f for f in BF16_CPU_FLAGS if f in flags]


def training_precision(device: str | torch.device, mixed: bool = True) -> Precision:
    """The precision of a training step on ``device``. ``mixed=False`` (the preset's
    ``training.mixed_precision``) keeps float32 everywhere."""
    device = torch.device(device)
    if not mixed:
        return Precision(None, False, "float32: mixed precision turned off")
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return Precision(torch.bfloat16, False,
                             f"bfloat16 autocast: this CPU has native bfloat16 ({', '.join(flags)})")
        return Precision(None, False, "float32 on cpu: no native bfloat16 instructions")
    if device.type != "cuda":
        return Precision(None, False, f"float32 on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return Precision(torch.bfloat16, False,
                         f"bfloat16 autocast: compute capability {major}.{minor} supports it natively")
    return Precision(torch.float16, True,
                     f"float16 autocast with a gradient scaler: compute capability {major}.{minor} "
                     f"(< 8.0) would only emulate bfloat16")

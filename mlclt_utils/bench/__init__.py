"""Speed benchmarks that print figures, measured against this machine's own matmul peak:

    python -m mlclt_utils.bench peak                 # matmul GFLOP/s of this machine
    python -m mlclt_utils.bench train [--steps 20]   # model training speed (bench.train)
    python -m mlclt_utils.bench clt ...              # CLT training speed (bench.clt)
    python -m mlclt_utils.bench attribution ...      # seconds and memory per attribution graph
    python -m mlclt_utils.bench sae ...              # SAE training tokens/s, book path vs SAELens per SAE
    python -m mlclt_utils.bench controls --preset small   # seconds the repeated control draws add (bench.controls)

This module holds what the benchmarks share (threads, the matmul peak, the printed table);
``__main__`` dispatches the commands.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

import torch


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure_matmul_peak(threads: int | None = None, dtype: torch.dtype = torch.float32,
                        sizes=(1024, 1536, 2048), repeats: int = 3, device: str = "cpu") -> float:
    """Best GFLOP/s of large square matmuls (2·n³ FLOPs each) after a warm-up."""
    dev = torch.device(device)
    best = 0.0
    with _threads(threads):
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=dev)
            b = torch.randn(n, n, dtype=dtype, device=dev)
            out = torch.empty(n, n, dtype=dtype, device=dev)
            torch.mm(a, b, out=out)  # warm-up
            _sync(dev)
            for _ in range(repeats):
                t = time.perf_counter()
                torch.mm(a, b, out=out)
                _sync(dev)
                best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = [title for _, title, _ in columns]
    body = [[format(r[key], fmt) for key, _, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])

"""What the benchmarks share: appending their lines to a results file, and the measured
matmul rate their compute limits are estimated from."""

from __future__ import annotations

import time
from typing import Optional, Sequence


def append_results(path: Optional[str], lines: Sequence[str]) -> None:
    """Append ``lines`` (one block, newline-terminated) to ``path``; nothing when
    ``path`` is empty or None (``--out ""``)."""
    if path:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


def matmul_flops_per_s(seconds: float = 2.0) -> float:
    """Measured float32 FLOP/s of a ``[4096, 576] @ [576, 1536]`` product (the MLP shape of
    SmolLM2 at a few thousand tokens), best of repeated timings over ``seconds``."""
    import torch

    a, b = torch.randn(4096, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 576 * 1536 / best

"""Where torch work runs and at what precision: one policy for the embedder and the generator.

>>> resolve_device("auto")          # "cuda" when a GPU is visible, else "cpu"
'cpu'
"""

from __future__ import annotations

import functools


def resolve_device(device: str) -> str:
    """``device`` itself, or for ``"auto"`` ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul instructions (Intel AMX, or AVX512-BF16 as on AMD Zen 4
    and Intel Cooper Lake), where oneDNN runs bf16 matmuls 2-3x faster than float32
    (docs/BENCHMARKS.md: embedding backends, generator precision)."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)

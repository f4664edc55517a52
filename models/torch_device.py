"""Where torch work runs and at what precision: one policy for the embedder and the generator.

>>> resolve_device("auto")          # "cuda" when a GPU is visible, else "cpu"
'cpu'
"""

from __future__ import annotations

import functools
import logging
import os
import sys


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


def auto_dtype(device: str) -> str:
    """The precision ``"auto"`` means for the embedder and the generator alike, on ``device``.

    bfloat16 wherever the hardware runs it natively: CUDA GPUs that support it (Ampere and
    later; float16 on older ones) and CPUs with native bf16 matmuls, where it is 2-3x faster
    than float32 at the same retrieval quality and answer likelihood (docs/BENCHMARKS.md).
    bfloat16 has float32's range, so no activation overflows as it can in float16; elsewhere
    float32 (CPU half precision is emulated and slow).
    """
    import torch

    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def resolve_dtype(dtype: str, device: str) -> str:
    """``dtype`` itself, or for ``"auto"`` :func:`auto_dtype` of ``device``."""
    return auto_dtype(device) if dtype == "auto" else dtype


def run_and_exit(app) -> None:
    """Run a command-line ``app`` (Typer or Click) and exit with its code.

    Once torch is loaded, tearing down the interpreter's ~3,900 modules takes
    about 2 s (docs/BENCHMARKS.md, "Ingest: zhiku vs LangChain reference"). By
    the time the app returns, its files are closed and committed, so the output
    streams are flushed and the process ends without that teardown.
    """
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code
    if "torch" not in sys.modules:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code or 0)

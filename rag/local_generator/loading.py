"""Loading the base model: its dtype, device placement, bitsandbytes quantisation (CUDA) and EOS tokens.

(The tokenizer is loaded by :func:`rag.chat_template.load_chat_tokenizer`, shared with ``finetune/``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.torch_device import resolve_dtype
from rag.generation import GenerationError


def generator_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype the generator runs in for the ``generator_dtype`` setting on ``device`` (one policy with the embedder)."""
    return getattr(torch, resolve_dtype(dtype, device))


def load_model(path: str | Path, device: str, dtype: str, quantization: str):
    """The causal LM in ``path``, in eval mode, on ``device`` (``"cuda"`` alone: spread by accelerate)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": generator_dtype(dtype, device), "local_files_only": True}
    if device.startswith("cuda"):
        # one GPU named: everything on it; plain "cuda": let accelerate spread a large model
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    if quantization != "none" and device.startswith("cuda"):
        # on the CPU, 8bit / 4bit are weight-only layers (cpu_quantised), applied once the adapters are in place
        kwargs["quantization_config"] = _bitsandbytes_config(quantization, kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not device.startswith("cuda"):
        model.to(device)
    return model.eval()


def _bitsandbytes_config(quantization: str, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise GenerationError(f"generator_quantization={quantization!r} needs bitsandbytes: pip install 'zhiku[cuda]'") from exc
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def eos_ids(model, tokenizer) -> frozenset[int]:
    """Every token that ends a reply: the generation config's (chat models often list several) and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    if not ids:
        raise GenerationError("the model defines no end-of-sequence token")
    return frozenset(ids)

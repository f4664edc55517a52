"""Merging a LoRA adapter into its base: full safetensors weights plus the tokenizer.

The merged folder is a plain transformers model (``rag serve --model DIR``).
Before saving, a probe batch is run through the adapter model and through the
merged model; their logits must agree (max |Δ| ≤ ``tolerance``), so a merge
that silently changed the model is never written.

Prefix tuning (P-Tuning v2) adds key/value prefixes at run time instead of
changing weights, so it cannot be merged: serve it as an adapter.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.model import FinetuneError, adapter_kind, is_quantised, load_base, load_tokenizer

PROBE = [
    [{"role": "user", "content": "What does this policy cover?"}],
    [{"role": "user", "content": "如何申请退款？"}, {"role": "assistant", "content": "在订单页面申请。"}, {"role": "user", "content": "多久到账？"}],
]


@dataclass
class MergeResult:
    out: str
    base: str
    adapter: str
    max_abs_logit_diff: float
    probe_tokens: int


def merge(base: Path, adapter: Path, out: Path, tolerance: float = 1e-3) -> MergeResult:
    from peft import PeftModel

    from rag.chat_template import encode_chat

    base, adapter, out = Path(base), Path(adapter), Path(out)
    kind = adapter_kind(adapter)
    if kind != "LORA":
        raise FinetuneError(
            f"{adapter} is a {kind} adapter; only LoRA adapters can be merged into the weights. "
            f"P-Tuning v2 (prefix tuning) adds key/value prefixes at run time: serve it as an adapter, "
            f"e.g. rag serve --model {base} --adapter NAME={adapter}"
        )
    if is_quantised(base):
        raise FinetuneError(f"{base} holds quantised weights; merge into the full-precision base (merged weights would be rounded)")
    if out.exists() and any(out.iterdir()):
        raise FinetuneError(f"--out {out} is not empty; choose a new folder")

    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(load_base(base, torch.float32), str(adapter), is_trainable=False).eval()
    ids = [encode_chat(tokenizer, m) for m in PROBE]
    batch, mask = _padded(ids, tokenizer.pad_token_id)
    with torch.inference_mode():
        expected = model(input_ids=batch, attention_mask=mask).logits
        merged = model.merge_and_unload()
        actual = merged(input_ids=batch, attention_mask=mask).logits
    keep = mask.bool()
    diff = float((expected[keep] - actual[keep]).abs().max())
    if diff > tolerance:
        raise FinetuneError(f"merged logits differ from the adapter's by {diff:.2e} (> {tolerance:g}); nothing written")

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return MergeResult(str(out), str(base), str(adapter), diff, int(keep.sum()))


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask

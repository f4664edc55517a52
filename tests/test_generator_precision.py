"""Precision policy: bfloat16 on CPUs with native bf16 matmuls, float32 elsewhere; bf16 serves adapters too."""

from __future__ import annotations

import asyncio

import torch

from rag.generation import Finished, SamplingParams

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_auto_precision_follows_the_cpu():
    from models.torch_device import cpu_has_fast_bf16, resolve_dtype
    from rag.local_generator import generator_dtype

    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert cpu_has_fast_bf16() == native
    assert generator_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert generator_dtype("float32", "cpu") == torch.float32 and resolve_dtype("float32", "cpu") == "float32"


def test_embedder_and_generator_share_one_policy_on_cuda_too(monkeypatch, embedder):
    from memory.embedding import Embedder
    from models.torch_device import resolve_dtype
    from rag.local_generator import generator_dtype

    for bf16 in (True, False):  # Ampere and later, then older GPUs
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        expected = "bfloat16" if bf16 else "float16"
        assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == expected
        assert generator_dtype("auto", "cuda") == getattr(torch, expected)
        assert Embedder(embedder.model_id, embedder.path, device="cuda").dtype == expected  # nothing is loaded


async def _answer(gen, messages, adapter=None) -> tuple[str, Finished]:
    parts, finished = [], None
    async for event in gen.stream(messages, GREEDY, adapter):
        if isinstance(event, Finished):
            finished = event
        else:
            parts.append(event.text)
    return "".join(parts), finished


def test_bfloat16_generator_serves_the_base_and_both_adapter_kinds_in_one_batch(generator_model_path, adapter_dirs):
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="bfloat16", adapters=adapter_dirs, max_batch_size=4, batch_wait_s=0.05)
    try:
        assert gen.models.base.dtype == torch.bfloat16
        base = asyncio.run(_answer(gen, CAPITAL))
        assert "Paris" in base[0] and base[1].completion_tokens > 0

        async def mixed():
            asks = [(CAPITAL, None), (CAPITAL, "lora"), (CAPITAL, "ptuning"), ([{"role": "user", "content": "Name a colour."}], None)]
            return await asyncio.gather(*(_answer(gen, messages, adapter) for messages, adapter in asks))

        answers = asyncio.run(asyncio.wait_for(mixed(), 120))
        assert all(text and finished.completion_tokens > 0 for text, finished in answers)
        assert answers[1][0] != base[0] and answers[2][0] != base[0]  # each adapter changes the answer
    finally:
        asyncio.run(gen.aclose())


def test_bfloat16_embeddings_rank_like_float32(models_dir, tmp_path):
    import numpy as np

    from memory.embedding import load_embedder
    from settings import Settings

    texts = ["退保需要提交保单原件和身份证明。", "如何申请退保？", "今天天气晴朗，适合户外运动。"]
    vectors = {}
    for precision in ("float32", "bfloat16"):
        embedder = load_embedder(Settings(home=tmp_path / precision, models_dir=models_dir, embedding_dtype=precision))
        vectors[precision] = np.asarray(embedder.embed_passages(texts))
    cosine = (vectors["float32"] * vectors["bfloat16"]).sum(axis=1)
    assert cosine.min() > 0.99
    query = vectors["bfloat16"][1]
    assert query @ vectors["bfloat16"][0] > query @ vectors["bfloat16"][2]  # the paraphrase still ranks first

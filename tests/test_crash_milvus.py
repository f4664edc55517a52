"""SIGKILL `ingest add --backend milvus` and `ingest rebuild` at random moments on embedded
Milvus (milvus-lite): after every kill the knowledge base opens, searches only whole documents
and passes its consistency check; the next run repairs what the killed one left, and the end
state equals a clean run's.

Milvus has no multi-row transactions; what makes this hold is the write order of
memory/milvus_backend.py (registry row ``writing`` → chunks → ``done`` → old version deleted)."""

from __future__ import annotations

import random
from contextlib import contextmanager

import pytest

from memory.files import file_sha256
from memory.ingestion import add_paths
from memory.knowledge_base import KnowledgeBases
from memory.milvus_backend import collection_prefix
from tests.test_crash import FILES, crash_env, finished, first_commit_time, killed_at_random, run_cli, write_corpus  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

KILLS = 10
SENTENCES = 60  # ~400 chunks of 200 characters, ~50 commits of 8


@pytest.fixture
def milvus_env(crash_env):
    settings, env = crash_env
    return settings.model_copy(update={"vector_store": "milvus"}), {**env, "ZHIKU_VECTOR_STORE": "milvus"}


def run_ingest(env, corpus):
    return run_cli(env, "add", str(corpus), "--kb", "crash", "--backend", "milvus", "--chunk-size", "200", "--chunk-overlap", "40")


@contextmanager
def opened(settings):
    """The catalogue, closed afterwards so the next process can open the embedded Milvus."""
    kbs = KnowledgeBases.from_settings(settings)
    try:
        yield kbs
    finally:
        kbs.close()


def check(settings, corpus) -> int:
    """Assert the knowledge base is consistent; return how many documents have the corpus's current content."""
    with opened(settings) as kbs:
        if not kbs.exists("crash"):
            return 0
        kb = kbs.open("crash")
        try:
            assert kb.check_consistency() == []
            documents = kb.documents()
            for document in documents:
                assert document.status == "ok" and document.chunk_count > 0, document
            texts = kb.all_chunks()
            assert sum(d.chunk_count for d in documents) == len(texts) == kb.chunk_count()
            first_lines = {c.text.split("\n", 1)[0] for c in texts if c.ordinal == 0}
            assert len(first_lines) == len(documents)  # one version of each document, never two
            current = {str(p.resolve()): file_sha256(p) for p in corpus.iterdir()}
            return sum(1 for d in documents if current.get(d.path) == d.sha256)
        finally:
            kb.close()


def stored_texts(settings, name="crash") -> list[str]:
    with opened(settings) as kbs:
        kb = kbs.open(name)
        try:
            return sorted(c.text for c in kb.all_chunks())
        finally:
            kb.close()


def test_sigkill_during_milvus_add_leaves_knowledge_base_consistent(milvus_env, tmp_path, embedder):
    settings, env = milvus_env
    corpus = tmp_path / "corpus"
    write_corpus(corpus, seed=0, sentences_each=SENTENCES)
    duration = finished(run_ingest(env, corpus))
    startup = first_commit_time(lambda folder: run_ingest(env, folder), corpus)  # Milvus Lite's start-up too

    rng = random.Random(4321)
    kills = between_commits = 0
    for round_ in range(1, 3 * KILLS):
        if kills == KILLS:
            break
        write_corpus(corpus, seed=round_, sentences_each=SENTENCES)  # every file changes
        if killed_at_random(run_ingest(env, corpus), duration, rng, not_before=startup):
            kills += 1
            between_commits += 0 < check(settings, corpus) < FILES
        else:
            check(settings, corpus)
    assert kills == KILLS
    assert between_commits >= 2, between_commits  # kills landed among the commits, not only before them

    finished(run_ingest(env, corpus))
    assert check(settings, corpus) == FILES
    with opened(settings) as kbs:
        add_paths(kbs, "clean", [corpus], embedder, chunk_size=200, chunk_overlap=40, backend="milvus")
    assert stored_texts(settings) == stored_texts(settings, "clean")


def test_sigkill_during_milvus_rebuild_keeps_the_old_store_or_the_new_one(milvus_env, tmp_path):
    settings, env = milvus_env
    corpus = tmp_path / "corpus"
    write_corpus(corpus, seed=0, files=12)
    finished(run_ingest(env, corpus))
    texts = stored_texts(settings)
    duration = finished(run_cli(env, "rebuild", "--kb", "crash"))

    rng = random.Random(98)
    kills = 0
    for _ in range(3 * KILLS):
        if kills == KILLS // 2:
            break
        kills += killed_at_random(run_cli(env, "rebuild", "--kb", "crash"), duration, rng)
        check(settings, corpus)
        assert stored_texts(settings) == texts
    assert kills == KILLS // 2

    finished(run_cli(env, "rebuild", "--kb", "crash"))
    assert stored_texts(settings) == texts
    with opened(settings) as kbs:
        prefix = collection_prefix(kbs.manifest("crash"))
        collections = sorted(c for c in kbs.milvus.call("list_collections") if c != "zhiku_catalogue")
        assert collections == [f"{prefix}_chunks", f"{prefix}_documents"]  # what killed rebuilds began is gone

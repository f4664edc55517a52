"""SIGKILL `ingest add`, `ingest rebuild` and `ingest drop` at random moments (20 kills
each); the knowledge base must stay loadable and consistent after every one.

Small batches (``ZHIKU_INGEST_BATCH_CHUNKS=8``) and an index save after every commit
(``ZHIKU_INDEX_SAVE_INTERVAL=0``) spread commits and FAISS saves over the whole run, so
kills land in them, not only before the first one (the test checks that they do)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memory.files import file_sha256
from memory.ingestion import add_paths
from memory.knowledge_base import KnowledgeBases
from memory.lexical_index import LexicalIndex, tokenize
from settings import Settings

pytestmark = pytest.mark.slow

WORDS = "知识库 检索 向量 模型 微调 显卡 文档 问答 训练 推理 切分 嵌入 索引 数据 服务 接口 用户 系统 中文 段落".split()


KILLS = 20
FILES = 40
LONG = 150  # sentences per file: ~1,000 chunks of 200 characters in all, ~120 commits of 8


def write_corpus(folder: Path, seed: int, files: int = FILES, sentences_each: int = 30) -> None:
    rng = random.Random(seed)
    folder.mkdir(exist_ok=True)
    for n in range(files):
        sentences = ["".join(rng.choices(WORDS, k=rng.randint(4, 9))) + "。" for _ in range(sentences_each)]
        (folder / f"doc{n:02d}.txt").write_text(f"文档{n}版本{seed}\n\n" + "".join(sentences), encoding="utf-8")


def run_cli(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.ingest", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_ingest(env: dict, corpus: Path) -> subprocess.Popen:
    return run_cli(env, "add", str(corpus), "--kb", "crash", "--chunk-size", "200", "--chunk-overlap", "40")


def finished(process: subprocess.Popen) -> float:
    """Wait for a run that must succeed; its duration is what later kills are timed against."""
    started = time.monotonic()
    assert process.wait(300) == 0, process.stderr.read().decode()
    return time.monotonic() - started


def killed_at_random(process: subprocess.Popen, duration: float, rng: random.Random, not_before: float = 0.0) -> bool:
    """SIGKILL ``process`` at a random moment of a run that takes ``duration``; False if it finished first.

    ``not_before``: the seconds until the first commit (see ``first_commit_time``), so kills aim at the writes."""
    time.sleep(rng.uniform(max(0.05 * duration, not_before), duration))
    was_running = process.poll() is None
    if was_running:
        process.send_signal(signal.SIGKILL)
    process.wait(60)
    return was_running


def first_commit_time(process_for, corpus: Path) -> float:
    """Seconds a run takes when one document changed: start-up, loading the embedder and one commit."""
    first = sorted(corpus.iterdir())[0]
    first.write_text(first.read_text(encoding="utf-8") + "又一句。", encoding="utf-8")
    return finished(process_for(corpus))


@pytest.fixture
def crash_env(tmp_path, models_dir) -> tuple[Settings, dict]:
    settings = Settings(home=tmp_path / "home", models_dir=models_dir)
    env = {
        **os.environ,
        "ZHIKU_HOME": str(settings.home),
        "ZHIKU_MODELS_DIR": str(models_dir),
        "ZHIKU_INGEST_BATCH_CHUNKS": "8",
        "ZHIKU_INDEX_SAVE_INTERVAL": "0",
    }
    return settings, env


def assert_consistent(settings: Settings, corpus: Path | None = None) -> None:
    kbs = KnowledgeBases.from_settings(settings)
    if not kbs.exists("crash"):
        return  # killed before the knowledge base was created: nothing to check
    kb = kbs.open("crash")
    try:
        assert kb.check_consistency() == []  # covers the lexical (BM25) index too
        for document in kb.store.documents():
            assert document.status == "ok" and document.chunk_count > 0, document
        assert_lexical_matches_store(kb)
    finally:
        kb.close()


def assert_lexical_matches_store(kb) -> None:
    """The BM25 index in use, and any saved copy claiming the current generation, cover exactly the stored chunks."""
    stored = kb.store.chunk_ids().tolist()
    assert sorted(kb.lexical_index().ids().tolist()) == stored
    saved = kb.store_dir / f"lexical.{kb.store.generation()}"
    if saved.is_dir():
        assert sorted(LexicalIndex.load(saved).ids().tolist()) == stored
    for chunk_id, text in kb.store.iter_chunk_texts():  # a chunk's stored tokens are its text's tokens
        (tokens,) = kb.store.conn.execute("SELECT tokens FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
        assert tokens == " ".join(tokenize(text))


def documents_of_version(settings: Settings, corpus: Path) -> int:
    """How many stored documents already have the corpus's current content."""
    current = {str(p.resolve()): file_sha256(p) for p in corpus.iterdir()}
    kbs = KnowledgeBases.from_settings(settings)
    return sum(1 for d in kbs.documents("crash") if current.get(d.path) == d.sha256) if kbs.exists("crash") else 0


def test_sigkill_during_add_leaves_knowledge_base_consistent(crash_env, tmp_path, embedder):
    settings, env = crash_env
    corpus = tmp_path / "corpus"
    write_corpus(corpus, seed=0, sentences_each=LONG)  # embedding, not start-up, is most of a run
    duration = finished(run_ingest(env, corpus))
    startup = first_commit_time(lambda folder: run_ingest(env, folder), corpus)

    rng = random.Random(1234)
    kills = between_commits = 0
    for round_ in range(1, 3 * KILLS):  # a run that finishes before its kill just costs a round
        if kills == KILLS:
            break
        write_corpus(corpus, seed=round_, sentences_each=LONG)  # every file changes: the run replaces every document
        if killed_at_random(run_ingest(env, corpus), duration, rng, not_before=startup):
            kills += 1
            between_commits += 0 < documents_of_version(settings, corpus) < FILES
        assert_consistent(settings, corpus)
    assert kills == KILLS
    assert between_commits >= 4, between_commits  # kills landed among the commits, not only before them

    finished(run_ingest(env, corpus))
    assert_consistent(settings, corpus)
    kb = KnowledgeBases.from_settings(settings).open("crash")
    leftovers = sorted(p.name for p in kb.store_dir.iterdir() if "lexical" in p.name)
    kb.close()
    assert len(leftovers) == 1 and leftovers[0].startswith("lexical."), leftovers  # old and half-written copies cleaned

    kbs = KnowledgeBases.from_settings(settings)
    add_paths(kbs, "clean", [corpus], embedder, chunk_size=200, chunk_overlap=40)
    crashed, clean = kbs.open("crash"), kbs.open("clean")
    try:
        current = {str(p.resolve()): file_sha256(p) for p in corpus.iterdir()}
        assert {d.path: d.sha256 for d in crashed.store.documents()} == current
        assert sorted(t for _, t in crashed.store.iter_chunk_texts()) == sorted(t for _, t in clean.store.iter_chunk_texts())
    finally:
        crashed.close()
        clean.close()


def stored_texts(settings: Settings) -> list[str]:
    kb = KnowledgeBases.from_settings(settings).open("crash")
    try:
        return sorted(t for _, t in kb.store.iter_chunk_texts())
    finally:
        kb.close()


def test_sigkill_during_rebuild_keeps_the_old_store_or_the_new_one(crash_env, tmp_path):
    settings, env = crash_env
    corpus = tmp_path / "corpus"
    write_corpus(corpus, seed=0)
    finished(run_ingest(env, corpus))
    texts = stored_texts(settings)
    duration = finished(run_cli(env, "rebuild", "--kb", "crash"))

    rng = random.Random(99)
    kills = mid_copy = 0
    for _ in range(3 * KILLS):
        if kills == KILLS:
            break
        if killed_at_random(run_cli(env, "rebuild", "--kb", "crash"), duration, rng):
            kills += 1
            kb_dir = settings.kb_root / "crash"
            mid_copy += len([p for p in kb_dir.iterdir() if p.name.startswith("store-")]) > 1
        assert_consistent(settings)
        assert stored_texts(settings) == texts
    assert kills == KILLS
    assert mid_copy >= 4, mid_copy  # kills landed while the new store was being written

    finished(run_cli(env, "rebuild", "--kb", "crash"))
    assert_consistent(settings)
    assert stored_texts(settings) == texts
    assert len([p for p in (settings.kb_root / "crash").iterdir() if p.name.startswith("store-")]) == 1


def test_sigkill_during_drop_leaves_it_whole_or_gone(crash_env, tmp_path, embedder):
    settings, env = crash_env
    corpus = tmp_path / "corpus"
    write_corpus(corpus, seed=0, files=8)
    finished(run_ingest(env, corpus))
    pristine = tmp_path / "pristine"
    shutil.copytree(settings.kb_root / "crash", pristine)
    texts = stored_texts(settings)
    duration = finished(run_cli(env, "drop", "--kb", "crash", "--yes"))

    rng = random.Random(7)
    kills = 0
    for _ in range(3 * KILLS):
        if kills == KILLS:
            break
        shutil.rmtree(settings.kb_root / "crash", ignore_errors=True)
        shutil.copytree(pristine, settings.kb_root / "crash")
        kills += killed_at_random(run_cli(env, "drop", "--kb", "crash", "--yes"), duration, rng)
        kbs = KnowledgeBases.from_settings(settings)
        if kbs.exists("crash"):
            assert_consistent(settings)
            assert stored_texts(settings) == texts
        else:
            assert "crash" not in kbs.names()
    assert kills == KILLS


def test_a_knowledge_base_created_over_a_killed_drop_starts_empty(settings, tmp_path, embedder):
    kbs = KnowledgeBases.from_settings(settings)
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("旧的知识库里的文件。", encoding="utf-8")
    new.write_text("新的知识库里的文件。", encoding="utf-8")
    add_paths(kbs, "crash", [old], embedder, chunk_size=200, chunk_overlap=40)
    (settings.kb_root / "crash" / "manifest.json").unlink()  # a drop killed right after its first step
    assert not kbs.exists("crash")
    add_paths(kbs, "crash", [new], embedder, chunk_size=200, chunk_overlap=40)
    assert [d.path for d in kbs.documents("crash")] == [str(new.resolve())]

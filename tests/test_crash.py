"""SIGKILL an `ingest add` at random moments; the knowledge base must stay loadable and consistent."""

from __future__ import annotations

import os
import random
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


def write_corpus(folder: Path, seed: int, files: int = 20) -> None:
    rng = random.Random(seed)
    folder.mkdir(exist_ok=True)
    for n in range(files):
        sentences = ["".join(rng.choices(WORDS, k=rng.randint(4, 9))) + "。" for _ in range(30)]
        (folder / f"doc{n:02d}.txt").write_text(f"文档{n}版本{seed}\n\n" + "".join(sentences), encoding="utf-8")


def run_ingest(env: dict, corpus: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "memory.cli", "add", str(corpus), "--kb", "crash", "--chunk-size", "200", "--chunk-overlap", "40"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def assert_consistent(settings: Settings, corpus: Path) -> None:
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


def test_sigkill_at_random_moments_leaves_knowledge_base_consistent(tmp_path, models_dir, embedder):
    settings = Settings(home=tmp_path / "home", models_dir=models_dir)
    env = {**os.environ, "ZHIKU_HOME": str(settings.home), "ZHIKU_MODELS_DIR": str(models_dir)}
    corpus = tmp_path / "corpus"
    write_corpus(corpus, seed=0)

    started = time.monotonic()
    first = run_ingest(env, corpus)
    assert first.wait(300) == 0, first.stderr.read().decode()
    duration = time.monotonic() - started

    rng = random.Random(1234)
    kills = 0
    for round_ in range(1, 31):  # a run that finishes before its kill just costs a round
        if kills == 10:
            break
        write_corpus(corpus, seed=round_)  # every file changes: the run replaces every document
        process = run_ingest(env, corpus)
        time.sleep(rng.uniform(0.15, 0.9) * duration)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(60)
        assert_consistent(settings, corpus)
    assert kills == 10

    final = run_ingest(env, corpus)
    assert final.wait(300) == 0, final.stderr.read().decode()
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

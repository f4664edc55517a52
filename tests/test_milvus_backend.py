"""What only the Milvus backend has to get right (the behaviour both backends share is tested on
both in test_knowledge_base.py, test_retrieval.py and test_crash_milvus.py)."""

from __future__ import annotations

import pytest

from memory.backend import KnowledgeBaseUnavailable
from memory.milvus_backend import MilvusConnection


@pytest.fixture
def connection(tmp_path):
    milvus = MilvusConnection(str(tmp_path / "milvus.db"))
    yield milvus
    milvus.close()


def test_query_all_reads_past_the_query_window(connection):
    from pymilvus import DataType

    schema = connection.call("create_schema", auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    index = connection.call("prepare_index_params")
    index.add_index("v", index_type="FLAT", metric_type="IP")
    connection.call("create_collection", "rows", schema=schema, index_params=index)
    ids = [(n * 7919) % 1_000_003 for n in range(20_000)]  # more rows than one query returns, ids not in order
    for start in range(0, len(ids), 5000):
        connection.call("insert", "rows", [{"id": i, "v": [1.0, 0.0]} for i in ids[start : start + 5000]])
    assert sorted(r["id"] for r in connection.query_all("rows", "id >= 0", ["id"])) == sorted(ids)


def test_a_second_process_is_refused_while_one_holds_the_embedded_milvus(connection, tmp_path):
    import subprocess
    import sys

    connection.call("list_collections")  # this process now serves the embedded Milvus
    code = (
        "from memory.milvus_backend import MilvusConnection\n"
        f"MilvusConnection({str(tmp_path / 'milvus.db')!r}).call('list_collections')\n"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "in use by another process" in other.stderr and "milvus-lite server" in other.stderr
    connection.close()  # the last connection here: the server stops and the file is free
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).returncode == 0


def test_milvus_errors_name_the_server_and_the_call(tmp_path):
    from tests.live_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KnowledgeBaseUnavailable, match=f"cannot reach Milvus at {uri}"):
        MilvusConnection(uri, timeout=2).call("list_collections")


def _synthetic_documents(count: int, per_document: int, dim: int, rng):
    import hashlib

    import numpy as np

    from ingest.pipeline import IndexableChunk
    from memory.backend import DocumentUpdate

    updates = []
    for doc in range(count):
        texts = [f"文档{doc}的第{n}段。" for n in range(per_document)]
        chunks = tuple(
            IndexableChunk(n, t, hashlib.sha256(t.encode()).hexdigest(), (), n * 10, n * 10 + len(t))
            for n, t in enumerate(texts)
        )
        vectors = rng.standard_normal((per_document, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        updates.append(DocumentUpdate(f"/docs/doc{doc}.txt", "0" * 64, 1, "ok", None, chunks, vectors))
    return updates


def test_the_vector_index_switches_to_hnsw_above_exact_max_and_back_below_half(connection, tmp_path):
    import numpy as np

    from memory.backend import Manifest
    from memory.knowledge_base import KnowledgeBases

    kbs = KnowledgeBases(tmp_path / "kb", milvus_exact_max=40, default_backend="milvus", milvus=connection)
    manifest = Manifest("grow", "synthetic", 8, 400, 80, "store-1", backend="milvus")
    updates = _synthetic_documents(6, 10, 8, np.random.default_rng(0))
    with kbs.writer("grow", create=manifest) as kb:
        kb.put_documents(updates)
    kb = kbs.open("grow")
    assert kb.chunk_count() == 60
    assert kb._vector_index()["index_type"] == "HNSW"
    probe = updates[3].vectors[4]
    assert kb.search(probe, 1)[0].score == pytest.approx(1.0, abs=1e-4)
    with kbs.writer("grow") as kb:
        kb.delete_documents([u.path for u in updates[:5]])
    kb = kbs.open("grow")
    assert kb.chunk_count() == 10
    assert kb._vector_index()["index_type"] == "FLAT"
    assert kb.search(updates[5].vectors[2], 1)[0].score == pytest.approx(1.0, abs=1e-4)


def test_chunk_vectors_reads_more_ids_than_one_batch_in_the_order_asked(connection, tmp_path):
    import numpy as np

    from memory.backend import Manifest
    from memory.knowledge_base import KnowledgeBases

    kbs = KnowledgeBases(tmp_path / "kb", default_backend="milvus", milvus=connection)
    updates = _synthetic_documents(25, 100, 8, np.random.default_rng(1))  # 2,500 chunks: more than one read batch
    with kbs.writer("many", create=Manifest("many", "synthetic", 8, 400, 80, "store-1", backend="milvus")) as kb:
        kb.put_documents(updates)
    kb = kbs.open("many")
    stored = {(c.document_id, c.ordinal): c.id for c in kb.all_chunks()}
    documents = {d.path: d.id for d in kb.documents()}
    expected = {stored[(documents[u.path], n)]: u.vectors[n] for u in updates for n in range(len(u.vectors))}
    ids = list(expected)
    np.random.default_rng(2).shuffle(ids)
    assert np.allclose(kb.chunk_vectors(ids), np.stack([expected[i] for i in ids]), atol=1e-6)

"""memory.vector_index against real FAISS (no mocks except an injected write failure)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from memory.vector_index import VectorIndex, VectorIndexError, reconcile

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int = 0, centres: int = 40) -> np.ndarray:
    """Normalised points around a few random centres, like embeddings of a few topics."""
    rng = np.random.default_rng(seed)
    c = unit(np.random.default_rng(99).standard_normal((centres, DIM)))
    return unit(c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, DIM)) / np.sqrt(DIM) * 4)


def filled(n: int = 500, seed: int = 0, start: int = 1000) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    ids = np.arange(start, start + n, dtype=np.int64)
    vectors = clustered(n, seed)
    index = VectorIndex.create(DIM)
    index.add(ids, vectors)
    return index, ids, vectors


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    return ids[order]


def ivf_index(n: int = 4000) -> tuple[VectorIndex, VectorIndex, np.ndarray, np.ndarray]:
    """(flat, ivf) over the same clustered vectors; the IVF one from ``rebuilt_for_size``."""
    flat, ids, vectors = filled(n)
    ivf = flat.rebuilt_for_size(lambda: (ids, vectors), exact_max=1000, nprobe=16)
    return flat, ivf, ids, vectors


# ------------------------------------------------------------ add / search / remove


def test_search_returns_nearest_ids_with_cosine_scores():
    index, ids, vectors = filled()
    queries = unit(vectors[:20] + 0.05 * np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32))
    scores, found = index.search(queries, k=5)
    assert found.shape == scores.shape == (20, 5) and found.dtype == np.int64
    np.testing.assert_array_equal(found, exact_top(vectors, ids, queries, 5))
    dots = np.einsum("qd,qkd->qk", queries, vectors[found - ids[0]])
    np.testing.assert_allclose(scores, dots, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_self_query_scores_one_and_padding_is_marked():
    index = VectorIndex.create(DIM)
    index.add(np.array([3, 8]), clustered(2))
    scores, found = index.search(clustered(2)[0], k=4)  # a 1-D query is one row
    assert found.tolist()[0][:1] == [3] and found.tolist()[0][2:] == [-1, -1]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.isneginf(scores[0, 2:]))


def test_empty_index_searches_to_padding():
    scores, found = VectorIndex.create(DIM).search(clustered(3), k=2)
    assert (found == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize(
    "ids, vectors",
    [
        (np.array([1, 1]), clustered(2)),  # repeated in batch
        (np.array([1000]), clustered(1)),  # already present
        (np.array([1, 2]), clustered(1)),  # count mismatch
        (np.array([-4]), clustered(1)),  # negative id
        (np.array([1]), np.ones((1, DIM), np.float32)),  # not normalised
        (np.array([1]), unit(np.ones((1, DIM + 1)))),  # wrong dimension
    ],
)
def test_add_rejects_bad_input(ids, vectors):
    index, _, _ = filled(10)
    with pytest.raises(ValueError):
        index.add(ids, vectors)
    assert len(index) == 10


def test_remove_drops_ids_and_ignores_absent_ones():
    index, ids, vectors = filled()
    gone = ids[::3]
    assert index.remove(np.concatenate([gone, [7, 99_999]])) == len(gone)
    assert len(index) == len(ids) - len(gone)
    _, found = index.search(vectors[::3], k=10)
    assert not np.isin(found, gone).any()
    assert index.remove(gone) == 0
    index.add(gone[:2], vectors[:2])  # removed ids may be added again
    assert len(index) == len(ids) - len(gone) + 2


def test_ids_round_trip():
    index, ids, _ = filled(300)
    np.testing.assert_array_equal(index.ids(), ids)
    index.remove(ids[10:20])
    expected = np.concatenate([ids[:10], ids[20:]])
    np.testing.assert_array_equal(index.ids(), expected)
    assert index.ids().dtype == np.int64
    reread = VectorIndex(index._index)  # ids recomputed from FAISS, not the cache
    np.testing.assert_array_equal(reread.ids(), expected)


# ------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path: Path, kind: str):
    index = filled()[0] if kind == "flat" else ivf_index()[1]
    path = tmp_path / "vectors.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert (loaded.kind, loaded.dimension, len(loaded), loaded.nprobe) == (
        index.kind, index.dimension, len(index), index.nprobe
    )
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    queries = clustered(30, seed=5)
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10)):
        np.testing.assert_array_equal(got, want)


def test_save_replaces_atomically_without_temp_files(tmp_path: Path):
    path = tmp_path / "kb" / "vectors.faiss"
    path.parent.mkdir()
    index, ids, vectors = filled()
    index.save(path)
    index.remove(ids[:100])
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["vectors.faiss"]
    assert len(VectorIndex.load(path)) == len(ids) - 100


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "vectors.faiss"
    old, _, _ = filled(50)
    old.save(path)
    before = path.read_bytes()
    real_writer = faiss.PyCallbackIOWriter

    def failing_writer(write):
        written = []

        def write_some_then_fail(chunk: bytes) -> None:
            if written:
                raise OSError(28, "No space left on device")
            written.append(len(chunk))
            write(chunk[: len(chunk) // 2])  # a partial write reaches the disk first

        return real_writer(write_some_then_fail, 64)  # small chunks: fail mid-file

    monkeypatch.setattr(faiss, "PyCallbackIOWriter", failing_writer)
    with pytest.raises(VectorIndexError, match="could not save"):
        filled(400)[0].save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]
    assert len(VectorIndex.load(path)) == 50


def test_load_missing_file_raises(tmp_path: Path):
    with pytest.raises(VectorIndexError, match="no vector index"):
        VectorIndex.load(tmp_path / "absent.faiss")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_load_truncated_or_garbage_raises(tmp_path: Path, kind: str):
    index = filled(200)[0] if kind == "flat" else ivf_index(2000)[1]
    good = tmp_path / "good.faiss"
    index.save(good)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    bad_contents = [data[:cut] for cut in (0, 3, 20, len(data) // 2, len(data) - 1)]
    bad_contents += [rng.bytes(len(data)), b"IxM2" + rng.bytes(200), data + b"\0"]
    for i, content in enumerate(bad_contents):
        bad = tmp_path / f"bad{i}.faiss"
        bad.write_bytes(content)
        with pytest.raises(VectorIndexError):
            VectorIndex.load(bad)


def test_load_rejects_unsupported_index(tmp_path: Path):
    path = tmp_path / "l2.faiss"
    faiss.write_index(faiss.IndexFlatL2(DIM), str(path))
    with pytest.raises(VectorIndexError, match="inner product"):
        VectorIndex.load(path)


# ------------------------------------------------------------ reconcile


def test_reconcile_fixes_both_directions():
    index, ids, vectors = filled(200)  # ids 1000..1199
    store_ids = np.arange(1100, 1300, dtype=np.int64)  # 1000..1099 deleted, 1200..1299 new
    store_vectors = clustered(300, seed=7)[100:]  # rows for 1100..1299 (first 100 unused)
    store_vectors[:100] = vectors[100:]  # unchanged chunks keep their vectors
    asked: list[np.ndarray] = []

    def fetch(wanted: np.ndarray) -> np.ndarray:
        asked.append(wanted)
        return store_vectors[wanted - 1100]

    assert reconcile(index, store_ids[::-1], fetch) == (100, 100)
    np.testing.assert_array_equal(index.ids(), store_ids)
    np.testing.assert_array_equal(np.concatenate(asked), np.arange(1200, 1300))
    scores, found = index.search(store_vectors[150], k=1)
    assert found[0, 0] == 1250 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert reconcile(index, store_ids, fetch) == (0, 0)


def test_reconcile_on_ivf_and_empty_store():
    _, ivf, ids, vectors = ivf_index(2000)
    assert reconcile(ivf, ids[:1500], lambda wanted: pytest.fail("nothing to fetch")) == (0, 500)
    np.testing.assert_array_equal(ivf.ids(), ids[:1500])
    assert reconcile(ivf, np.array([], dtype=np.int64), lambda wanted: vectors[:0]) == (0, 1500)
    assert len(ivf) == 0


# ------------------------------------------------------------ rebuilt_for_size


def test_small_flat_index_is_kept():
    index, _, _ = filled(100)
    assert index.rebuilt_for_size(lambda: pytest.fail("must not fetch"), exact_max=1000, nprobe=8) is index


def test_rebuilt_for_size_switches_to_ivf_with_good_recall():
    flat, ivf, ids, vectors = ivf_index()
    assert flat.kind == "flat" and ivf.kind.startswith("ivf") and ivf.kind.endswith(",flat")
    assert ivf.nprobe == 16 and len(ivf) == len(ids)
    np.testing.assert_array_equal(ivf.ids(), ids)
    queries = unit(clustered(200, seed=3) + 0.02 * np.random.default_rng(4).standard_normal((200, DIM)))
    truth = flat.search(queries, 10)[1]
    scores, found = ivf.search(queries, 10)
    recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9
    hit = found >= 0
    np.testing.assert_allclose(scores[hit], np.einsum("qd,qd->q", np.repeat(queries, 10, 0)[hit.ravel()],
                                                      vectors[found[hit] - ids[0]]), atol=1e-5)
    # once IVF, it stays while it suits; nprobe follows the setting
    assert ivf.rebuilt_for_size(lambda: pytest.fail("must not fetch"), exact_max=1000, nprobe=4) is ivf
    assert ivf.nprobe == 4


def test_ivf_supports_remove_and_incremental_add():
    _, ivf, ids, vectors = ivf_index()
    gone = ids[::2]
    assert ivf.remove(gone) == len(gone)
    _, found = ivf.search(vectors[:50], 10)
    assert not np.isin(found, gone).any()
    assert found[1, 0] == ids[1]  # a kept vector still finds itself
    new_ids = np.arange(10_000, 10_020)
    ivf.add(new_ids, vectors[:20])
    assert ivf.search(vectors[4], 1)[1][0, 0] in (ids[4], 10_004)
    with pytest.raises(ValueError):
        ivf.add(new_ids[:1], vectors[:1])
    assert len(ivf) == len(ids) - len(gone) + 20


def test_rebuilt_for_size_goes_back_to_flat_when_much_smaller():
    _, ivf, ids, vectors = ivf_index()
    ivf.remove(ids[300:])
    small = ivf.rebuilt_for_size(lambda: (ids[:300], vectors[:300]), exact_max=1000, nprobe=16)
    assert small.kind == "flat" and len(small) == 300 and small.nprobe is None

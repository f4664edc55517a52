"""BM25 over a knowledge base's chunks: the lexical half of hybrid retrieval.

Dense embeddings miss exact identifiers (``cli_demo.py``, ``P0``, ``HTTP/2``)
and rare technical terms; BM25 finds them. Tokens are computed once, when a
chunk is stored (they live in the chunk store, see ``memory.chunk_store``), so
the BM25 index is a derived artifact like the FAISS file: rebuilt from stored
tokens, never by re-running the tokeniser.

Tokenisation (:func:`tokenize`):

* text is NFKC-normalised and lowercased;
* runs of Chinese characters are cut by jieba (search mode: long words are
  also emitted as their shorter words, which measured better, see
  docs/BENCHMARKS.md "Hybrid retrieval");
* ASCII identifiers such as ``foo_bar``, ``v1.2``, ``http/2``, ``nvidia-smi``
  are kept whole *and* split into their alphanumeric parts, so a query can
  match either form;
* other scripts are split into words; punctuation and whitespace are dropped.

>>> tokenize("运行 cli_demo.py 时显存不足")
['运行', 'cli_demo.py', 'cli', 'demo', 'py', '时', '显存', '不足']
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import unicodedata
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from memory.files import fsync_dir

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(
    rf"(?P<ascii>[a-z0-9](?:[a-z0-9_.\-/+#]*[a-z0-9+#])?)"  # identifiers, versions, words
    rf"|(?P<han>[{_HAN}]+)"
    rf"|(?P<word>[^\W_]+)"  # letters/digits of any other script
)
_ASCII_PART = re.compile(r"[a-z0-9]+")
_IDS_FILE = "chunk_ids.npy"
_META_FILE = "lexical.json"
FORMAT = 1

_jieba = None


def _jieba_module():
    """jieba, imported on first use (it costs ~1 s to load its dictionary)."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba


def tokenize(text: str, *, search_mode: bool = True) -> list[str]:
    """BM25 tokens of ``text`` (see the module docstring).

    >>> tokenize("Hello, World! HTTP/2 v1.2")
    ['hello', 'world', 'http/2', 'http', '2', 'v1.2', 'v1', '2']
    """
    text = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    for match in _TOKEN.finditer(text):
        if match.lastgroup == "han":
            tokens += _cut_chinese(match.group(), search_mode)
        elif match.lastgroup == "ascii":
            tokens += _identifier_tokens(match.group())
        else:
            tokens.append(match.group())
    return tokens


def _cut_chinese(run: str, search_mode: bool) -> list[str]:
    jieba = _jieba_module()
    words = jieba.lcut_for_search(run) if search_mode else jieba.lcut(run)
    return [w for w in words if w.strip()]


def _identifier_tokens(identifier: str) -> list[str]:
    """The identifier itself, then its alphanumeric parts when it has several."""
    parts = _ASCII_PART.findall(identifier)
    if len(parts) <= 1 and parts == [identifier]:
        return [identifier]
    return [identifier] + parts


def join_tokens(tokens: list[str]) -> str:
    """Stored form of a chunk's tokens (tokens never contain whitespace)."""
    return " ".join(tokens)


def token_text(text: str) -> str:
    """The stored form of ``text``'s tokens: ``join_tokens(tokenize(text))``."""
    return join_tokens(tokenize(text))


class LexicalIndexError(Exception):
    """A saved lexical index is missing, unreadable or corrupt."""


class LexicalIndex:
    """BM25 (bm25s, Lucene variant) over chunks keyed by chunk id."""

    def __init__(self, ids: np.ndarray, bm25):
        self._ids = np.asarray(ids, dtype=np.int64)
        self._bm25 = bm25  # None when there are no chunks

    @classmethod
    def build(cls, ids: np.ndarray, token_lists: list[list[str]]) -> "LexicalIndex":
        return cls.build_streaming(zip(np.asarray(ids, dtype=np.int64).tolist(), token_lists))

    @classmethod
    def build_streaming(cls, rows: Iterable[tuple[int, list[str]]]) -> "LexicalIndex":
        """Index (chunk id, tokens) rows read one at a time.

        Each document is kept as an int32 array of vocabulary ids, not as a list
        of strings: over 27k chunks the string lists alone took ~500 MB.
        bm25s scores exactly as it does from token lists (its own vocabulary
        order is a set's, so ids differ, never scores).
        """
        chunk_ids = array("q")
        vocabulary: dict[str, int] = {}
        documents: list[np.ndarray] = []
        for chunk_id, tokens in rows:
            chunk_ids.append(chunk_id)
            documents.append(
                np.fromiter((vocabulary.setdefault(t, len(vocabulary)) for t in tokens), dtype=np.int32, count=len(tokens))
            )
        if not chunk_ids:
            return cls(np.zeros(0, np.int64), None)
        import bm25s

        bm25 = bm25s.BM25()
        bm25.index((documents, vocabulary), show_progress=False)
        return cls(np.frombuffer(chunk_ids, dtype=np.int64), bm25)

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def search(self, query_tokens: list[str], k: int) -> list[tuple[int, float]]:
        """The ``k`` best (chunk id, BM25 score) pairs, best first; chunks sharing no token are left out."""
        if self._bm25 is None or not query_tokens or k <= 0:
            return []
        known = self._bm25.get_tokens_ids(query_tokens)
        if not known:
            return []
        scores = self._bm25.get_scores_from_ids(known)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self._ids[i]), float(scores[i])) for i in top if scores[i] > 0]

    # ---- persistence ---------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write into ``directory`` atomically: a temporary sibling folder, fsync, rename, fsync the parent."""
        directory = Path(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            if self._bm25 is not None:
                self._bm25.save(tmp)
            np.save(tmp / _IDS_FILE, self._ids)
            (tmp / _META_FILE).write_text(json.dumps({"format": FORMAT, "chunks": len(self._ids)}))
            for path in tmp.iterdir():
                _fsync_file(path)
            fsync_dir(tmp)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(directory.parent)

    @classmethod
    def load(cls, directory: Path) -> "LexicalIndex":
        directory = Path(directory)
        try:
            meta = json.loads((directory / _META_FILE).read_text())
            ids = np.load(directory / _IDS_FILE)
            if meta.get("format") != FORMAT or meta.get("chunks") != len(ids):
                raise LexicalIndexError(f"unsupported or corrupt lexical index {directory}")
            if len(ids) == 0:
                return cls(ids, None)
            import bm25s

            bm25 = bm25s.BM25.load(directory)
        except (OSError, ValueError, KeyError) as exc:
            raise LexicalIndexError(f"unreadable lexical index {directory}: {exc}") from exc
        if bm25.scores["num_docs"] != len(ids):
            raise LexicalIndexError(f"corrupt lexical index {directory}: document count mismatch")
        return cls(ids, bm25)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

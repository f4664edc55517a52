"""Cut a cleaned document into overlapping chunks with exact offsets.

The rule, in two steps:

1. **Pieces.** LangChain's ``RecursiveCharacterTextSplitter`` cuts the text into
   non-overlapping pieces of at most ``chunk_size - chunk_overlap`` characters,
   preferring paragraph breaks, then line breaks, then Chinese sentence ends
   (。！？；), then Chinese commas, then English sentence/clause ends, then spaces,
   and finally any character. Punctuation stays with the sentence it ends
   (``keep_separator="end"``). Pieces are located in the text exactly (they are
   substrings separated only by whitespace), so offsets are exact.

2. **Overlap.** LangChain only overlaps chunks it builds by merging small splits;
   a long paragraph cut at a "\\n\\n" gets none. So zhiku adds it itself: every chunk
   after the first starts inside the previous chunk, so that the two share between
   ``ceil(chunk_overlap / 2)`` and ``chunk_overlap`` characters. Inside that window the
   start is snapped to the best boundary - just after a line break, else after a
   sentence end, else after a comma, else after a space, else any character (ties:
   the most overlap). A chunk never starts at whitespace and never exceeds
   ``chunk_size`` characters.

Consequences: ``chunk.text == doc.text[chunk.start:chunk.end]``; ``len(chunk.text) <=
chunk_size``; together the chunks cover every non-whitespace character of the text;
consecutive chunks share at most ``chunk_overlap`` and at least
``min(ceil(chunk_overlap / 2), len(previous) - 1)`` characters - except where a long run
of whitespace (deep indentation) separates two pieces, when the size limit wins and
the overlap shrinks by that much.
"""

from __future__ import annotations

import math

from ingest.documents import Chunk, CleanedDocument

SEPARATORS = [
    "\n\n",
    "\n",
    "。",
    "！",
    "？",
    "；",
    "，",
    ". ",
    "! ",
    "? ",
    "; ",
    ", ",
    " ",
    "",
]

# Where an overlap may start, best first: (characters the boundary comes right after).
_LINE = 4
_SENTENCE = 3
_CLAUSE = 2
_SPACE = 1
_ANY = 0
_SENTENCE_ENDS = set("。！？；…!?;.")
_CLAUSE_ENDS = set("，、：,:）)")


def split_pieces(text: str, size: int) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, end)`` pieces of at most ``size`` characters, in order."""
    # Imported here: langchain_core costs ~0.2 s, paid only when a file is really split
    # (an unchanged re-ingest never splits anything).
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(
        separators=SEPARATORS,
        keep_separator="end",
        chunk_size=size,
        chunk_overlap=0,
        strip_whitespace=True,
        length_function=len,
    )
    spans: list[tuple[int, int]] = []
    cursor = 0
    for piece in splitter.split_text(text):
        start = text.find(piece, cursor)
        if start < 0:  # pragma: no cover - LangChain returns substrings of its input
            raise AssertionError(f"splitter returned text not found in the document: {piece[:40]!r}")
        end = start + len(piece)
        cursor = end
        # LangChain strips what it merges, but not a piece it could not split further
        stripped = piece.strip()
        if stripped:
            start += len(piece) - len(piece.lstrip())
            spans.append((start, start + len(stripped)))
    return spans


def _boundary_rank(text: str, pos: int) -> int:
    """How good ``pos`` is as a chunk start (``text[pos]`` is not whitespace)."""
    j = pos - 1
    saw_space = False
    while j >= 0 and text[j].isspace():
        if text[j] == "\n":
            return _LINE
        saw_space = True
        j -= 1
    if j < 0:
        return _LINE
    if text[j] in _SENTENCE_ENDS:
        return _SENTENCE
    if text[j] in _CLAUSE_ENDS:
        return _CLAUSE
    return _SPACE if saw_space else _ANY


def _overlap_start(text: str, prev: tuple[int, int], piece: tuple[int, int], chunk_size: int, overlap: int) -> int:
    prev_start, prev_end = prev
    piece_start, piece_end = piece
    lo = max(prev_end - overlap, prev_start + 1, piece_end - chunk_size)
    hi = min(max(lo, prev_end - math.ceil(overlap / 2)), prev_end - 1)
    best, best_rank = piece_start, -1
    for pos in range(lo, hi + 1):
        if text[pos].isspace():
            continue
        rank = _boundary_rank(text, pos)
        if rank > best_rank:
            best, best_rank = pos, rank
            if rank == _LINE:
                break
    return min(best, piece_start)


def split_document(doc: CleanedDocument, chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """Chunks of ``doc.text``: at most ``chunk_size`` characters, consecutive ones sharing
    about ``chunk_overlap`` characters (see the module docstring for the exact rule)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap must be in [0, chunk_size), got {chunk_overlap} for chunk_size {chunk_size}")
    text = doc.text
    pieces = split_pieces(text, chunk_size - chunk_overlap)
    chunks: list[Chunk] = []
    prev: tuple[int, int] | None = None
    for ordinal, (start, end) in enumerate(pieces):
        if prev is not None and chunk_overlap > 0:
            start = _overlap_start(text, prev, (start, end), chunk_size, chunk_overlap)
        chunks.append(Chunk(text[start:end], ordinal, start, end, doc.pages_between(start, end)))
        prev = (start, end)
    return chunks

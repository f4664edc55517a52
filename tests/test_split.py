"""ingest.split: exact offsets, size limit, real overlap, full coverage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from langchain_text_splitters import RecursiveCharacterTextSplitter

from ingest.documents import CleanedDocument
from ingest.split import SEPARATORS, split_document

# Two long paragraphs (each longer than a chunk) and a short one.
PARA_1 = (
    "检索增强生成（RAG）先把文档切成若干较短的片段，再为每个片段计算向量并写入索引。"
    "用户提问时，系统检索出最相关的几个片段，连同问题一起交给大模型生成回答。"
    "中文文本的句子之间没有空格，所以分块时要按句号、问号、感叹号和分号断开；"
    "实在太长的句子才按逗号断开，最后才按单个字符断开。"
) * 3
PARA_2 = (
    "Overlap matters: a fact that straddles a boundary must be found whole in at least one chunk. "
    "LangChain only overlaps the pieces it merges, so a paragraph break gives none. "
) * 4
PARA_3 = "最后一段很短。"
TEXT = f"{PARA_1}\n\n{PARA_2}\n\n{PARA_3}"


def doc(text: str = TEXT, page_starts=(), page_numbers=()) -> CleanedDocument:
    return CleanedDocument(Path("doc.txt"), text, list(page_starts), list(page_numbers))


def shared(a, b) -> int:
    return max(0, a.end - b.start)


def check_invariants(d: CleanedDocument, chunks, size: int, overlap: int) -> None:
    assert chunks, "non-empty text gives chunks"
    covered = set()
    for i, chunk in enumerate(chunks):
        assert chunk.ordinal == i
        assert chunk.text == d.text[chunk.start : chunk.end]
        assert chunk.text.strip() and chunk.text == chunk.text.strip()
        assert len(chunk.text) <= size
        assert chunk.pages == d.pages_between(chunk.start, chunk.end)
        covered.update(range(chunk.start, chunk.end))
    # every non-whitespace character is in some chunk
    assert all(i in covered for i, ch in enumerate(d.text) if not ch.isspace())
    for prev, cur in zip(chunks, chunks[1:]):
        assert prev.start < cur.start and prev.end < cur.end
        if overlap:
            assert shared(prev, cur) >= min(math.ceil(overlap / 2), len(prev.text) - 1), (prev, cur)
            assert shared(prev, cur) <= overlap
        else:
            assert shared(prev, cur) == 0


def test_langchain_alone_gives_no_overlap_across_a_paragraph_break():
    # the reason split_document adds overlap itself
    splitter = RecursiveCharacterTextSplitter(
        separators=SEPARATORS, keep_separator="end", chunk_size=120, chunk_overlap=40, add_start_index=True
    )
    pieces = splitter.create_documents([TEXT])
    starts = [p.metadata["start_index"] for p in pieces]
    ends = [s + len(p.page_content) for s, p in zip(starts, pieces)]
    boundary = TEXT.index("\n\n")
    i = next(k for k, end in enumerate(ends) if end >= boundary)
    assert ends[i] == boundary  # the chunk before the break ends there...
    assert starts[i + 1] > boundary  # ...and the next starts after it: nothing shared


def test_overlap_exists_across_paragraph_breaks():
    d = doc()
    chunks = split_document(d, chunk_size=120, chunk_overlap=40)
    boundary = TEXT.index("\n\n")
    after = next(c for c in chunks if c.end > boundary + 2 and c.start > 0 and c.text.find("Overlap") >= 0)
    before = chunks[after.ordinal - 1]
    assert shared(before, after) >= 20
    check_invariants(d, chunks, 120, 40)


@pytest.mark.parametrize("size,overlap", [(400, 80), (120, 40), (100, 0), (60, 59), (50, 10), (300, 150)])
def test_invariants(size, overlap):
    d = doc()
    check_invariants(d, split_document(d, size, overlap), size, overlap)


@pytest.mark.parametrize(
    "text",
    [
        "没有任何标点的一长串中文字符" * 40,  # falls back to single characters
        "word " * 300,
        "短。\n\n短。\n\n" * 50,  # many tiny paragraphs
        "一" * 1000,
        "```python\n" + "x = 1\n" * 200 + "```",
    ],
    ids=["no-punctuation", "english-words", "tiny-paragraphs", "one-char", "code"],
)
def test_invariants_on_awkward_text(text):
    d = doc(text)
    check_invariants(d, split_document(d, 100, 30), 100, 30)


def test_small_text_is_one_chunk():
    chunks = split_document(doc("  只有一句话。\n"), 400, 80)
    assert [(c.text, c.start, c.end, c.ordinal) for c in chunks] == [("只有一句话。", 2, 8, 0)]


def test_punctuation_stays_with_its_sentence():
    sentences = ["第一句话说明了背景情况。", "第二句话提出了问题吗？", "第三句话给出答案！", "第四句话做了补充；", "第五句话结束。"]
    d = doc("".join(sentences) * 8)
    chunks = split_document(d, 60, 0)
    for chunk in chunks:
        assert chunk.text[0] not in "。？！；，"
        assert chunk.text[-1] in "。？！；"


def test_overlap_starts_at_a_sentence_boundary_when_it_can():
    d = doc("".join(f"这是第{i}句，内容是关于分块重叠的测试。" for i in range(40)))
    chunks = split_document(d, 100, 40)
    for chunk in chunks[1:]:
        assert d.text[chunk.start - 1] in "。，"


def test_chunks_know_their_pages():
    page_1 = "第一页的内容。" * 20
    page_2 = "第二页的内容。" * 20
    text = f"{page_1}\n\n{page_2}"
    d = doc(text, [0, len(page_1) + 2], [3, 4])
    chunks = split_document(d, 50, 10)
    assert chunks[0].pages == (3,)
    assert chunks[-1].pages == (4,)
    assert any(c.pages == (3, 4) for c in chunks)


def test_empty_text_has_no_chunks():
    assert split_document(doc(""), 400, 80) == []
    assert split_document(doc(" \n\n "), 400, 80) == []


@pytest.mark.parametrize("size,overlap", [(0, 0), (100, 100), (100, -1), (100, 200)])
def test_bad_parameters(size, overlap):
    with pytest.raises(ValueError):
        split_document(doc(), size, overlap)

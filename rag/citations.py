"""Citations the generator left out: ``[n]`` after a sentence that restates passage n.

The prompt asks for ``[n]`` citations, but small generators mostly answer from the
passages without writing them (bench.answers: the bundled Qwen cited in English and
almost never in Chinese). So the service adds the marker where the model did not:
a sentence gets ``[n]`` when at least ``min_overlap`` of its character bigrams occur
in passage ``n`` (the best passage when several do); bigrams of the question do not
count, so a sentence that only restates the question cites nothing. Sentences that already cite,
that match no passage, that are too short to judge, or that sit inside a code block
are left as they are. The marker goes before the sentence's closing punctuation,
so streaming and non-streaming answers get the same text.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_SENTENCE_END = re.compile(r"[。！？；!?;\n]|\.(?=\s)")
_CONTENT = re.compile(r"[\w\u3400-\u9fff]")
_HAS_CITATION = re.compile(r"\[\d{1,3}\]")
MIN_BIGRAMS = 6


def _bigrams(text: str) -> set[str]:
    chars = "".join(_CONTENT.findall(unicodedata.normalize("NFKC", text).lower()))
    return {chars[i : i + 2] for i in range(len(chars) - 1)}


class CitationAdder:
    """Feed the answer as it streams; get back the same text with ``[n]`` markers added.

    >>> adder = CitationAdder(["本机安装了 4 块 NVIDIA A100 显卡。"])
    >>> adder.feed("服务器安装了 4 块 A100 显卡。") + adder.finish()
    '服务器安装了 4 块 A100 显卡 [1]。'
    """

    def __init__(self, passages: Sequence[str], question: str = "", min_overlap: float = 0.5):
        self._passages = [_bigrams(text) for text in passages]
        self._question = _bigrams(question)
        self._min_overlap = min_overlap
        self._sentence = ""  # the current sentence's text so far (already sent on)
        self._in_code = False

    def feed(self, text: str) -> str:
        if not self._passages:
            return text
        out = []
        while text:
            end = _SENTENCE_END.search(text)
            if end is None:
                self._sentence += text
                out.append(text)
                break
            head, text = text[: end.start()], text[end.start() :]
            self._sentence += head
            out.append(head + self._marker())
            out.append(text[0])
            text = text[1:]
            self._sentence = ""
        return "".join(out)

    def finish(self) -> str:
        """The marker for a last sentence without closing punctuation."""
        marker = self._marker() if self._passages else ""
        self._sentence = ""
        return marker

    def _marker(self) -> str:
        sentence = self._sentence
        if sentence.count("```") % 2:
            self._in_code = not self._in_code
        if self._in_code or "```" in sentence or _HAS_CITATION.search(sentence):
            return ""
        grams = _bigrams(sentence) - self._question
        if len(grams) < MIN_BIGRAMS:
            return ""
        overlaps = [len(grams & passage) / len(grams) for passage in self._passages]
        best = max(range(len(overlaps)), key=overlaps.__getitem__)
        if overlaps[best] < self._min_overlap:
            return ""
        return f" [{best + 1}]"

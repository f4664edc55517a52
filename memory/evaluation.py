"""Retrieval evaluation on question sets with evidence strings (``shared/eval/dev.jsonl`` format).

A question is a hit at k when every one of its evidence strings appears in the
text of the top k passages, after NFKC, lowercasing and removing whitespace.
Questions without evidence (``kind: unanswerable``) are not scored here.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SPACE = re.compile(r"\s+")


def normalise_for_match(text: str) -> str:
    """>>> normalise_for_match("P0 表示 ⽂本")
    'p0表示文本'
    """
    return _SPACE.sub("", unicodedata.normalize("NFKC", text).lower())


@dataclass(frozen=True)
class EvalQuestion:
    id: str
    lang: str
    question: str
    evidence: tuple[str, ...]
    kind: str


def load_questions(path: Path) -> list[EvalQuestion]:
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            questions.append(EvalQuestion(row["id"], row["lang"], row["question"], tuple(row["evidence"]), row["kind"]))
    return questions


def is_hit(evidence: tuple[str, ...], passages: list[str]) -> bool:
    joined = normalise_for_match("\n".join(passages))
    return all(normalise_for_match(e) in joined for e in evidence)


def hit_rate(questions: list[EvalQuestion], retrieve: Callable[[str], list[str]]) -> tuple[float, list[str]]:
    """(hit rate over answerable questions, ids of the misses); ``retrieve`` returns top-k passage texts."""
    answerable = [q for q in questions if q.evidence]
    misses = [q.id for q in answerable if not is_hit(q.evidence, retrieve(q.question))]
    return 1 - len(misses) / len(answerable), misses

"""RAG-aware training data: question/answer pairs → samples with the server's system message.

For each pair, :meth:`rag.chat.ChatService.prepare` — the very code path of
``rag serve`` — retrieves passages from the knowledge base and assembles the
messages (same retrieval settings, same templates, same token budget: the
base model's context window minus the server's default ``max_tokens``). The
sample is those messages plus the reference answer, so the system message is
byte-identical to what the server would send for that question.

A share of the samples (``no_answer_share``) instead gets passages that hold no
part of the reference answer, and the target ``no_answer_text``. With
``negatives="near"`` (the default) they are the question's own passages less those
holding the answer — a question the documents almost cover, the hard case; where
none is left, and with ``negatives="other"``, passages retrieved for a *different*
question. The target is ``no_answer_text`` ("The passages do not contain the answer." /
wenda's "无法从文段中得到答案。"): the adapter learns to answer from the
context and to admit when the context is silent.

Output: JSONL, one ``{"messages": [...], "answerable": bool, "kb": name}`` per
line — a format :mod:`finetune.data` reads like any other.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from rag.chat_template import context_window, encode_chat, encode_text
from rag.generation import SamplingParams
from settings import Settings

NEGATIVES = ("near", "other")  # where no-answer samples get their passages (see the module's docstring)
UNSUPPORTED = ("keep", "drop", "no-answer")  # answerable pairs whose passages hold no part of the answer
NO_ANSWER_EN = "The passages do not contain the answer."
NO_ANSWER_ZH = "无法从文段中得到答案。"


@dataclass
class BuildReport:
    written: int
    answerable: int
    unanswerable: int
    answer_in_context: int  # answerable samples whose passages contain the reference answer verbatim
    no_passages: int  # questions for which nothing passed the score threshold
    skipped: int  # context overflow
    near_negatives: int = 0  # no-answer samples given their own question's passages, less the answer's
    unsupported: int = 0  # answerable pairs whose passages held no part of the answer (kept, dropped or made no-answer)


class TemplateCounter:
    """What :class:`ChatService` needs from a generator to assemble prompts: the
    tokenizer's chat template and the context window, without loading weights."""

    adapters: tuple[str, ...] = ()

    def __init__(self, base: Path):
        from finetune.model import load_tokenizer

        self.tokenizer = load_tokenizer(base)
        config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
        self.context_window = context_window(config, self.tokenizer)
        self.model_id = Path(base).name

    def count_prompt_tokens(self, messages: list[dict]) -> int:
        return len(encode_chat(self.tokenizer, messages))

    def count_text_tokens(self, text: str) -> int:
        return len(encode_text(self.tokenizer, text))


class _RetrieveFor:
    """A retriever that answers with the passages of another question (for no-answer samples)."""

    def __init__(self, retriever, question: str):
        self.retriever, self.question = retriever, question

    def retrieve(self, kb, query, **kwargs):
        return self.retriever.retrieve(kb, self.question, **kwargs)


class _WithoutAnswer:
    """A retriever that answers with the question's own passages, less those holding part of ``answer``."""

    def __init__(self, retriever, answer: str):
        self.retriever, self.answer = retriever, answer

    def retrieve(self, kb, query, *, top_k: int, **kwargs):
        # twice as many, so that near passages remain once the answer's own are gone
        found = self.retriever.retrieve(kb, query, top_k=2 * top_k, **kwargs)
        return [p for p in found if not holds_part_of(p.text, self.answer)][:top_k]


def _norm(text: str) -> str:
    return "".join(text.lower().split())


def passages_contain(passages: Sequence, answer: str) -> bool:
    needle = _norm(answer)
    return bool(needle) and any(needle in _norm(p.text) for p in passages)


def holds_part_of(text: str, answer: str, window: int = 30) -> bool:
    """Whether ``text`` holds the answer or any ``window``-character stretch of it (whitespace and
    case ignored): a long answer split over several chunks is held by each of them."""
    text, answer = _norm(text), _norm(answer)
    if len(answer) <= window:
        return bool(answer) and answer in text
    return any(answer[i : i + window] in text for i in range(0, len(answer) - window + 1, window // 2))


def build_rag_samples(
    pairs: Sequence[tuple[str, str]],
    kb: str,
    counter,
    retriever,
    settings: Settings,
    *,
    no_answer_share: float = 0.2,
    negatives: str = "near",
    no_answer_text: dict[str, str] | None = None,
    cite: bool = True,
    unsupported: str = "keep",
    top_k: int | None = None,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], BuildReport]:
    """Training records for ``pairs`` (question, answer) against knowledge base ``kb``.

    ``cite``: answerable targets end with the ``[n]`` of the passages holding part of the answer,
    as the server's prompt asks. ``unsupported``: what becomes of an answerable pair whose passages
    hold none of its answer — kept as it is (answers that paraphrase the documents), dropped, or
    given the no-answer target (answers quoted from the documents, so absence is certain)."""
    from rag.chat import ChatService, ChatTurn
    from rag.generation import ContextOverflow
    from rag.prompt import language_of

    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, not {negatives!r}")
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"unsupported must be one of {', '.join(UNSUPPORTED)}, not {unsupported!r}")
    texts = {"en": NO_ANSWER_EN, "zh": NO_ANSWER_ZH, **(no_answer_text or {})}
    params = SamplingParams(max_tokens=settings.default_max_tokens)
    rng = random.Random(seed)
    unanswerable = set(rng.sample(range(len(pairs)), round(len(pairs) * no_answer_share))) if len(pairs) > 1 else set()
    service = ChatService(counter, retriever, settings)
    records: list[dict] = []
    report = BuildReport(0, 0, 0, 0, 0, 0)

    async def prepare(service, question):
        return await service.prepare(ChatTurn([{"role": "user", "content": question}], params, knowledge_base=kb, top_k=top_k))

    for index, (question, answer) in enumerate(pairs):
        try:
            if index in unanswerable:
                prepared = None
                sources = [_WithoutAnswer(retriever, answer)] if negatives == "near" else []
                sources += [_RetrieveFor(retriever, pairs[other][0]) for other in _others(index, len(pairs), rng)]
                for source in sources:
                    candidate = asyncio.run(prepare(ChatService(counter, source, settings), question))
                    if candidate.passages and not any(holds_part_of(p.text, answer) for p in candidate.passages):
                        prepared = candidate
                        report.near_negatives += isinstance(source, _WithoutAnswer)
                        break
                if prepared is None:  # every candidate's passages hold this answer: keep it answerable
                    unanswerable.discard(index)
            if index not in unanswerable:
                prepared = asyncio.run(prepare(service, question))
        except ContextOverflow:
            report.skipped += 1
            continue
        holding = [] if index in unanswerable else [n for n, p in enumerate(prepared.passages, 1) if holds_part_of(p.text, answer)]
        if index not in unanswerable and not holding:
            report.unsupported += 1
            if unsupported == "drop":
                continue
            if unsupported == "no-answer":
                unanswerable.add(index)
        if index in unanswerable:
            target = texts["zh" if language_of(question) == "zh" else "en"]
            report.unanswerable += 1
        else:
            target = answer + (" " + "".join(f"[{n}]" for n in holding) if cite and holding else "")
            report.answerable += 1
            report.no_passages += not prepared.passages
            report.answer_in_context += passages_contain(prepared.passages, answer)
        records.append(
            {"messages": prepared.messages + [{"role": "assistant", "content": target}], "answerable": index not in unanswerable, "kb": kb}
        )
        if on_progress:
            on_progress(index + 1, len(pairs))
    report.written = len(records)
    return records, report


def _others(index: int, n: int, rng: random.Random, tries: int = 5) -> list[int]:
    choices = [i for i in range(n) if i != index]
    return rng.sample(choices, min(tries, len(choices)))


def write_jsonl(records: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def qa_pairs(paths: Sequence[Path], on_error: str = "stop") -> list[tuple[str, str]]:
    """(question, answer) from any training format: the last user turn and the answer after it."""
    from finetune.data import load_samples

    pairs = []
    for sample in load_samples(paths, on_error).samples:
        users = [m for m in sample.messages if m["role"] == "user"]
        pairs.append((users[-1]["content"], sample.messages[-1]["content"]))
    return pairs

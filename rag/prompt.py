"""Prompt assembly: the one place that turns passages and a conversation into
the messages a generator sees. ``finetune/`` renders its training samples with
the same functions, so training and serving prompts cannot drift apart.

The retrieved passages go into one system message::

    <client's own system message, if any>

    学习以下文段, 用中文回答用户问题。…

    [1] (来源: guide.pdf, 第 3 页)
    …passage text…

    [2] (来源: faq.md)
    …
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Callable, Protocol, Sequence

from rag.generation import ContextOverflow, Message

# wenda's opening, then: answer only from the passages, cite them by number (an example
# "[1]": with a bare "[n]" the bundled Qwen copies the letter), and say so rather than invent.
DEFAULT_TEMPLATE_ZH = (
    "学习以下文段, 用中文回答用户问题。只根据文段内容回答，并在所依据的内容后用文段编号标注出处，例如 [1]。"
    "如果文段中没有答案，请直接说明文段中没有相关内容，不要编造。\n\n"
    "{passages}"
)
DEFAULT_TEMPLATE_EN = (
    "Learn the following passages and answer the user's question in the user's language, "
    "from the passages only. Cite the passage each fact comes from by its number, e.g. [1]. "
    "If the passages do not contain the answer, say that the documents do not contain it; do not make one up.\n\n"
    "{passages}"
)
# Phrases by which an answer says the passages lack what was asked (the templates ask for
# that); ``finetune eval`` and ``bench.answers`` score "says it doesn't know" with them.
UNKNOWN_MARKERS = (
    "无法从文段中得到答案", "文段中没有", "没有相关", "没有提到", "没有提及", "未提及", "未提到", "没有涉及",
    "未涉及", "没有找到", "无法回答", "没有包含", "不包含", "没有给出", "没有说明",
    "do not contain", "does not contain", "don't contain", "doesn't contain", "not mentioned",
    "no information", "not provided", "cannot answer", "can't answer", "not found in", "no relevant passage",
)
NO_CONTEXT_NOTICE_ZH = "（知识库中没有找到相关文段，以下回答未参考知识库。）\n\n"
NO_CONTEXT_NOTICE_EN = "(No relevant passage was found in the knowledge base; this answer does not draw on it.)\n\n"

_CITATION = re.compile(r"\[(\d{1,3}(?:\s*[,，、]\s*\d{1,3})*)\]")
_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.S)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# words that point back into the conversation: the retrieval query then needs the previous turn
_REFERRING = re.compile(r"(它|它们|这个|那个|这些|那些|该|其|上述|\b(it|its|this|that|these|those|they|them)\b)", re.I)


class PassageLike(Protocol):
    text: str
    source: str
    pages: tuple[int, ...]


@dataclass(frozen=True)
class Templates:
    """System-message templates; each must contain ``{passages}``."""

    zh: str = DEFAULT_TEMPLATE_ZH
    en: str = DEFAULT_TEMPLATE_EN

    def __post_init__(self) -> None:
        for name in ("zh", "en"):
            if "{passages}" not in getattr(self, name):
                raise ValueError(f"prompt template {name!r} must contain '{{passages}}'")

    def for_language(self, language: str) -> str:
        return self.zh if language == "zh" else self.en


def language_of(text: str) -> str:
    """'zh' when the text is mostly Chinese, else 'en' (the templates' two languages).

    Code (```blocks``` and `spans`) has no language: a Chinese question about an error
    message, or a Chinese answer quoting a path, is Chinese.
    """
    prose = _CODE.sub(" ", text)
    text = prose if prose.strip() else text
    cjk = len(_CJK.findall(text))
    letters = sum(ch.isalpha() for ch in text)
    return "zh" if letters and cjk / letters >= 0.3 else "en"


def says_unknown(answer: str, markers: Sequence[str] = UNKNOWN_MARKERS) -> bool:
    """Whether the answer says the documents do not contain the answer (:data:`UNKNOWN_MARKERS`)."""
    lowered = answer.lower()
    return any(marker.lower() in lowered for marker in markers)


def cited_numbers(answer: str) -> list[int]:
    """The passage numbers an answer cites as ``[n]`` (or ``[1][2]``, ``[1, 2]``), in order, once each."""
    numbers = [int(n) for group in _CITATION.findall(answer) for n in re.findall(r"\d+", group)]
    return list(dict.fromkeys(numbers))


def no_context_notice(language: str) -> str:
    return NO_CONTEXT_NOTICE_ZH if language == "zh" else NO_CONTEXT_NOTICE_EN


def source_label(passage: PassageLike, language: str) -> str:
    name = PurePath(passage.source).name or passage.source
    if not passage.pages:
        return name
    first, last = passage.pages[0], passage.pages[-1]
    span = str(first) if first == last else f"{first}-{last}"
    return f"{name}, 第 {span} 页" if language == "zh" else f"{name}, page {span}"


def render_passages(passages: Sequence[PassageLike], language: str) -> str:
    label = "来源" if language == "zh" else "source"
    return "\n\n".join(
        f"[{i}] ({label}: {source_label(p, language)})\n{p.text.strip()}" for i, p in enumerate(passages, 1)
    )


def render_system_message(
    passages: Sequence[PassageLike], language: str, templates: Templates = Templates(), client_system: str = ""
) -> str:
    """The system message: the client's own system text first, then the passages under the template."""
    context = templates.for_language(language).replace("{passages}", render_passages(passages, language))
    return f"{client_system.strip()}\n\n{context}" if client_system.strip() else context


def split_conversation(messages: Sequence[Message]) -> tuple[str, list[Message], Message]:
    """(client system text, earlier turns, the latest user turn). Several system messages are joined."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    return system, turns[:-1], turns[-1]


def retrieval_query(history: Sequence[Message], question: str) -> str:
    """The text to search with: the question, plus the previous user turn when the
    question is short or refers back ("它的价格呢?", "what about its limits?")."""
    previous = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
    short = len(question) < 12 if language_of(question) == "zh" else len(question.split()) < 5
    if previous and (short or _REFERRING.search(question)):
        return f"{previous}\n{question}"
    return question


@dataclass(frozen=True)
class AssembledPrompt:
    messages: list[Message]
    passages: list  # the passages actually sent, in [n] order
    dropped_turns: int  # history turns left out to fit the budget


def assemble(
    client_messages: Sequence[Message],
    passages: Sequence[PassageLike],
    *,
    count_tokens: Callable[[list[Message]], int],
    context_window: int,
    max_tokens: int,
    templates: Templates = Templates(),
    passage_tokens: int | None = None,
) -> AssembledPrompt:
    """Fit system text, passages and history into ``context_window - max_tokens``.

    Priority: the question and the client's system text are never cut (a request
    that cannot fit them is a ContextOverflow); then passages in rank order, taking
    at most ``passage_tokens`` tokens together (the best one cut to fit when even it
    alone does not); then history, newest turns first.
    """
    client_system, history, question = split_conversation(client_messages)
    language = language_of(question["content"])
    budget = context_window - max_tokens

    def build(chosen: Sequence[PassageLike], turns: Sequence[Message]) -> list[Message]:
        system = render_system_message(chosen, language, templates, client_system) if chosen else client_system
        head = [{"role": "system", "content": system}] if system else []
        return head + list(turns) + [question]

    needed = count_tokens(build([], []))
    if needed > budget:
        raise ContextOverflow(needed, max_tokens, context_window)
    limit = budget if passage_tokens is None else min(budget, needed + passage_tokens)
    chosen = _pack_passages(passages, lambda ps: count_tokens(build(ps, [])) <= limit)
    kept = _keep_recent_turns(history, lambda ts: count_tokens(build(chosen, ts)) <= budget)
    return AssembledPrompt(build(chosen, kept), chosen, len(history) - len(kept))


def _pack_passages(passages: Sequence[PassageLike], fits: Callable[[list], bool]) -> list:
    chosen: list = []
    for rank, passage in enumerate(passages):
        if fits(chosen + [passage]):
            chosen.append(passage)
        elif rank == 0:  # the best passage alone is too long: its head rather than nothing
            head = _cut_to_fit(passage, lambda p: fits([p]))
            chosen += [head] if head else []
    return chosen


def _cut_to_fit(passage: PassageLike, fits: Callable[[PassageLike], bool]):
    """The longest head of ``passage`` that fits (binary search on characters), or None."""
    low, high = 0, len(passage.text)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(replace(passage, text=passage.text[:middle])):
            low = middle
        else:
            high = middle - 1
    return replace(passage, text=passage.text[:low]) if low >= 50 else None


def _keep_recent_turns(history: Sequence[Message], fits: Callable[[list], bool]) -> list[Message]:
    """The longest suffix of ``history`` that fits, starting on a user turn."""
    for start in range(len(history)):
        suffix = list(history[start:])
        if suffix[0]["role"] == "user" and fits(suffix):
            return suffix
    return []

"""Training data: the formats users bring → chat messages → token ids with labels.

Every record becomes a list of chat messages (``{"role", "content"}``, roles
system/user/assistant, at least one assistant turn, the last turn the
assistant's). The formats, told apart by their fields:

* **alpaca** — ``instruction``, ``input`` (optional), ``output``, optional ``system``
  and ``history`` (``[[question, answer], ...]``, earlier turns);
* **sharegpt** — ``conversations: [{from: human|gpt|system, value}]``, optional ``system``;
* **messages** (ChatGLM3 / OpenAI) — ``messages`` or ``conversations`` of ``{role, content}``;
* **prompt/response** — ``{prompt, response}`` (also ``{question, answer}``);
* **text** (RWKV) — ``{text: "Question: …\\n\\nAnswer: …"}`` or
  ``{text: "Instruction: …\\n\\nInput: …\\n\\nResponse: …"}``.

Files are JSON (an array of records) or JSONL (one record per line). A bad
record is a :class:`DataError` naming ``file:line: field``; the caller decides
whether it stops the run or is skipped and counted (:func:`load_samples`).

Samples are rendered with the base model's chat template through
:func:`rag.chat_template.render_chat` — the function the server renders its
prompts with — and only assistant tokens are trained (everything else is -100):
for each assistant turn the conversation up to it is rendered with the
generation prompt, then including it; the difference is that turn's text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

from rag.chat_template import encode_text, render_chat

IGNORE_INDEX = -100
Message = dict

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_QA_TEXT = re.compile(r"^\s*(?:User|Question):\s*(?P<q>.*?)\n\s*\n(?:Bot|Assistant|Answer):\s*(?P<a>.*)$", re.S)
_INSTRUCTION_TEXT = re.compile(
    r"^\s*Instruction:\s*(?P<i>.*?)\n\s*\n(?:Input:\s*(?P<x>.*?)\n\s*\n)?Response:\s*(?P<a>.*)$", re.S
)


class DataError(ValueError):
    """A record that cannot become a training sample: where it is and what is wrong."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field_name, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {field_name + ': ' if field_name else ''}{problem}")


@dataclass
class Sample:
    messages: list[Message]
    source: str = ""  # file:line
    extra: dict = field(default_factory=dict)  # other fields of the record (e.g. "answerable")


@dataclass
class LoadReport:
    samples: list[Sample]
    skipped: list[DataError] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.samples)} samples, {len(self.skipped)} bad records skipped"


# ------------------------------------------------------------------ reading files


def read_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, record) for each record of a JSON array or JSONL file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, None, None, "no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"not UTF-8 text ({exc.reason})") from None
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "[":
        yield from _json_array(path, text)
    elif stripped[0] == "{" and path.suffix.lower() == ".json" and _is_single_json(text):
        yield text[: len(text) - len(stripped)].count("\n") + 1, json.loads(text)
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, None, f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def _is_single_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise DataError(path, text.count("\n") + 1, None, "the JSON array is not closed")
        if text[index] == "]":
            return
        line = text.count("\n", 0, index) + 1
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, None, f"not valid JSON ({exc.msg})") from None
        yield line, record


# ------------------------------------------------------------------ records → messages


def detect_format(record: dict) -> str:
    if "conversations" in record or "messages" in record:
        turns = record.get("messages", record.get("conversations"))
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
            return "sharegpt"
        return "messages"
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record and "response" in record:
        return "prompt_response"
    if "question" in record and "answer" in record:
        return "question_answer"
    if "text" in record:
        return "text"
    raise ValueError("unknown format")


def record_to_messages(record: object, path: str | Path = "<data>", line: int | None = None) -> list[Message]:
    """The chat messages of one record, validated; :class:`DataError` otherwise."""

    def fail(field_name: str | None, problem: str) -> DataError:
        return DataError(path, line, field_name, problem)

    if not isinstance(record, dict):
        raise fail(None, f"a record must be a JSON object, not {type(record).__name__}")
    try:
        kind = detect_format(record)
    except ValueError:
        raise fail(
            None,
            f"unknown format (fields: {', '.join(sorted(record)) or 'none'}); expected alpaca (instruction/output), "
            "sharegpt (conversations of from/value), messages (role/content), prompt/response or text",
        ) from None
    messages = _CONVERTERS[kind](record, fail)
    _validate(messages, fail, "messages" if kind == "messages" else None)
    return messages


def _text(record: dict, key: str, fail, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise fail(key, "missing")
        return ""
    if not isinstance(value, str):
        raise fail(key, f"must be a string, not {type(value).__name__}")
    return value


def _alpaca(record: dict, fail) -> list[Message]:
    messages: list[Message] = []
    system = _text(record, "system", fail, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise fail("history", "must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise fail(f"history[{i}]", "must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(record, "instruction", fail)
    extra_input = _text(record, "input", fail, required=False)
    question = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": _text(record, "output", fail)}]
    return messages


def _sharegpt(record: dict, fail) -> list[Message]:
    key = "conversations" if "conversations" in record else "messages"
    messages: list[Message] = []
    system = _text(record, "system", fail, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(record[key]):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise fail(where, "must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise fail(f"{where}.from", f"must be human, gpt or system, not {turn.get('from')!r}")
        if not isinstance(turn.get("value"), str):
            raise fail(f"{where}.value", "missing or not a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _messages(record: dict, fail) -> list[Message]:
    key = "messages" if "messages" in record else "conversations"
    turns = record[key]
    if not isinstance(turns, list):
        raise fail(key, "must be a list of {role, content} objects")
    messages: list[Message] = []
    system = _text(record, "system", fail, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise fail(where, "must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in ("system", "user", "assistant"):
            raise fail(f"{where}.role", f"must be system, user or assistant, not {role!r}")
        if not isinstance(turn.get("content"), str):
            raise fail(f"{where}.content", "missing or not a string")
        messages.append({"role": role, "content": turn["content"]})
    return messages


def _prompt_response(record: dict, fail) -> list[Message]:
    return _pair(record, "prompt", "response", fail)


def _question_answer(record: dict, fail) -> list[Message]:
    return _pair(record, "question", "answer", fail)


def _pair(record: dict, q: str, a: str, fail) -> list[Message]:
    messages: list[Message] = []
    system = _text(record, "system", fail, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
    return messages + [{"role": "user", "content": _text(record, q, fail)}, {"role": "assistant", "content": _text(record, a, fail)}]


def _rwkv_text(record: dict, fail) -> list[Message]:
    text = _text(record, "text", fail)
    if match := _INSTRUCTION_TEXT.match(text):
        extra = (match.group("x") or "").strip()
        question = f"{match.group('i').strip()}\n{extra}" if extra else match.group("i").strip()
        return [{"role": "user", "content": question}, {"role": "assistant", "content": match.group("a").strip()}]
    if match := _QA_TEXT.match(text):
        return [{"role": "user", "content": match.group("q").strip()}, {"role": "assistant", "content": match.group("a").strip()}]
    raise fail("text", "expected 'Question: …\\n\\nAnswer: …' or 'Instruction: …\\n\\nInput: …\\n\\nResponse: …'")


_CONVERTERS = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "prompt_response": _prompt_response,
    "question_answer": _question_answer,
    "text": _rwkv_text,
}


def _validate(messages: list[Message], fail, key: str | None) -> None:
    where = key or "messages"
    turns = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[len(messages) - len(turns) :]):
        raise fail(where, "a system message must come before the conversation")
    if not turns:
        raise fail(where, "no user or assistant turn")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise fail(where, f"turn {i + 1} should be {expected}, not {turn['role']} (user and assistant must alternate)")
        if not turn["content"].strip():
            raise fail(where, f"turn {i + 1} ({turn['role']}) is empty")
    if turns[-1]["role"] != "assistant":
        raise fail(where, "the last turn must be the assistant's (the answer to train on)")


def load_samples(paths: Sequence[str | Path], on_error: Literal["stop", "skip"] = "stop") -> LoadReport:
    """Every record of ``paths`` as a :class:`Sample`; bad records raise (stop) or are counted (skip)."""
    report = LoadReport([])
    for path in paths:
        for line, record in read_records(path):
            try:
                messages = record_to_messages(record, path, line)
            except DataError as exc:
                if on_error == "stop":
                    raise
                report.skipped.append(exc)
                continue
            extra = {k: v for k, v in record.items() if k in ("answerable", "kb", "id")}
            report.samples.append(Sample(messages, f"{path}:{line}", extra))
    return report


# ------------------------------------------------------------------ messages → token ids and labels


@dataclass
class EncodeReport:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0  # too long (overflow="drop") or nothing left to train after truncation


def encode_messages(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 except on assistant turns.

    The text is cut into pieces at the boundaries of the assistant turns, each
    piece rendered by the chat template exactly as the server renders a prompt,
    and the pieces are tokenised one by one so a boundary never falls inside a token.
    """
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        with_turn = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not with_turn.startswith(prompt) or not full.startswith(with_turn):
            raise ValueError(
                "the chat template does not render conversations incrementally (a turn changes earlier text); "
                "its assistant turns cannot be located"
            )
        spans.append((len(prompt), len(with_turn)))
    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in spans:
        context = encode_text(tokenizer, full[position:start]) if start > position else []
        answer = encode_text(tokenizer, full[start:end])
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        position = end
    if position < len(full):  # text after the last assistant turn (rare): context, not trained
        tail = encode_text(tokenizer, full[position:])
        input_ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    return input_ids, labels


def encode_samples(
    tokenizer, samples: Sequence[Sample], max_length: int, overflow: Literal["truncate", "drop"] = "truncate"
) -> tuple[list[dict], EncodeReport]:
    """Tokenised samples ``{"input_ids", "labels"}`` within ``max_length`` tokens, and what was cut."""
    report = EncodeReport()
    encoded = []
    for sample in samples:
        ids, labels = encode_messages(tokenizer, sample.messages)
        if len(ids) > max_length:
            if overflow == "drop":
                report.dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                report.dropped += 1  # the answer was entirely cut off: nothing to learn
                continue
            report.truncated += 1
        report.kept += 1
        encoded.append({"input_ids": ids, "labels": labels})
    return encoded, report


class Collator:
    """Right-pads a batch; padded positions are masked out and never trained. Counts real tokens."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.tokens_seen = 0

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        self.tokens_seen += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

"""JSON (.json) and JSON Lines (.jsonl): one ``key: value`` line per value, keys kept.

    {"产品": "A100", "规格": {"显存": "80GB"}, "标签": ["训练", "推理"]}
    ->  - 产品: A100
        - 规格.显存: 80GB
        - 标签: 训练, 推理

Nested keys are joined with dots, and lists of plain values with commas; a list of
objects gives one block per object (``items[2].名称: …``). Each top-level record
(an element of a top-level list, a line of a .jsonl file) is its own paragraph, so
chunks break between records. Raw JSON would put braces, quotes and escapes
into chunks and split a record's key from its value; these lines keep them together
(list items, so that cleaning never joins two of them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.tables import ROW_MARK
from ingest.text import decode_text, read_bytes


def load_json(path: Path) -> list[Page]:
    text = decode_text(read_bytes(path), path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestError(path, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    records = value if isinstance(value, list) else [value]
    return [Page(None, "\n\n".join(filter(None, map(render_record, records))))]


def load_jsonl(path: Path) -> list[Page]:
    text = decode_text(read_bytes(path), path)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise IngestError(path, f"malformed JSON Lines: line {number}: {exc.msg}") from None
    return [Page(None, "\n\n".join(filter(None, map(render_record, records))))]


def render_record(value: object) -> str:
    """One record as ``- key.path: value`` lines.

    >>> print(render_record({"a": {"b": 1}, "c": [1, 2], "d": [{"e": "x"}]}))
    - a.b: 1
    - c: 1, 2
    - d[1].e: x
    """
    return "\n".join(ROW_MARK + (f"{key}: {text}" if key else text) for key, text in _leaves("", value))


def _leaves(key: str, value: object) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for name, child in value.items():
            yield from _leaves(f"{key}.{name}" if key else str(name), child)
    elif isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value):
            plain = ", ".join(_scalar(item) for item in value if item is not None)
            if plain:
                yield key, plain
        else:
            for i, item in enumerate(value, 1):
                yield from _leaves(f"{key}[{i}]", item)
    elif value is not None and _scalar(value):
        yield key, _scalar(value)


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return " ".join(str(value).split())

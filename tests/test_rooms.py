"""The design card's rule: data flows one way, and a room imports only from rooms upstream of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# each room and the rooms it may import (settings is everyone's)
UPSTREAM = {
    "settings": set(),
    "models": {"settings"},
    "ingest": {"settings", "models"},
    "memory": {"settings", "models", "ingest"},
    "rag": {"settings", "models", "ingest", "memory"},
    "api": {"settings", "models", "ingest", "memory", "rag"},
    "finetune": {"settings", "models", "ingest", "memory", "rag"},
    "cli": {"settings", "models", "ingest", "memory", "rag", "api", "finetune"},
}


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        rooms |= {name.split(".")[0] for name in names} & UPSTREAM.keys()
    return rooms


@pytest.mark.parametrize("room", sorted(UPSTREAM))
def test_a_room_imports_only_from_upstream(room):
    wrong = {
        str(path.relative_to(REPO)): sorted(imported_rooms(path) - UPSTREAM[room] - {room})
        for path in (REPO / room).rglob("*.py")
    }
    assert {path: rooms for path, rooms in wrong.items() if rooms} == {}


def test_imports_inside_functions_count_too(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import json\n\ndef f():\n    from rag.retrieval import Retriever\n    import api.app\n", encoding="utf-8")
    assert imported_rooms(module) == {"rag", "api"}

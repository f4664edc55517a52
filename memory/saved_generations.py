"""Derived indexes saved under the store generation they reflect: one mechanism for the
local backend's FAISS file (``vectors.<generation>.faiss``) and BM25 folder
(``lexical.<generation>``).

The chunk store is the source of truth and counts its commits (its *generation*). An index
built from it is saved atomically (by the index's own ``save``: a temporary sibling, then a
rename) under the generation it reflects, so the name alone says how current a saved copy
is: a reader loads the newest copy no newer than the store and brings it in step, or
rebuilds; a writer saves the current generation and deletes older copies and what a killed
save left (``.<name>.*.tmp``).

>>> import tempfile; folder = Path(tempfile.mkdtemp())
>>> saved = SavedGenerations(folder, "vectors", ".faiss")
>>> saved.path(3).name
'vectors.3.faiss'
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SavedGenerations:
    """The saved copies ``<stem>.<generation><suffix>`` (files or folders) of one index in ``folder``."""

    def __init__(self, folder: Path, stem: str, suffix: str = ""):
        self.folder = folder
        self.stem = stem
        self.suffix = suffix
        self._name = re.compile(rf"^{re.escape(stem)}\.(\d+){re.escape(suffix)}$")
        self._leftover = re.compile(rf"^\.{re.escape(stem)}\.\d+{re.escape(suffix)}\..*\.tmp$")

    def path(self, generation: int) -> Path:
        return self.folder / f"{self.stem}.{generation}{self.suffix}"

    def saved(self) -> list[tuple[int, Path]]:
        """Every saved copy, newest first."""
        found = []
        for path in self.folder.iterdir():
            match = self._name.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def load_newest(self, at_most: int, load: Callable[[Path], T], unreadable: type[Exception]) -> tuple[int, T] | None:
        """The newest copy no newer than generation ``at_most`` that ``load`` can read, with its generation."""
        for generation, path in self.saved():
            if generation > at_most:
                continue
            try:
                return generation, load(path)
            except unreadable:
                continue
        return None

    def load_exactly(self, generation: int, load: Callable[[Path], T], unreadable: type[Exception]) -> T | None:
        """The copy saved at ``generation``, if there is a readable one."""
        path = self.path(generation)
        if not path.exists():
            return None
        try:
            return load(path)
        except unreadable:
            return None

    def save(self, generation: int, write: Callable[[Path], None], *, usable: Callable[[Path], bool] = Path.exists) -> None:
        """Write the copy of ``generation`` unless a usable one is there, then delete older copies and leftovers."""
        path = self.path(generation)
        if not usable(path):
            _remove(path)
            write(path)
        self.prune(keep=generation)

    def prune(self, keep: int) -> None:
        """Delete copies older than ``keep`` and temporary files or folders of interrupted saves."""
        for generation, path in self.saved():
            if generation < keep:
                _remove(path)
        for path in self.folder.iterdir():
            if self._leftover.match(path.name):
                _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

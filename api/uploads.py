"""Where uploaded files live: staged under ``<home>/staging/<request>/`` while they
stream in, moved to ``<home>/uploads/<kb>/`` only under the knowledge base's writer
lock (``add_paths(staged=...)``), so a refused or interrupted upload never leaves a
file there that the knowledge base does not know, nor replaces one being read.

Names are made safe and unique; what is left after a crash is removed at start-up.
"""

from __future__ import annotations

import logging
import re
import shutil
import unicodedata
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastapi import UploadFile

from memory.knowledge_base import KnowledgeBaseError, KnowledgeBases, validate_name

log = logging.getLogger("zhiku.api")

_UNSAFE = re.compile(r"[^\w.\-() \u3000-\u9fff]+")
_NAME_BYTES = 200  # filesystems allow 255 bytes; room for " (n)" and ".part"
_EXTENSION_BYTES = 16


def upload_dir(home: Path, kb: str) -> Path:
    return home / "uploads" / validate_name(kb)


def sanitised_filename(name: str | None) -> str:
    """A file name safe to create: no folders, no control characters, no leading dots,
    at most 200 UTF-8 bytes (cut on a character boundary), the extension kept."""
    base = unicodedata.normalize("NFC", Path((name or "").replace("\\", "/")).name)
    cleaned = _UNSAFE.sub("_", base).strip(" .") or "upload"
    stem, dot, extension = cleaned.rpartition(".")
    if not (dot and stem) or len(extension.encode()) > _EXTENSION_BYTES:
        stem, extension = cleaned, ""
    suffix = f".{extension}" if extension else ""
    return _cut_to_bytes(stem, _NAME_BYTES - len(suffix.encode())) + suffix


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats made distinct ("a.txt", "a (2).txt"), so no upload overwrites another."""
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        while candidate.casefold() in taken:
            n += 1
            stem, dot, extension = name.rpartition(".")
            candidate = f"{stem} ({n}).{extension}" if dot and stem else f"{name} ({n})"
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


def _cut_to_bytes(text: str, limit: int) -> str:
    return text.encode()[:limit].decode("utf-8", errors="ignore")


@contextmanager
def staging_area(home: Path) -> Iterator[Path]:
    """A fresh folder for one request's files, removed when the request ends (moved files are gone from it)."""
    folder = home / "staging" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def stage(uploads: list[UploadFile], staging: Path, destination: Path) -> list[tuple[Path, Path]]:
    """Stream each upload into ``staging``; ``(staged file, destination file)`` pairs."""
    names = unique_names([sanitised_filename(upload.filename) for upload in uploads])
    pairs = []
    for upload, name in zip(uploads, names):
        staged = staging / name
        with staged.open("wb") as out:
            while chunk := await upload.read(1 << 20):
                out.write(chunk)
        pairs.append((staged, destination / name))
    return pairs


def clean_leftovers(home: Path, kbs: KnowledgeBases) -> None:
    """At start-up: drop staged files of requests a crash cut off, and uploaded files that
    no knowledge base lists (moved in, then killed before their chunks were committed)."""
    shutil.rmtree(home / "staging", ignore_errors=True)
    uploads = home / "uploads"
    if not uploads.is_dir():
        return
    for folder in uploads.iterdir():
        try:
            _drop_unknown_files(kbs, folder)
        except KnowledgeBaseError as exc:  # busy (a CLI ingest) or not a knowledge base: leave it
            log.info("not cleaning uploads of %s: %s", folder.name, exc)


def _drop_unknown_files(kbs: KnowledgeBases, folder: Path) -> None:
    if not kbs.exists(folder.name):
        shutil.rmtree(folder, ignore_errors=True)  # its knowledge base was dropped
        return
    with kbs.lock(folder.name):
        known = {d.path for d in kbs.documents(folder.name)}
        for path in folder.iterdir():
            if str(path.resolve()) not in known:
                log.warning("removing %s: uploaded but never committed to %s", path, folder.name)
                path.unlink(missing_ok=True)

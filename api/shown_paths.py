"""Document paths as the HTTP API shows them: relative to what the user gave, never
the server's absolute paths. An uploaded file shows its stored name; a file from
``ingest add FOLDER`` shows its path below the folder the knowledge base's other
files share (``zh/shop.txt``). The CLI keeps absolute paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePath

from memory.knowledge_base import STORE_DB, KnowledgeBases


class ShownPaths:
    """``shown = ShownPaths(home, kbs).for_kb("手册"); shown("/abs/path")``.

    The shared folder of a knowledge base is recomputed only when its document list
    may have changed (the store's files were written since).
    """

    def __init__(self, home: Path, kbs: KnowledgeBases):
        self.home = home
        self.kbs = kbs
        self._roots: dict[str, tuple[tuple, Path | None]] = {}

    def for_kb(self, kb: str) -> Callable[[str], str]:
        uploads = (self.home / "uploads" / kb).resolve()
        root = self._shared_root(kb, uploads)

        def shown(path: str) -> str:
            candidate = PurePath(path)
            for base in (uploads, root):
                if base is not None and candidate.is_relative_to(base):
                    return candidate.relative_to(base).as_posix()
            return candidate.name

        return shown

    def _shared_root(self, kb: str, uploads: Path) -> Path | None:
        stamp = self._stamp(kb)
        cached = self._roots.get(kb)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        folders = [Path(d.path).parent for d in self.kbs.documents(kb) if not Path(d.path).is_relative_to(uploads)]
        root = Path(os.path.commonpath(folders)) if folders else None
        self._roots[kb] = (stamp, root)
        return root

    def _stamp(self, kb: str) -> tuple | None:
        """What changes when the document list may have; None where no file tells (Milvus: read every time)."""
        manifest = self.kbs.manifest(kb)
        if manifest.backend != "local":
            return None
        store = self.kbs.root / kb / manifest.store
        stamps = []
        for name in (STORE_DB, STORE_DB + "-wal"):
            try:
                stat = (store / name).stat()
                stamps.append((stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                stamps.append(None)
        return (manifest.store, manifest.created, *stamps)

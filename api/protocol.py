"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Field names, types and defaults follow OpenAI's chat-completions and embeddings
references; zhiku's own additions are marked "zhiku extension". Unknown request
fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" is not text
        raise ValueError(f"not valid Unicode text (lone surrogate {text[exc.start]!r} at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
# Booleans and numbers are strict, as OpenAI's are: "yes" or 1 is not a boolean, "5" not a number.
Number = StrictFloat | StrictInt


class TextContentPart(_Lenient):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: Text


class ChatMessage(_Lenient):
    # OpenAI's newer "developer" role means what "system" means for other models.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_message(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(min_length=1)
    model: Text
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=8)
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    user: str | None = None
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    # zhiku extensions
    knowledge_base: Text | None = Field(None, description="zhiku extension: knowledge base to retrieve from; null: none.")
    top_k: StrictInt | None = Field(None, ge=1, le=50, description="zhiku extension: passages sent to the model.")
    score_threshold: Number | None = Field(
        None, ge=-1.0, le=1.0, description="zhiku extension: minimum cosine similarity of a passage."
    )

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is enabled")
        return self

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SourcePassage(BaseModel):
    """zhiku extension: a retrieved passage, as chat sends it to the model (``[index]``) and search shows it."""

    index: int = Field(description="1-based; chat answers cite it as [index].")
    source: str = Field(description="The upload name, or the path relative to the ingested folder.")
    page: int | None = Field(description="First PDF page (1-based); null for text files.")
    pages: list[int] = Field(description="Every PDF page the passage spans.")
    score: float = Field(description="Best cosine similarity of its hits to the query, in [-1, 1]; higher is closer.")
    text: str
    ocr_pages: list[int] = Field(default_factory=list, description="Its pages read by OCR (scans, images): odd characters there may be misreadings.")

    @classmethod
    def of(cls, index: int, passage, shown_source) -> "SourcePassage":
        """From a ``rag.retrieval.Passage``; ``shown_source`` maps its absolute path to what a client may see."""
        return cls(
            index=index,
            source=shown_source(passage.source),
            page=passage.page,
            pages=list(passage.pages),
            score=round(float(passage.score), 6),
            text=passage.text,
            ocr_pages=list(passage.ocr_pages),
        )


class SearchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[SourcePassage]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[SourcePassage] = Field(default_factory=list, description="zhiku extension.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zhiku"
    parent: str | None = None
    root: str | None = None
    knowledge_base: str | None = Field(None, description="zhiku extension: the knowledge base this id retrieves from.")
    kind: Literal["chat", "embedding"] = Field("chat", description="zhiku extension: which endpoint takes this id.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(_Lenient):
    input: Text | list[Text] = Field(description="Text or texts; token arrays are not supported.")
    model: Text
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None
    # zhiku extension: e5-style models embed queries and passages with different prompts.
    input_type: Literal["query", "passage"] = "query"

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: dict


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class KnowledgeBaseCreate(_Lenient):
    name: Text


class KnowledgeBaseSearch(_Lenient):
    query: Text = Field(min_length=1)
    top_k: StrictInt = Field(5, ge=1, le=100)
    score_threshold: Number | None = Field(None, ge=-1.0, le=1.0)


# ---- knowledge bases and ingestion jobs (zhiku's own API)

FileOutcomeKind = Literal["ingested", "unchanged", "failed", "skipped", "removed", "cancelled"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class KnowledgeBaseSummary(BaseModel):
    name: str
    backend: str = Field(description="'local' (SQLite + FAISS + BM25 files) or 'milvus'.")
    embedding_model: str
    dimension: int
    chunk_size: int
    chunk_overlap: int
    store: str
    format: int
    created: str = Field(description="When the name was (re)created, ISO 8601.")
    documents: int
    chunks: int


class KnowledgeBaseList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KnowledgeBaseSummary]


class DocumentInfo(BaseModel):
    id: int
    path: str = Field(description="The upload name, or the path relative to the ingested folder.")
    sha256: str | None
    size: int | None = Field(description="Bytes.")
    status: Literal["ok", "failed", "skipped"]
    error: str | None = Field(description="Why a failed or skipped document was not ingested.")
    chunk_count: int
    ocr_pages: list[int] = Field(default_factory=list, description="Pages read by OCR (scans, images): their text may hold misread characters.")
    modified: float | None = Field(None, description="The file's modification time (Unix seconds); null when it is gone.")


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentInfo]


class FileOutcomeInfo(BaseModel):
    path: str
    outcome: FileOutcomeKind
    chunks: int = 0
    error: str | None = None


class UploadReport(BaseModel):
    """The synchronous upload's answer (``?wait=true``)."""

    object: Literal["list"] = "list"
    data: list[FileOutcomeInfo]
    failed: int


class JobFile(BaseModel):
    """One file of a job: waiting, processed (while the job runs), then its outcome."""

    name: str
    state: Literal["waiting", "processed"] | FileOutcomeKind
    chunks: int = 0
    error: str | None = None


class IngestJob(BaseModel):
    id: str
    object: Literal["ingest.job"] = "ingest.job"
    knowledge_base: str
    state: JobState
    created: float = Field(description="Unix seconds.")
    started: float | None
    finished: float | None
    files_total: int
    files_done: int
    chunks_total: int = Field(description="Chunks found so far; grows while files are parsed.")
    chunks_embedded: int
    ocr_pages_read: int = Field(0, description="Pages of scans and images read by OCR so far (seconds each on a CPU).")
    files: list[JobFile] = Field(description="The job's uploaded files, each with its state.")
    outcomes: list[FileOutcomeInfo] = Field(description="Per file, once the job has finished.")
    error: str | None = Field(description="Why the job failed, or how many of its files did.")
    retry_of: str | None = Field(description="The job whose files this one re-runs.")


class IngestJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[IngestJob]


class Deleted(BaseModel):
    id: str | int
    object: str
    deleted: bool = True
    path: str | None = None


class Caller(BaseModel):
    """zhiku extension: what the presented key may do (the page hides what it may not)."""

    keys_required: bool
    authenticated: bool
    admin: bool
    readable: list[str] | None = Field(description="Knowledge bases it may read; null for all.")
    writable: list[str] | None = Field(description="Knowledge bases it may change; null for all.")
    max_upload_bytes: int = Field(description="The largest upload request the server takes (the page splits bigger selections).")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class GeneratorLoad(BaseModel):
    queue_depth: int = Field(description="Requests waiting for a generation slot.")
    running: int = Field(description="Generations in progress.")


class Readiness(BaseModel):
    status: Literal["ready", "loading", "failed"]
    model: str | None = None
    embedding_model: str | None = None
    error: str | None = Field(None, description="Why loading the models failed.")
    generator: GeneratorLoad | None = Field(None, description="The local generator's load (an upstream has its own).")

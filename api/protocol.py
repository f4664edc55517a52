"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Field names, types and defaults follow OpenAI's chat-completions and embeddings
references; zhiku's own additions are marked "zhiku extension". Unknown request
fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContentPart(_Lenient):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessage(_Lenient):
    # OpenAI's newer "developer" role means what "system" means for other models.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_message(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # zhiku extensions
    knowledge_base: str | None = Field(None, description="zhiku extension: knowledge base to retrieve from; null: none.")
    top_k: int | None = Field(None, ge=1, le=50, description="zhiku extension: passages sent to the model.")
    score_threshold: float | None = Field(
        None, ge=-1.0, le=1.0, description="zhiku extension: minimum cosine similarity of a passage."
    )

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
    """zhiku extension: a passage sent to the model as ``[index]``."""

    index: int
    source: str
    page: int | None
    score: float = Field(description="Cosine similarity to the query, in [-1, 1]; higher is closer.")
    text: str


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(_Lenient):
    input: str | list[str] = Field(description="Text or texts; token arrays are not supported.")
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
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
    name: str


class KnowledgeBaseSearch(_Lenient):
    query: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    score_threshold: float | None = Field(None, ge=-1.0, le=1.0)

"""OpenAI-style errors: every failure is ``{"error": {"message", "type", "param", "code"}}``
with the matching HTTP status. Bad input is a 4xx that names the field; a 500 means a bug."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.protocol import ErrorDetail, ErrorResponse
from memory.knowledge_base import KnowledgeBaseUnavailable

log = logging.getLogger("zhiku.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


_MEANINGS = {
    400: "Invalid request; `param` names the field",
    401: "Missing or invalid API key",
    403: "This API key (or a cross-origin page) may not do this",
    404: "Unknown model, knowledge base or document",
    409: "The knowledge base exists already, or another writer holds it (see Retry-After)",
    413: "The request body is over the size limit",
    429: "The server is busy (see Retry-After)",
    503: "The models are loading or failed to load (see Retry-After)",
}


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for the error statuses a route may answer, each an OpenAI error object."""
    return {status: {"model": ErrorResponse, "description": _MEANINGS[status]} for status in statuses}


def without_validation_422(app: FastAPI) -> None:
    """Drop FastAPI's default 422 from the OpenAPI document: validation errors are answered 400 here."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # cached by FastAPI; stripping again is a no-op
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        return schema

    app.openapi = openapi


class APIError(Exception):
    """An error the client should see as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def unavailable(exc: Exception) -> APIError:
    """The store behind a knowledge base (a Milvus) cannot be reached: 503, try again."""
    return APIError(503, str(exc), code="knowledge_base_unavailable", headers={"Retry-After": "5"})


def error_response(status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=_TYPES.get(status, "server_error"), param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problem = exc.errors()[0]
    if problem.get("type") == "json_invalid":
        return f"request body is not valid JSON: {problem.get('ctx', {}).get('error', problem['msg'])}", None
    location = [str(p) for p in problem.get("loc", ()) if p != "body" and not _is_type_tag(str(p))]
    param = ".".join(location) or None
    message = problem["msg"].removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def _is_type_tag(part: str) -> bool:
    """pydantic puts the union member tried in an error's location ("str", "function-after[...]")."""
    return part in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in part or part.endswith("()")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(KnowledgeBaseUnavailable)
    async def _store_down(request: Request, exc: KnowledgeBaseUnavailable) -> JSONResponse:
        error = unavailable(exc)
        return error_response(error.status, error.message, code=error.code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}; see the server log")

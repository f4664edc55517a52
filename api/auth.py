"""Bearer-key checks. With no keys configured the server is open (local use);
with keys, everything but /health needs one and changing knowledge bases needs
an admin key."""

from __future__ import annotations

import secrets

from fastapi import Request

from api.errors import APIError


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _matches(key: str, accepted: list[str]) -> bool:
    return any(secrets.compare_digest(key.encode(), k.encode()) for k in accepted)


def require_key(request: Request) -> None:
    settings = request.app.state.settings
    accepted = settings.api_keys + settings.admin_api_keys
    if not accepted:
        return
    key = _presented_key(request)
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if not _matches(key, accepted):
        raise APIError(401, "invalid API key", code="invalid_api_key")


def require_admin(request: Request) -> None:
    require_key(request)
    settings = request.app.state.settings
    if not (settings.api_keys or settings.admin_api_keys):
        return
    key = _presented_key(request) or ""
    if not _matches(key, settings.admin_api_keys):
        raise APIError(403, "changing knowledge bases needs an admin API key (ZHIKU_ADMIN_API_KEYS)", code="admin_key_required")

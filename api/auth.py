"""Who may do what. With no keys configured the server is open (local use); with
keys, everything but /health needs one. An admin key may do everything; a plain
key may read every knowledge base; a scoped key (``scoped_api_keys``) sees only
the knowledge bases it names, and may change those listed under ``write``.
A knowledge base outside a key's scope is answered as if it did not exist.

Changing knowledge bases from another origin (a web page the user happens to
visit) is refused unless keys are configured: browsers send such requests
(a form upload needs no CORS preflight) but cannot send the key with them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request

from api.errors import APIError


@dataclass(frozen=True)
class Access:
    """What the caller may do. ``None``: every knowledge base."""

    admin: bool
    readable: frozenset[str] | None = None
    writable: frozenset[str] | None = None
    keys_configured: bool = False

    def can_read(self, kb: str) -> bool:
        return self.readable is None or kb in self.readable

    def can_write(self, kb: str) -> bool:
        return self.admin or (self.writable is not None and kb in self.writable)


OPEN = Access(admin=True)


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _matches(key: str, accepted) -> bool:
    return any(secrets.compare_digest(key.encode(), k.encode()) for k in accepted)


def access_for(key: str, settings) -> Access | None:
    if _matches(key, settings.admin_api_keys):
        return Access(admin=True, keys_configured=True)
    if _matches(key, settings.api_keys):
        return Access(admin=False, writable=frozenset(), keys_configured=True)
    for scoped, scope in settings.scoped_api_keys.items():
        if _matches(key, [scoped]):
            writable = frozenset(scope.write)
            return Access(admin=False, readable=frozenset(scope.read) | writable, writable=writable, keys_configured=True)
    return None


def require_key(request: Request) -> None:
    """Check the bearer key and keep what it may do on ``request.state.access``."""
    settings = request.app.state.settings
    if not settings.keys_configured:
        request.state.access = OPEN
        return
    key = presented_key(request)
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    access = access_for(key, settings)
    if access is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    request.state.access = access


def access_of(request: Request) -> Access:
    return getattr(request.state, "access", OPEN)


def require_admin(request: Request) -> None:
    require_key(request)
    refuse_cross_origin_changes(request)
    if not access_of(request).admin:
        raise APIError(403, "creating and deleting knowledge bases needs an admin API key (ZHIKU_ADMIN_API_KEYS)", code="admin_key_required")


def require_write(request: Request, kb: str) -> None:
    """The caller may change ``kb`` (upload, delete documents)."""
    refuse_cross_origin_changes(request)
    if not access_of(request).can_write(kb):
        raise APIError(403, f"this API key may not change knowledge base '{kb}'", param="kb", code="write_not_allowed")


def refuse_cross_origin_changes(request: Request) -> None:
    if request.app.state.settings.keys_configured:
        return  # a cross-origin page cannot send the key
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise APIError(
            403,
            f"knowledge bases cannot be changed from another origin ({origin}) unless API keys are configured "
            "(ZHIKU_ADMIN_API_KEYS)",
            code="cross_origin_change",
        )

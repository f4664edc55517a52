"""The web page at ``/`` (plain HTML, CSS and JS modules shipped in ``api/static``; no CDN, no build step)
and ``GET /v1/caller``, which tells the page what the presented key may do.

The page treats everything it shows from the server as untrusted text, and a strict
Content-Security-Policy backs that up: scripts only from this server, no inline script,
no plugins, no framing, requests only to this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from api.auth import access_for, presented_key
from api.errors import APIError
from api.protocol import Caller

STATIC = Path(__file__).resolve().parent.parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml", ".png": "image/png"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_SECURITY_HEADERS)


@router.get("/static/{name}")
def asset(name: str) -> FileResponse:
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise APIError(404, f"no such page asset: {name}", param="name", code="not_found")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_SECURITY_HEADERS)


caller_router = APIRouter()


@caller_router.get("/v1/caller")
def caller(request: Request) -> Caller:
    """What the presented key may do: the page asks for a key when one is required and hides admin actions."""
    settings = request.app.state.settings
    limit = settings.max_upload_bytes
    if not settings.keys_configured:
        return Caller(keys_required=False, authenticated=True, admin=True, readable=None, writable=None, max_upload_bytes=limit)
    key = presented_key(request)
    access = access_for(key, settings) if key else None
    if access is None:
        return Caller(keys_required=True, authenticated=False, admin=False, readable=[], writable=[], max_upload_bytes=limit)
    return Caller(
        keys_required=True,
        authenticated=True,
        admin=access.admin,
        readable=None if access.readable is None else sorted(access.readable),
        writable=None if access.admin else sorted(access.writable or ()),
        max_upload_bytes=limit,
    )

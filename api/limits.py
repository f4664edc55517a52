"""Request-size limit as pure ASGI middleware, so an over-large body is refused
with 413 before it is read into memory: by its Content-Length, or, for a chunked
body, the moment the bytes received pass the limit (reading stops there)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Refuse bodies over ``default_limit`` bytes (``upload_limit`` for multipart uploads)."""

    def __init__(self, app: ASGIApp, default_limit: int, upload_limit: int):
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        is_upload = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.upload_limit if is_upload else self.default_limit
        setting = "ZHIKU_MAX_UPLOAD_BYTES" if is_upload else "ZHIKU_MAX_REQUEST_BYTES"
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit, setting)
            return
        received = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # stop reading here: the app sees a client that left
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:  # whatever the app makes of the cut-off body, the answer is 413
                if not started:
                    started = True
                    await _reject(send, limit, setting)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await _reject(send, limit, setting)


async def _reject(send: Send, limit: int, setting: str) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"request body is larger than the limit of {limit} bytes (the server's {setting})",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

"""Cancel a request's work the moment its client disconnects.

Starlette notices a vanished client only when it writes to it, so a chat
request whose client left while it was queued, retrieving or prefilling (or
any non-streamed request) would still be served in full. This pure ASGI
middleware watches the connection once the request body is read and cancels
the handler on ``http.disconnect``; the generator's stream then withdraws the
request from the waiting list or the running batch (see ``rag.generation``).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        gone = asyncio.Event()

        async def app_receive() -> Message:
            if body_read.is_set():  # the watcher owns the connection now
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        responded = False

        async def app_send(message: Message) -> None:
            nonlocal responded
            await send(message)
            responded = message["type"] == "http.response.body" and not message.get("more_body", False)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))

        async def watch() -> None:
            await body_read.wait()
            # the server also reports "disconnect" once the response is complete: nothing left to cancel
            if (await receive())["type"] == "http.disconnect" and not responded:
                gone.set()
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not gone.is_set():  # the server itself is cancelling us (shutdown)
                raise
        finally:
            watcher.cancel()

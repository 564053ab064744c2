"""``ApiGuard``: on ``/v1/*`` the caller is authenticated and the body bounded before the body is read.

So an unauthenticated client gets its 401 whatever it sends (even malformed JSON), and a body over
``max_request_bytes`` is a 413 — at once when ``Content-Length`` declares it, or as soon as the
bytes received pass the limit (chunked uploads). A body not received whole within
``body_timeout_s`` is a 408: a client trickling a partial body (slowloris) cannot hold a
connection open. All answers use the dialect's envelope.
"""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from promptcache.server.auth import resolve_tenant
from promptcache.server.config import DEFAULT_BODY_TIMEOUT_S
from promptcache.server.errors import ApiError, error_response


class ApiGuard:
    def __init__(self, app: ASGIApp, api_keys: dict[str, str] | None, max_request_bytes: int,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.api_keys = api_keys
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(("/v1/", "/v1beta/")):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            request.state.tenant = resolve_tenant(request, self.api_keys)  # read by state.tenant_of
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_request_bytes:
                raise ApiError(413, self._too_large())
        except ApiError as e:
            await error_response(request, e)(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _too_large(self) -> str:
        return f"the request body exceeds the maximum size of {self.max_request_bytes} bytes"

    def _bounded(self, receive: Receive) -> Receive:
        num_received_bytes = 0
        body_done = False
        deadline = time.monotonic() + self.body_timeout_s

        async def bounded_receive() -> Message:
            nonlocal num_received_bytes, body_done
            if body_done:  # later receives wait for a disconnect while streaming: no deadline then
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # Connection: close — uvicorn would otherwise keep reading the trickled body
                raise HTTPException(408, f"the request body was not received within {self.body_timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                num_received_bytes += len(message.get("body", b""))
                if num_received_bytes > self.max_request_bytes:
                    # raised inside FastAPI's body read, which re-raises HTTPException as is: the
                    # exception handlers answer it in the dialect's envelope
                    raise HTTPException(413, self._too_large())
            return message

        return bounded_receive

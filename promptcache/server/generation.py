"""One request's run on the async engine, shared by both dialects.

``Generation.start`` submits the request and waits for its first output *before* any response is
sent, so every refusal (prompt too long, queue full, bad sampling values) is still a proper HTTP
error. Afterwards the stream is read with ``next()`` and must be ``close()``d: closing a generation
that has not finished aborts the engine request and frees its KV blocks. Waits race the client's
connection, so a client that hangs up — while queued, during prefill, or mid-stream — frees its
blocks at once instead of when the answer would have been complete.

Failures reach the routes as ``ApiError`` only: ``ValueError`` from the engine (the request was
refused before it ran) is a 400, a full queue a 429, and anything else — the engine loop died
(``EngineDead``) or an unexpected exception — a 503 with a generic message (the details go to the
log, never to the client). A stream that already sent its 200 reports the 503 in-band.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from promptcache.engine.api import EngineDead, EngineOverloaded, RequestOutput, RequestSpec
from promptcache.server.errors import ENGINE_FAILED, ApiError
from promptcache.server.metrics import REPLICA_STATE
from promptcache.server.state import ServerState

log = logging.getLogger(__name__)
T = TypeVar("T")


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then cancel it and raise a 499."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ApiError(499, "the client closed the request")


class Generation:
    def __init__(self, stream: AsyncIterator[RequestOutput], first: RequestOutput, ttft_s: float = 0.0) -> None:
        self._stream = stream
        self.first = first
        self.ttft_s = ttft_s
        self._on_finish: Callable[[RequestOutput], None] | None = None

    def on_finish(self, callback: Callable[[RequestOutput], None]) -> None:
        """Call ``callback`` with the final output once it is read (at once if it already was)."""
        self._on_finish = callback
        if self.first.finished:
            self._finished(self.first)

    def _finished(self, out: RequestOutput) -> None:
        callback, self._on_finish = self._on_finish, None
        if callback is not None:
            try:
                callback(out)
            except Exception:  # bookkeeping must never fail a response
                log.exception("request %s: finishing bookkeeping failed", out.request_id)

    @classmethod
    async def start(
        cls,
        state: ServerState,
        request: Request,
        endpoint: str,
        spec: RequestSpec,
    ) -> Generation:
        started = time.monotonic()
        stream = state.aengine.generate(spec)
        try:
            first = await race_disconnect(request, _next(stream))
        except ApiError:  # the client went away (499)
            raise
        except ValueError as e:  # refused before it ran: the message is written for the client
            raise ApiError(400, str(e)) from None
        except EngineOverloaded as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except Exception as e:
            raise _engine_failed(spec.request_id, e) from None
        state.metrics.observe_ttft(endpoint, started)
        if first.served_by is not None:  # a cluster replica ran it: the response names it (metrics.py)
            request.scope.setdefault("state", {})[REPLICA_STATE] = first.served_by
        return cls(stream, first, time.monotonic() - started)

    async def next(self) -> RequestOutput:
        """The next output; any failure (``EngineDead`` or a bug) is a 503 ``ApiError``."""
        try:
            out = await _next(self._stream)
        except Exception as e:
            raise _engine_failed(self.first.request_id, e) from None
        if out.finished:
            self._finished(out)
        return out

    async def close(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()

    async def final(self, request: Request) -> RequestOutput:
        """Read to the end (non-streaming responses); aborts if the client goes away meanwhile."""
        try:
            return await race_disconnect(request, self._collect())
        finally:
            await self.close()

    async def _collect(self) -> RequestOutput:
        out = self.first
        while not out.finished:
            out = await self.next()
        return out


async def _next(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await stream.__anext__()


def _engine_failed(request_id: str, error: Exception) -> ApiError:
    if isinstance(error, EngineDead):
        log.error("request %s failed: %s", request_id, error)
    else:  # StopAsyncIteration without a finished output, or a bug: keep the traceback
        log.error("request %s failed unexpectedly", request_id, exc_info=error)
    return ApiError(503, ENGINE_FAILED)


class Closable(Protocol):
    first: RequestOutput

    async def close(self) -> None: ...


async def guarded_events(gen: Closable, events: AsyncGenerator[str, None],
                         error_event: Callable[[ApiError], str]) -> AsyncGenerator[str, None]:
    """``events``, then ``gen`` closed. The 200 is already out, so a failure on the way (the engine
    died, or a bug here) becomes one last in-band ``error_event`` instead of a dropped connection."""
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
    except ApiError as e:
        yield error_event(e)
    except Exception:
        log.exception("request %s: the response stream failed", gen.first.request_id)
        yield error_event(ApiError(500, "internal server error"))
    finally:
        await gen.close()


class EventStream(StreamingResponse):
    """SSE response that always closes its body generator, so an abandoned stream aborts at once.

    Starlette stops iterating a body when the client disconnects but leaves the generator for the
    garbage collector; closing it here runs its ``finally`` (which closes the Generation) right away.
    """

    def __init__(self, body: AsyncGenerator[str, None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()

"""``n`` choices of one prompt (OpenAI ``n``): started together, so the prompt's full blocks are
computed once (in-flight sharing) and each choice computes only the rest of its last block."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import Request

from promptcache.engine.api import RequestOutput, RequestSpec
from promptcache.server.generation import Generation
from promptcache.server.state import ServerState


async def start(state: ServerState, request: Request, endpoint: str, spec: RequestSpec, n: int) -> list[Generation]:
    """``n`` generations of ``spec``; choice i gets the seed + i when there is a seed. If any
    cannot start, the others are closed (their blocks freed) and its error is raised."""
    specs = [spec] + [replace(spec, request_id=f"{spec.request_id}-{i}", params=replace(
        spec.params, seed=None if spec.params.seed is None else spec.params.seed + i)) for i in range(1, n)]
    results = await asyncio.gather(*(Generation.start(state, request, endpoint, s) for s in specs),
                                   return_exceptions=True)
    gens = [r for r in results if isinstance(r, Generation)]
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        await close(gens)
        raise failed
    return gens


async def close(gens: list[Generation]) -> None:
    for g in gens:
        await g.close()


async def finals(request: Request, gens: list[Generation]) -> list[RequestOutput]:
    """Every choice read to its end (all aborted if the client goes away)."""
    if len(gens) == 1:
        return [await gens[0].final(request)]
    try:
        return list(await asyncio.gather(*(g.final(request) for g in gens)))
    finally:
        await close(gens)


def summed(outs: list[RequestOutput]) -> RequestOutput:
    """The first choice's output with every choice's completion tokens: the usage (and cost) of an
    ``n``-choice response — the prompt once, the completions summed."""
    if len(outs) == 1:
        return outs[0]
    return replace(outs[0], usage=replace(outs[0].usage, completion_tokens=sum(o.usage.completion_tokens
                                                                                for o in outs)))

"""One access line per request, and its request id: the client's `X-Request-Id` when it sends a sane one, else
a new one; returned in the response's `X-Request-Id` and passed on to the workers (gRPC metadata)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web

from phasesplit.logs import REQUEST_ID_HEADER, sane_request_id
from phasesplit.router.request import Job

log = logging.getLogger("phasesplit.router.access")
REQUEST_ID = web.RequestKey("request_id", str)
JOB = web.RequestKey("job", Job)   # the request's job, once it has one: its tokens in and out
CLIENT_CLOSED = 499   # nginx's status for a client that went away before the answer
QUIET_PATHS = frozenset({"/health", "/livez", "/metrics"})   # probes and scrapes: DEBUG, not a line every second


def request_id(request: web.Request) -> str:
    return request.get(REQUEST_ID, "")


@web.middleware
async def access_log(request: web.Request, handler):
    request[REQUEST_ID] = sane_request_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
    start, status = time.monotonic(), 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        _log_access(request, status, time.monotonic() - start)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, streamed or not, error or not, names its request id."""
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]


def _log_access(request: web.Request, status: int, seconds: float) -> None:
    job = request.get(JOB)
    tokens_in, tokens_out = (len(job.prompt_token_ids), job.completion_tokens) if job else (0, 0)
    level = logging.DEBUG if request.path in QUIET_PATHS and status < 400 else logging.INFO
    log.log(level, "%s %s %d %.4fs tokens_in=%d tokens_out=%d", request.method, request.path, status, seconds,
             tokens_in, tokens_out, extra={"request_id": request[REQUEST_ID]})

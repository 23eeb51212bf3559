"""The router's HTTP API (aiohttp): OpenAI endpoints, health, metrics and pool administration."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.router.cache_routing import RoutingSettings
from phasesplit.router.access_log import JOB, access_log, add_request_id_header, request_id
from phasesplit.router.admission import AdmissionSettings, KeyStreams
from phasesplit.router.dispatch import Dispatcher, TokenizerChanged
from phasesplit.router.metrics import POOLS, RouterMetrics
from phasesplit.router.openai_api import APIError, ChatCompletionRequest, CompletionRequest, parse_body, unavailable
from phasesplit.router.pools import Pools, WorkerSpec
from phasesplit.router.prompts import (check_prompt_chars, check_prompt_length, chat_prompt_ids, completion_prompt_ids,
                                      sampling_params)
from phasesplit.router.request import Delta, Job, MigrationPolicy
from phasesplit.router.responses import Shape
from phasesplit.router.tokenizer_source import TokenizerSource
from phasesplit.router.waiting import QueueSettings

log = logging.getLogger(__name__)


@dataclass
class RouterSettings:
    served_model_name: str
    max_model_len: int | None   # None: from the config.json of the model whose tokenizer the router has
    api_key: str | None = None
    admin_token: str | None = None  # PUT /admin/pools needs it; None: pool administration is off
    workers: dict[str, list[WorkerSpec]] = field(default_factory=dict)   # pool -> entries
    poll_interval: float = 0.5
    dns_interval: float = 5.0
    migration: MigrationPolicy = field(default_factory=MigrationPolicy)
    queue: QueueSettings = field(default_factory=QueueSettings)   # requests held for a pool with no worker
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)   # requests held until there is room
    routing: RoutingSettings = field(default_factory=RoutingSettings)   # cacheAware or leastLoaded, and its knobs
    pools: tuple[str, ...] | None = None   # the pools served, even at 0 workers; None: those given workers
    header_timeout: float = 30.0   # seconds a connection may take to send a request's headers (and may idle)
    body_timeout: float = 60.0     # seconds a request may take to send its body


@dataclass
class Router:
    settings: RouterSettings
    tokenizers: TokenizerSource
    metrics: RouterMetrics
    pools: Pools
    dispatcher: Dispatcher
    key_streams: KeyStreams
    tokenizing: ThreadPoolExecutor   # tokenization, off the event loop, TOKENIZER_THREADS at a time
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int | None:
        return self.settings.max_model_len or self.tokenizers.max_model_len

    async def tokenizer(self) -> tuple[Tokenizer, str]:
        """The tokenizer and its digest; without one yet, the request waits (as demand on the pools) for
        a worker to read it from."""
        if self.tokenizers.tokenizer is None:
            await self.dispatcher.queue.route(prompt_tokens=0, max_tokens=0)
        return self.tokenizers.tokenizer, self.tokenizers.digest


@dataclass(frozen=True)
class Endpoint:
    """What sets the two OpenAI generation endpoints apart."""
    body: type[CompletionRequest] | type[ChatCompletionRequest]
    prompt_ids: Callable   # (body, tokenizer) -> the prompt's token ids
    param: str             # the body field the prompt comes from
    chat: bool

    @property
    def id_prefix(self) -> str:
        return "chatcmpl" if self.chat else "cmpl"


ROUTER = web.AppKey("router", Router)
CLIENT_KEY = web.RequestKey("client_key", str)
ENDPOINTS = {"/v1/completions": Endpoint(CompletionRequest, completion_prompt_ids, "prompt", chat=False),
             "/v1/chat/completions": Endpoint(ChatCompletionRequest, chat_prompt_ids, "messages", chat=True)}
TOKENIZER_CHANGES = 3   # times a request is tokenized again because the workers moved to another tokenizer
BODY_LIMIT_MIB = 8      # request bodies larger are refused (413) before they are read whole
TOKENIZER_THREADS = 4


def create_app(settings: RouterSettings, tokenizer: TokenizerSource | Tokenizer | None) -> web.Application:
    """`tokenizer` None: read from the workers."""
    source = tokenizer if isinstance(tokenizer, TokenizerSource) else TokenizerSource(tokenizer)
    metrics = RouterMetrics(settings.served_model_name)
    pools = Pools(settings.workers, metrics, poll_interval=settings.poll_interval,
                  dns_interval=settings.dns_interval, served=settings.pools, tokenizer=source)
    app = web.Application(middlewares=[access_log, openai_errors, require_api_key],
                          client_max_size=BODY_LIMIT_MIB * 2**20)
    app.on_response_prepare.append(add_request_id_header)
    dispatcher = Dispatcher(pools, metrics, settings.migration, settings.queue, settings.admission, settings.routing)
    app[ROUTER] = Router(settings, source, metrics, pools, dispatcher,
                         KeyStreams(settings.admission.max_streams_per_key, metrics),
                         ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize"))
    for path in ENDPOINTS:
        app.router.add_post(path, generate)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/livez", livez)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/admin/pools", list_pools)
    app.router.add_put("/admin/pools/{pool}", put_pool)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    router = app[ROUTER]
    await router.pools.start()
    router.tokenizers.start(router.pools)


async def _stop(app: web.Application) -> None:
    router = app[ROUTER]
    await router.dispatcher.drain_cleanup()
    await router.tokenizers.stop()
    await router.pools.stop()
    router.tokenizing.shutdown(wait=False, cancel_futures=True)


# ---- middleware ----
@web.middleware
async def openai_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        error = APIError(e.status, f"{request.method} {request.path}: {e.reason}",
                         type="invalid_request_error" if e.status < 500 else "server_error")
        return web.json_response(error.body(), status=e.status)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        error = APIError(500, "internal error in the router", type="server_error")
        return web.json_response(error.body(), status=500)


@web.middleware
async def require_api_key(request: web.Request, handler):
    """Clients need the API key (when one is set); repointing a pool needs the admin token, which only
    whoever started the router holds (local mode), never clients: in a cluster the router finds its
    workers through DNS and is started without one."""
    settings = request.app[ROUTER].settings
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if request.path.startswith("/admin/") and request.method != "GET":
        if not settings.admin_token:
            raise APIError(403, "pool administration is off: the router was started without PHASESPLIT_ADMIN_TOKEN",
                           code="admin_disabled")
        if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
            raise APIError(401, "missing or incorrect admin token: send it as 'Authorization: Bearer TOKEN'",
                           code="invalid_admin_token")
    elif settings.api_key and request.path.startswith(("/v1/", "/admin/")):
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
    request[CLIENT_KEY] = settings.api_key or ""   # whose streams a request counts among ("": no key is set)
    return await handler(request)


# ---- OpenAI endpoints ----
async def generate(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions and /v1/chat/completions."""
    router = request.app[ROUTER]
    endpoint = ENDPOINTS[request.match_info.route.resource.canonical]
    with _rejections(router):
        req = parse_body(endpoint.body, await _read_body(request, router.settings.body_timeout))
        _check_model(router, req.model)
        stream = router.key_streams.take(request.get(CLIENT_KEY, ""))
    with stream:
        return await _serve(request, router, req, endpoint)


async def _read_body(request: web.Request, timeout: float) -> bytes:
    """The body, within the size limit and the time limit (a client sending it slowly holds a connection)."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"request body: larger than the router's limit of {BODY_LIMIT_MIB} MiB",
                       code="request_too_large") from None
    except TimeoutError:
        raise APIError(408, f"request body: not received within {timeout:g} s", code="request_timeout") from None


async def _serve(request: web.Request, router: Router, req, endpoint: Endpoint) -> web.StreamResponse:
    """Tokenizes and answers; again with the new tokenizer when the workers moved to another while the
    request waited for them (nothing was sent yet)."""
    for _ in range(TOKENIZER_CHANGES):
        with _rejections(router):
            tokenizer, digest = await router.tokenizer()
            check_prompt_chars(req, router.max_model_len, endpoint.param)   # before the work of tokenizing it
            router.dispatcher.admission.refuse_if_full()
            ids = await asyncio.get_running_loop().run_in_executor(router.tokenizing, endpoint.prompt_ids, req,
                                                                   tokenizer)
            check_prompt_length(ids, router.max_model_len, endpoint.param)
            job = Job(f"{endpoint.id_prefix}-{uuid.uuid4().hex}", ids,
                      sampling_params(req, len(ids), router.max_model_len), tokenizer=digest,
                      log_id=request_id(request))
            request[JOB] = job
        try:
            return await _answer(request, router, req, job, Shape(job.request_id, req.model, chat=endpoint.chat))
        except TokenizerChanged:
            log.info("request %s: the workers' tokenizer changed while it waited; tokenizing it again", job.request_id)
    with _rejections(router):
        raise unavailable("the model's tokenizer changed again and again (a rollout) while the request waited; "
                          "send it again")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[ROUTER])]})


async def model(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    _check_model(router, request.match_info["model"])
    return web.json_response(_model_card(router))


def _model_card(router: Router) -> dict:
    card = {"id": router.settings.served_model_name, "object": "model", "created": router.created,
            "owned_by": "phasesplit"}
    if router.max_model_len:
        card["max_model_len"] = router.max_model_len
    return card


class _rejections:
    """Counts a request refused before dispatch as `rejected`."""

    def __init__(self, router: Router):
        self.router = router

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, APIError):
            self.router.metrics.requests.labels(outcome="rejected").inc()
        return False


def _check_model(router: Router, model: str) -> None:
    if model != router.settings.served_model_name:
        raise APIError(404, f"model: the model {model!r} does not exist; this router serves "
                            f"{router.settings.served_model_name!r}", param="model", code="model_not_found")


async def _answer(request: web.Request, router: Router, req, job: Job, shape: Shape) -> web.StreamResponse:
    async with aclosing(router.dispatcher.run(job)) as deltas:
        if req.stream:
            return await _stream(request, deltas, shape, job, req.include_usage)
        texts, completion_tokens, finish_reason = [], 0, ""
        async for delta in deltas:
            texts.append(delta.text)
            completion_tokens += len(delta.token_ids)
            finish_reason = delta.finish_reason or finish_reason
        body = shape.full("".join(texts), finish_reason, len(job.prompt_token_ids), completion_tokens,
                          job.cached_tokens)
        return web.json_response(body)


async def _stream(request: web.Request, deltas, shape: Shape, job: Job,
                  include_usage: bool) -> web.StreamResponse:
    first: Delta = await anext(deltas)   # errors before the first token are answered with their HTTP status
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await _send_events(response, first, deltas, shape, job, include_usage)
    except APIError as e:
        try:
            await _send(response, e.body())
            await _send(response, b"[DONE]")
        except ConnectionResetError:
            return response
    except ConnectionResetError:
        log.debug("client of %s went away mid-stream", shape.id)
        return response   # leaving `deltas` unfinished cancels the request on the workers
    await response.write_eof()
    return response


async def _send_events(response: web.StreamResponse, delta: Delta, deltas, shape: Shape, job: Job,
                       include_usage: bool) -> None:
    """The stream's chunks from `delta` on, the usage (when asked for) and [DONE]."""
    completion_tokens = 0
    if shape.chat:
        await _send(response, shape.chunk("", None, include_usage, role=True))
    while True:
        completion_tokens += len(delta.token_ids)
        if delta.text or delta.finish_reason:
            await _send(response, shape.chunk(delta.text, delta.finish_reason or None, include_usage))
        if delta.finish_reason:
            break
        delta = await anext(deltas)
    if include_usage:
        await _send(response, shape.usage_chunk(len(job.prompt_token_ids), completion_tokens, job.cached_tokens))
    await _send(response, b"[DONE]")


async def _send(response: web.StreamResponse, obj: dict | bytes) -> None:
    await response.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")


# ---- operations ----
async def livez(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP. Whether it can route (`/health`) is readiness: a router
    without ready workers must be taken out of the Service, not restarted."""
    return web.json_response({"status": "alive"})


async def health(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    pools = router.pools
    route = pools.route()
    idle = pools.scaled_to_zero() if route is None and router.dispatcher.queue.accepts() else []
    if idle:   # ready: requests wait in the router while the pool scales up from zero
        return web.json_response({"status": "scaled_to_zero", "route": pools.expected_route(), "waiting_for": idle})
    if route is None:
        return web.json_response({"status": "unavailable", "reason": pools.why_not()}, status=503)
    return web.json_response({"status": "ok", "route": route})


async def metrics_text(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ROUTER].metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class PoolMembers(BaseModel):
    workers: list[str]


async def list_pools(request: web.Request) -> web.Response:
    return web.json_response(request.app[ROUTER].pools.describe())


async def put_pool(request: web.Request) -> web.Response:
    name = request.match_info["pool"]
    if name not in POOLS:
        raise APIError(404, f"pool: unknown pool {name!r}; allowed: {', '.join(POOLS)}", param="pool")
    body = parse_body(PoolMembers, await request.read())
    specs = []
    for i, entry in enumerate(body.workers):
        try:
            specs.append(WorkerSpec.parse(entry))
        except ValueError as e:
            raise APIError(400, f"workers[{i}]: {e}", param=f"workers[{i}]") from None
    pool = await request.app[ROUTER].pools.set_members(name, specs)
    return web.json_response({"pool": name} | pool.describe())

"""`phasesplit router`: the OpenAI-compatible HTTP router in front of the prompt, token and mixed pools."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from phasesplit.cli_format import HelpFormatter
from phasesplit.heap import freeze_loaded_objects
from phasesplit.logs import add_logging_flags, announce, configure_logging
from phasesplit.router.admission import AdmissionSettings
from phasesplit.router.app import ROUTER, RouterSettings, create_app
from phasesplit.router.cache_routing import POLICIES, RoutingSettings
from phasesplit.router.dispatch import MigrationPolicy
from phasesplit.router.metrics import POOLS
from phasesplit.router.pools import parse_worker_list
from phasesplit.router.tokenizer_source import TokenizerSource
from phasesplit.router.waiting import QueueSettings

log = logging.getLogger("phasesplit.router")
SHUTDOWN_SECONDS = 60.0  # on SIGTERM, streams in flight get this long to finish


# The router's bounds on waiting and slow clients: (flag, type, default, help).
LIMITS = (
    ("--queue-size", int, QueueSettings.size,
     "requests that may wait for a pool with no ready worker (0: answer 503 at once)"),
    ("--queue-timeout", float, QueueSettings.timeout,
     "seconds a request may wait for a pool with no ready worker before a 503"),
    ("--max-queue-wait", float, AdmissionSettings.max_queue_wait,
     "seconds a request may wait for room in the workers' batches before a 429"),
    ("--max-queue-length", int, AdmissionSettings.max_queue_length,
     "requests that may wait for room in the workers' batches; one more is a 429 at once"),
    ("--max-streams-per-key", int, AdmissionSettings.max_streams_per_key,
     "requests one API key may have in flight (no key set: all clients together; 0: no limit)"),
    ("--replicas", int, AdmissionSettings.replicas,
     "routers in front of the same workers: each admits its share of the workers' batch room"),
    ("--header-timeout", float, RouterSettings.header_timeout,
     "seconds a connection may take to send a request's headers, and may stay idle"),
    ("--body-timeout", float, RouterSettings.body_timeout,
     "seconds a request may take to send its body before a 408"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phasesplit router", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="model directory to read the tokenizer and config.json from (default: read "
                   "them from the first ready worker, and follow the workers when their model changes)")
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: the directory name; "
                   "required without --model)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    p.add_argument("--prompt-workers", default="", help="comma-separated host:port or dns:NAME:PORT")
    p.add_argument("--token-workers", default="", help="comma-separated host:port or dns:NAME:PORT")
    p.add_argument("--mixed-workers", default="", help="comma-separated host:port or dns:NAME:PORT")
    p.add_argument("--max-model-len", type=int, help="default: max_position_embeddings of the model's config.json")
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between worker load polls")
    p.add_argument("--dns-interval", type=float, default=5.0, help="seconds between re-resolving dns: entries")
    p.add_argument("--max-migrations", type=int, default=MigrationPolicy.max_attempts,
                   help="times a request may move to another worker once output has started (0: never)")
    p.add_argument("--stall-timeout", type=float, default=MigrationPolicy.stall_timeout,
                   help="seconds without a token, once output has started, before the worker counts as stalled")
    p.add_argument("--routing", choices=POLICIES, default=RoutingSettings.policy,
                   help="cacheAware: a prompt goes where the workers' prefix caches hold most of it, weighed against "
                   "their load; leastLoaded: join-the-shortest-queue only")
    p.add_argument("--routing-cache-threshold", type=float, default=RoutingSettings.cache_threshold,
                   help="cacheAware: the share of a prompt a worker must hold for its cache to steer the pick")
    p.add_argument("--routing-balance-slack", type=int, default=RoutingSettings.balance_slack,
                   help="cacheAware: requests in flight above the least busy worker that a cache hit may add")
    p.add_argument("--routing-local-prefill-tokens", type=int, default=RoutingSettings.local_prefill_tokens,
                   help="cacheAware: a token worker whose cache holds all of a prompt but at most this many tokens "
                   "computes them itself, with no prompt worker (conditional disaggregation; 0: never)")
    p.add_argument("--pools", help="comma-separated pools this router serves, also while they have no worker "
                   "(scaled to zero): requests wait for them (default: the pools given workers)")
    for flag, kind, default, help_text in LIMITS:
        p.add_argument(flag, type=kind, default=default, help=help_text)
    add_logging_flags(p)
    return p


def model_max_len(model_dir: Path) -> int:
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
        return int(config["max_position_embeddings"])
    except FileNotFoundError:
        raise SystemExit(f"phasesplit router: --model: {config_path} does not exist") from None
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"phasesplit router: {config_path} has no integer max_position_embeddings; "
                         "pass --max-model-len") from None


def settings_from_args(args: argparse.Namespace) -> RouterSettings:
    model_dir = Path(args.model) if args.model else None
    if model_dir is None and not args.served_model_name:
        raise SystemExit("phasesplit router: --served-model-name is required without --model")
    max_model_len = args.max_model_len or (model_max_len(model_dir) if model_dir else None)
    if max_model_len is not None and max_model_len < 2:
        raise SystemExit("phasesplit router: --max-model-len must be at least 2")
    if args.max_migrations < 0 or not args.stall_timeout > 0:
        raise SystemExit("phasesplit router: --max-migrations must be >= 0 and --stall-timeout > 0 seconds")
    if args.queue_size < 0 or not args.queue_timeout > 0:
        raise SystemExit("phasesplit router: --queue-size must be >= 0 and --queue-timeout > 0 seconds")
    if args.max_queue_length < 0 or args.max_streams_per_key < 0 or not args.max_queue_wait > 0:
        raise SystemExit("phasesplit router: --max-queue-length and --max-streams-per-key must be >= 0 and "
                         "--max-queue-wait > 0 seconds")
    if args.replicas < 1:
        raise SystemExit(f"phasesplit router: --replicas must be >= 1, got {args.replicas}")
    if not (args.header_timeout > 0 and args.body_timeout > 0):
        raise SystemExit("phasesplit router: --header-timeout and --body-timeout must be > 0 seconds")
    if (not 0 <= args.routing_cache_threshold <= 1 or args.routing_balance_slack < 0
            or args.routing_local_prefill_tokens < 0):
        raise SystemExit("phasesplit router: --routing-cache-threshold must be in [0, 1], --routing-balance-slack "
                         "and --routing-local-prefill-tokens >= 0")
    served = tuple(p.strip() for p in args.pools.split(",") if p.strip()) if args.pools is not None else None
    if served is not None and (unknown := set(served) - set(POOLS)):
        raise SystemExit(f"phasesplit router: --pools: unknown pool {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(POOLS)}")
    try:
        workers = {"prompt": parse_worker_list(args.prompt_workers), "token": parse_worker_list(args.token_workers),
                   "mixed": parse_worker_list(args.mixed_workers)}
    except ValueError as e:
        raise SystemExit(f"phasesplit router: {e}") from None
    return RouterSettings(served_model_name=args.served_model_name or model_dir.resolve().name,
                          max_model_len=max_model_len, api_key=os.environ.get("PHASESPLIT_API_KEY") or None,
                          admin_token=os.environ.get("PHASESPLIT_ADMIN_TOKEN") or None,
                          workers=workers, poll_interval=args.poll_interval, dns_interval=args.dns_interval,
                          migration=MigrationPolicy(args.max_migrations, args.stall_timeout),
                          queue=QueueSettings(args.queue_size, args.queue_timeout),
                          admission=AdmissionSettings(args.max_queue_wait, args.max_queue_length,
                                                      args.max_streams_per_key, args.replicas),
                          routing=RoutingSettings(args.routing, args.routing_cache_threshold,
                                                  args.routing_balance_slack, args.routing_local_prefill_tokens),
                          pools=served, header_timeout=args.header_timeout, body_timeout=args.body_timeout)


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serves `app`; a client that disconnects cancels its handler (and so its request on the workers). The
    keep-alive timer runs from a connection's start until its request's headers are in, and again after each
    response: a client sending its headers slowly is cut off at the header timeout."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS,
                           keepalive_timeout=app[ROUTER].settings.header_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


async def serve(settings: RouterSettings, tokenizers: TokenizerSource, host: str, port: int) -> None:
    runner, bound = await start_server(create_app(settings, tokenizers), host, port)
    freeze_loaded_objects()
    announce(f"phasesplit router serving {settings.served_model_name!r} on http://{host}:{bound}/v1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args, "router")
    settings = settings_from_args(args)
    tokenizers = TokenizerSource.from_dir(args.model) if args.model else TokenizerSource()
    asyncio.run(serve(settings, tokenizers, args.host, args.port))
    return 0

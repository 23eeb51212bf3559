"""Who may call a worker: a per-SplitInference token, and two credentials derived from it.

The token (the operator's Secret, or one local mode makes per run) reaches every process of a
SplitInference by env: `PHASESPLIT_WORKER_TOKEN`, or a file named by `PHASESPLIT_WORKER_TOKEN_FILE`;
never on a command line. Callers send a credential, not the token: HMAC(token, "router") or
HMAC(token, "prompt-worker"), in the `phasesplit-credential` metadata of every call. A worker's
`grpc_auth.Guard` checks it in constant time and lets each caller reach only the methods it needs.
The health service answers anyone (kubelet probes). A worker with no token takes every call, as a
hand-started `phasesplit worker` always did, and says so in its log. Free of grpc: local mode and
the operator import it.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import pathlib
import secrets
from dataclasses import dataclass

TOKEN_ENV = "PHASESPLIT_WORKER_TOKEN"
TOKEN_FILE_ENV = "PHASESPLIT_WORKER_TOKEN_FILE"
HEADER = "phasesplit-credential"
ROUTER, PROMPT_WORKER, ANYONE = "router", "prompt-worker", "anyone"

_V1 = "/phasesplit.v1."
ALLOWED = {
    ROUTER: frozenset(_V1 + m for m in ("PromptWorker/Prefill", "TokenWorker/Generate", "Worker/Abort",
                                        "Worker/Load", "Worker/Info", "Worker/TokenizerFiles")),
    # Abort: a prompt worker frees the KV it pushed for a request that ended at its first token.
    PROMPT_WORKER: frozenset(_V1 + m for m in ("TokenWorker/PushKV", "KVGroup/Connect", "KVGroup/Push",
                                               "Worker/Abort")),
}
UNAUTHENTICATED_PREFIX = "/grpc.health.v1.Health/"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def worker_token() -> str | None:
    """This process's token, from its environment; None when it was given none."""
    if path := os.environ.get(TOKEN_FILE_ENV):
        return pathlib.Path(path).read_text().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def credential(token: str, caller: str) -> str:
    return hmac.new(token.encode(), caller.encode(), hashlib.sha256).hexdigest()


def call_metadata(caller: str, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata `caller` sends with every call (none without a token)."""
    token = token or worker_token()
    return ((HEADER, credential(token, caller)),) if token else ()


@dataclass(frozen=True, slots=True)
class Caller:
    role: str   # ROUTER, PROMPT_WORKER, or ANYONE (a worker without a token)
    peer: str   # the caller's host, as gRPC saw it


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("phasesplit_caller", default=None)


def current_caller() -> Caller | None:
    """Inside a worker's RPC handler: who called (None outside one, or on a server without a Guard)."""
    return CALLER.get()

"""The worker's side of `phasesplit.auth` over gRPC: `Guard`, the server interceptor, and the clients'
`Credential` interceptor for sync channels (the router's aio calls pass `auth.call_metadata` themselves)."""

from __future__ import annotations

import collections
import hmac

import grpc

from phasesplit.auth import ALLOWED, ANYONE, CALLER, HEADER, UNAUTHENTICATED_PREFIX, Caller, call_metadata, credential


class Guard(grpc.ServerInterceptor):
    """The worker's server interceptor: checks the credential, refuses what the caller may not call."""

    def __init__(self, token: str | None):
        self.credentials = {caller: credential(token, caller).encode() for caller in ALLOWED} if token else {}

    def intercept_service(self, continuation, details):
        method = details.method
        if method.startswith(UNAUTHENTICATED_PREFIX):
            return continuation(details)
        role = self._role(dict(details.invocation_metadata or ()).get(HEADER))
        if role is None:
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, f"{method}: a valid {HEADER} is required")
        if role != ANYONE and method not in ALLOWED[role]:
            return _refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method}: not allowed to the {role} credential")
        handler = continuation(details)
        return None if handler is None else _as_caller(handler, role)

    def _role(self, sent: str | None) -> str | None:
        if not self.credentials:
            return ANYONE
        sent_bytes = (sent or "").encode()
        found = None
        for role, expected in self.credentials.items():  # every one compared: the time says nothing
            if hmac.compare_digest(sent_bytes, expected):
                found = role
        return found


def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def refuse(request, context):
        context.abort(code, message)
    return grpc.unary_unary_rpc_method_handler(refuse)


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _as_caller(handler, role: str):
    """`handler`, with `current_caller()` set for its behaviour (same contextvars context as the RPC)."""
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return handler._replace(**{kind: _with_caller(behavior, role)})
    return handler


def _with_caller(behavior, role: str):
    def run(request, context):
        CALLER.set(Caller(role, peer_host(context.peer())))
        return behavior(request, context)
    return run


def peer_host(peer: str) -> str:
    """"ipv4:10.0.0.7:40312" -> "10.0.0.7"; "ipv6:[::1]:40312" -> "::1"."""
    address = peer.split(":", 1)[1] if ":" in peer else peer
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class Credential(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the caller's credential to every call on a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, d) -> _Details:
        return _Details(d.method, d.timeout, (*(d.metadata or ()), *self.metadata), d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def authenticated(channel: grpc.Channel, caller: str) -> grpc.Channel:
    """`channel`, sending `caller`'s credential on every call (unchanged without a token)."""
    metadata = call_metadata(caller)
    return grpc.intercept_channel(channel, Credential(metadata)) if metadata else channel

"""Conventions of the workers' gRPC API that `worker.proto` cannot express."""

# Trailing metadata of a failed Prefill whose cause is the token worker (unreachable, full, timed
# out, ...), not the prompt worker; the value is the token worker's address. The router retries
# such a request, which has produced nothing yet, with another token worker.
KV_PEER_FAILED = "phasesplit-kv-peer-failed"

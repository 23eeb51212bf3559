"""The KV backends by name (`--kv-backend`, the spec's `kvTransfer.backend`): the one list that every
other place takes the names from. Free of torch and grpc, so that the spec (and the operator) can read it.
"""

# name -> ("module:sending class", "module:receiving class"); each accepts keyword options.
BACKENDS = {
    "grpc": ("grpc_kv:GrpcKVTransport", "grpc_receive:PushKVReceiver"),
    "nccl": ("nccl_kv:NcclKVTransport", "nccl_receive:NcclKVReceiver"),
    "tcp": ("tcp_kv:TcpKVTransport", "tcp_receive:TcpKVReceiver"),
}
NAMES = tuple(BACKENDS)
PUSH = "grpc"  # the default; every token worker also takes its pushes (the token service's PushKV)
TIMEOUT = 30.0  # seconds a transfer may stall (`--kv-transfer-timeout`, `kvTransfer.timeoutSeconds`)

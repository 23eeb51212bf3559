"""KV transfer throughput: the project's transport against plain loopback TCP, in the same run.

A prompt-worker-like process (this one) sends KV-shaped tensors to a token-worker-like process
(a child) twice per round: through the transport (a real KVSink writing into preallocated
caches) and as the same bytes over a plain TCP socket (`sendall` -> `recv_into` the same
preallocated caches). Every transfer is verified (CRC32C of the destination blocks against the
source). Prints GB/s of each and the ratio of medians. A third path, bare gRPC, streams the same
bytes as plain 1 MiB `bytes` messages (no header, checksum or layout: each message copied into
the caches in order): the ceiling of a Python gRPC stream on the machine, measured in the same run.

    python bench/kv_transfer.py [--gib 1] [--layers 32] [--rounds 3] [--backends grpc,tcp,gloo] [--json]

Backends: grpc, tcp (gRPC control, bytes over a pooled socket) and gloo (the nccl backend's code
path on CPU: gRPC control, tensors over a gloo process group). `--json` prints one JSON object:
for each path (`plain_tcp`, `bare_grpc` and each backend) the median GB/s, the rounds, and the
ratio to plain TCP.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import threading
import time

import torch

from phasesplit.transport import make_transport
from phasesplit.transport.base import check_layout
from phasesplit.transport.blocks import CacheDestination, byte_view
from phasesplit.transport.malloc import tune_malloc
from phasesplit.transport.wire import checksum
from phasesplit.v1 import worker_pb2 as pb

BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 8, 128


def layer_crcs(k: list[torch.Tensor], v: list[torch.Tensor]) -> list[int]:
    return [checksum((byte_view(t),)) for pair in zip(k, v) for t in pair]


def make_caches(layout: pb.KVLayout, num_blocks: int, fill: bool) -> tuple[list, list]:
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    caches = []
    for _ in range(2):
        layers = []
        for _ in range(layout.num_layers):
            t = torch.empty(shape, dtype=torch.bfloat16)
            if fill:  # random bytes, bf16 viewed as raw
                t.view(torch.int16).random_(-(1 << 15), 1 << 15)
            else:  # touch every page now, not during the transfer
                t.zero_()
            layers.append(t)
        caches.append(layers)
    return caches[0], caches[1]


class BenchSink:
    """The token worker's part: check the layout, write into preallocated caches, report on commit."""

    def __init__(self, layout, k, v):
        self.layout, self.k, self.v = layout, k, v
        self.committed = False

    def begin(self, header):
        check_layout(self.layout, header.layout)
        return BenchDestination(self)


class BenchDestination(CacheDestination):
    def __init__(self, sink: BenchSink):
        self.sink, self.block_ids, self.lock = sink, list(range(sink.k[0].shape[0])), threading.Lock()

    def cache(self, layer, kind):
        return (self.sink.k if kind == 0 else self.sink.v)[layer]

    def commit(self):
        self.sink.committed = True

    def abort(self):
        self.sink.committed = False


BARE_PUSH = "/bench.Bare/Push"


def bare_grpc_handler(k, v, sink: BenchSink):
    """bench.Bare/Push: raw messages written into the caches back to back."""
    import grpc

    def push(request_iterator, context):
        views = iter([byte_view(t) for pair in zip(k, v) for t in pair])
        view, pos = next(views), 0
        for message in request_iterator:
            if pos == len(view):
                view, pos = next(views), 0
            view[pos:pos + len(message)] = message
            pos += len(message)
        sink.committed = True
        return b""

    return grpc.method_handlers_generic_handler("bench.Bare", {"Push": grpc.stream_unary_rpc_method_handler(push)})


def bare_grpc_send(port: int, k, v, chunk: int) -> float:
    import grpc

    from phasesplit.transport.channels import CHANNEL_OPTIONS

    def messages():
        for pair in zip(k, v):
            for t in pair:
                view = byte_view(t)
                for pos in range(0, len(view), chunk):
                    yield bytes(view[pos:pos + chunk])

    start = time.perf_counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
        channel.stream_unary(BARE_PUSH)(messages(), timeout=60)
    return time.perf_counter() - start


def token_worker(layout_bytes: bytes, num_blocks: int, conn, backends: tuple[str, ...]) -> None:
    """The receiving process: a gRPC server with the KV sink, and a plain TCP listener."""
    from concurrent import futures

    import grpc

    from phasesplit.transport import make_receiver
    from phasesplit.transport.channels import SERVER_OPTIONS

    tune_malloc()
    layout = pb.KVLayout.FromString(layout_bytes)
    k, v = make_caches(layout, num_blocks, fill=False)
    sink = BenchSink(layout, k, v)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    make_receiver("grpc", sink, layout=layout, timeout=60).add_to_server(server)
    server.add_generic_rpc_handlers((bare_grpc_handler(k, v, sink),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports = {"grpc": grpc_port, "bare_grpc": grpc_port}
    servers, receivers = [server], []
    for name in backends:  # the KVGroup control service of each per-pair backend, on a server of its own
        if name == "grpc":
            continue
        receivers.append(make_receiver({"gloo": "nccl"}.get(name, name), sink, layout=layout, timeout=60))
        servers.append(grpc.server(futures.ThreadPoolExecutor(max_workers=4)))
        receivers[-1].add_to_server(servers[-1])
        ports[name] = servers[-1].add_insecure_port("127.0.0.1:0")
        servers[-1].start()
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(ports | {"plain_tcp": listener.getsockname()[1]})
    cpu = cpu_seconds()
    while (command := conn.recv()) != "stop":
        if command == "plain_tcp":
            cpu = cpu_seconds()
            tcp_receive(listener, k, v)
        used = cpu_seconds() - cpu  # the transfer's receiving work
        done = command == "plain_tcp" or sink.committed
        crcs = layer_crcs(k, v) if done else None
        for t in k + v:  # the next round must write every byte again
            t.zero_()
        sink.committed = False
        cpu = cpu_seconds()
        conn.send((command, crcs, used))
    listener.close()
    for grpc_server in servers:
        grpc_server.stop(None).wait()
    for receiver in receivers:
        receiver.close()


def cpu_seconds() -> float:
    """CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tcp_receive(listener: socket.socket, k, v) -> None:
    peer, _ = listener.accept()
    with peer:
        for pair in zip(k, v):
            for t in pair:
                view, got = byte_view(t), 0
                while got < len(view):
                    n = peer.recv_into(view[got:])
                    if not n:
                        raise ConnectionError("sender closed early")
                    got += n
        peer.sendall(b"\x01")


def tcp_send(port: int, k, v) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for pair in zip(k, v):
            for t in pair:
                s.sendall(byte_view(t))
        if s.recv(1) != b"\x01":
            raise ConnectionError("no acknowledgement")
    return time.perf_counter() - start


def transport_send(transport, port: int, header: pb.KVHeader, k, v) -> float:
    start = time.perf_counter()
    sender = transport.open(f"127.0.0.1:{port}", header)
    for layer, (kl, vl) in enumerate(zip(k, v)):
        sender.send_layer(layer, kl, vl)
    sender.finish()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="KV bytes per transfer, GiB")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--backends", default="grpc,tcp,gloo",
                        help="comma separated: grpc, tcp, gloo (the nccl backend on CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    backends = tuple(args.backends.split(","))
    if unknown := set(backends) - {"grpc", "tcp", "gloo"}:
        parser.error(f"--backends: unknown {sorted(unknown)}; allowed: grpc, tcp, gloo")

    tune_malloc()
    block_bytes = BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2
    num_blocks = max(1, int(args.gib * (1 << 30)) // (2 * args.layers * block_bytes))
    total = 2 * args.layers * num_blocks * block_bytes
    layout = pb.KVLayout(model="bench", dtype="bfloat16", num_layers=args.layers, num_kv_heads=KV_HEADS,
                         head_dim=HEAD_DIM, block_size=BLOCK_SIZE)
    header = pb.KVHeader(request_id="bench", layout=layout, prompt_token_ids=[1] * (num_blocks * BLOCK_SIZE))
    k, v = make_caches(layout, num_blocks, fill=True)
    expected = layer_crcs(k, v)

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=token_worker, args=(layout.SerializeToString(), num_blocks, child_conn, backends))
    child.start()
    ports = conn.recv()
    transports = {name: make_transport("grpc", chunk_bytes=args.chunk_kib << 10, timeout=60) if name == "grpc"
                  else make_transport({"gloo": "nccl"}.get(name, name), device="cpu", timeout=60) for name in backends}
    sends = {"plain_tcp": lambda: tcp_send(ports["plain_tcp"], k, v),
             "bare_grpc": lambda: bare_grpc_send(ports["bare_grpc"], k, v, args.chunk_kib << 10)}
    for name, transport in transports.items():
        sends[name] = lambda t=transport, port=ports[name]: transport_send(t, port, header, k, v)
    times: dict[str, list[float]] = {name: [] for name in sends}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in sends}  # sender, receiver
    try:
        for _ in range(args.rounds):
            for name, send in sends.items():
                if name == "plain_tcp":
                    conn.send(name)  # the receiver waits on its listener
                start = cpu_seconds()
                times[name].append(send())
                sender_cpu = cpu_seconds() - start
                if name != "plain_tcp":
                    conn.send(name)
                cpu[name].append((sender_cpu, _check(conn.recv(), name, expected)))
    finally:
        for transport in transports.values():
            transport.close()
    conn.send("stop")
    child.join(30)

    rates = {name: [total / t / 1e9 for t in ts] for name, ts in times.items()}
    base = statistics.median(rates["plain_tcp"])
    report = {name: {"gbps": round(statistics.median(rs), 3), "ratio_to_plain_tcp": round(statistics.median(rs) / base, 3),
                     "rounds_gbps": [round(r, 3) for r in rs],
                     "cpu_s_per_gib": [round(statistics.median(side) / (total / 2**30), 3) for side in zip(*cpu[name])]}
              for name, rs in rates.items()}
    setting = {"gib": round(total / 2**30, 3), "layers": args.layers, "blocks": num_blocks, "rounds": args.rounds,
               "chunk_kib": args.chunk_kib, "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
               "verified": True}
    if args.json:
        print(json.dumps({"setting": setting, **report}))
        return 0
    print(f"{total / 2**30:.2f} GiB per transfer: {args.layers} layers x K,V x {num_blocks} blocks of bfloat16 "
          f"[{BLOCK_SIZE}, {KV_HEADS}, {HEAD_DIM}], {args.rounds} rounds, load average {setting['load_average']}")
    for name, row in report.items():
        print(f"{name:>9}: median {row['gbps']:.2f} GB/s = {row['ratio_to_plain_tcp']:.2f} x plain TCP "
              f"(rounds: {', '.join(f'{r:.2f}' for r in row['rounds_gbps'])}); "
              f"CPU s/GiB: sender {row['cpu_s_per_gib'][0]:.2f}, receiver {row['cpu_s_per_gib'][1]:.2f}")
    print("targets: tcp >= 0.9, grpc >= 0.7 of plain TCP; all transfers verified")
    return 0


def _check(reply, path: str, expected: list[int]) -> float:
    """Fail unless the receiver holds the sent bytes; the receiver's CPU seconds."""
    name, crcs, receiver_cpu = reply
    if name != path or crcs != expected:
        raise SystemExit(f"{path}: received bytes differ from the sent bytes")
    return receiver_cpu


if __name__ == "__main__":
    raise SystemExit(main())

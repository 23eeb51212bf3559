"""A 2-rank torch.distributed process group per prompt/token worker pair, and the frames sent over it.

The token worker hosts a TCPStore (rank 0); each pair gets a standalone ProcessGroupNCCL (CUDA
caches) or ProcessGroupGloo (CPU caches) over a PrefixStore named by its group id, never the
default global group. Every wait has a deadline: a peer that dies or hangs makes the wait raise
`GroupBroken`, and a broken group is discarded (the next transfer builds a new one).

Over the group, the prompt worker (rank 1) sends to the token worker (rank 0) a stream of frames:
a meta tensor `[transfer_id, layer, first block, num_blocks, op]`, followed for DATA frames by two
tensors `[num_blocks, block_size, kv_heads, head_dim]` in the layout's dtype, K then V (a layer
whole, or a piece of it when the prefill was chunked). Several frames may
be in flight (`isend`); the receiver posts the next meta receive before it stores a layer.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time

import numpy
import torch
import torch.distributed as dist

from phasesplit.transport import blocks
from phasesplit.transport.base import TransferError

TOKEN_RANK, PROMPT_RANK = 0, 1
DATA, ABORT, CLOSE = 0, 1, 2  # frame ops
META_LEN = 5
GROUP_GONE = "group_id: no KV group"  # how a token worker refuses a Push for a group it does not have
_TAG = 0


class GroupBroken(TransferError):
    """The pair's process group failed (peer gone, timeout); it must be discarded."""


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for KV caches on `device`: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_address_towards(host: str) -> str:
    """The local IP address this machine uses to reach `host` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def host_store(port: int, timeout: float, host: str = "") -> tuple[dist.TCPStore, socket.socket | None]:
    """The token worker's rendezvous store (port 0: any free port), listening on `host` (the worker's --host;
    every interface when it is "" or a wildcard), and the listening socket it was given (keep it open)."""
    if is_wildcard(host):
        return dist.TCPStore("0.0.0.0", port, None, True, datetime.timedelta(seconds=timeout),
                             wait_for_workers=False), None
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        store = dist.TCPStore(host, sock.getsockname()[1], None, True, datetime.timedelta(seconds=timeout),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    return store, sock


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def connect_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout))
    except (RuntimeError, dist.DistError) as exc:
        raise GroupBroken(f"cannot reach the KV rendezvous store at {host}:{port}: {exc}") from exc


def make_group(backend: str, store: dist.Store, group_id: str, rank: int, bind_host: str,
               timeout: float) -> dist.ProcessGroup:
    """This side of the pair's group; blocks until the peer joins (at most `timeout` seconds)."""
    prefixed = dist.PrefixStore(f"phasesplit/kv/{group_id}/", store)
    delta = datetime.timedelta(seconds=timeout)
    try:
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = delta
            return dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        if backend != "gloo":
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = delta
        ifname = os.environ.get("GLOO_SOCKET_IFNAME")
        device = (dist.ProcessGroupGloo.create_device(interface=ifname) if ifname
                  else dist.ProcessGroupGloo.create_device(hostname=bind_host))
        opts._devices = [device]
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    except (RuntimeError, dist.DistError) as exc:
        raise GroupBroken(f"KV process group {group_id} ({backend}) was not formed: {exc}") from exc


def discard(group: dist.ProcessGroup | None) -> None:
    """Tear a group down without waiting on its peer."""
    if group is None:
        return
    for method in ("abort", "shutdown"):
        fn = getattr(group, method, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:  # noqa: BLE001 - a broken group may refuse; it is dropped anyway
                continue


def wait(work, timeout: float, what: str, cuda: bool = False) -> None:
    """Wait for one send/recv; raise GroupBroken on error or after `timeout` seconds."""
    try:
        if cuda:
            _poll(work, timeout, what)
        else:
            work.wait(datetime.timedelta(seconds=timeout))
    except GroupBroken:
        raise
    except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError and DistError subclasses
        raise GroupBroken(f"{what} failed: {exc}") from exc


def _poll(work, timeout: float, what: str) -> None:
    # NCCL work.wait() only orders streams; poll for completion to keep a deadline on the host.
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise GroupBroken(f"{what}: no completion within {timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    work.wait()
    torch.cuda.current_stream().synchronize()


def isend(group: dist.ProcessGroup, tensor: torch.Tensor, peer: int, what: str):
    """Start sending `tensor`; the returned work must be waited on (see `wait`) before it is reused."""
    try:
        return group.send([tensor], peer, _TAG)
    except Exception as exc:  # noqa: BLE001 - a group whose peer is gone refuses new work
        raise GroupBroken(f"{what} failed: {exc}") from exc


def irecv(group: dist.ProcessGroup, tensor: torch.Tensor, peer: int, what: str):
    """Start receiving into `tensor`; frames of one tag arrive in the order they were sent."""
    try:
        return group.recv([tensor], peer, _TAG)
    except Exception as exc:  # noqa: BLE001 - a group whose peer is gone refuses new work
        raise GroupBroken(f"{what} failed: {exc}") from exc


def send(group: dist.ProcessGroup, tensor: torch.Tensor, peer: int, timeout: float, what: str) -> None:
    wait(isend(group, tensor, peer, what), timeout, what, cuda=tensor.device.type == "cuda")


def recv(group: dist.ProcessGroup, tensor: torch.Tensor, peer: int, timeout: float, what: str) -> None:
    wait(irecv(group, tensor, peer, what), timeout, what, cuda=tensor.device.type == "cuda")


def meta(transfer_id: int, layer: int, first: int, num_blocks: int, op: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([transfer_id, layer, first, num_blocks, op], dtype=torch.int64, device=device)


def frame_shape(layout, num_blocks: int) -> tuple[int, ...]:
    """K and V of one layer, received as two messages into the two halves."""
    return (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)


class Buffers:
    """Reused, already-touched frame buffers, one per slot: fresh large tensors page-fault on every frame."""

    def __init__(self, slots: int, dtype: torch.dtype, device: torch.device):
        self._flat: list[torch.Tensor | None] = [None] * slots
        self._dtype, self._device = dtype, device

    def get(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        flat = self._flat[slot]
        if flat is None or flat.numel() < numel:
            flat = self._flat[slot] = torch.zeros(numel, dtype=self._dtype, device=self._device)
        return flat[:numel].view(shape)


def gather(dst: torch.Tensor, cache: torch.Tensor, ids: list[int]) -> None:
    """dst[i] = cache[ids[i]]. On CPU one memcpy per run of consecutive ids, on this thread only: torch's
    copy kernels would fork onto the intra-op pool, which the engine's thread is using."""
    if cache.device.type != "cpu" or not cache.is_contiguous():
        torch.index_select(cache, 0, torch.tensor(ids, device=cache.device), out=dst)
        return
    out, src = _bytes(dst), _bytes(cache)
    for offset, first, n in blocks.runs(ids):
        numpy.copyto(out[offset:offset + n], src[first:first + n])


def one_run(ids: list[int]) -> int | None:
    """The first id when `ids` are consecutive (the blocks are one slice of the cache), else None."""
    return ids[0] if ids and ids == list(range(ids[0], ids[0] + len(ids))) else None


def _bytes(t: torch.Tensor) -> numpy.ndarray:
    """[blocks, ...] as a numpy array of [blocks, block bytes] (bfloat16 has no numpy dtype)."""
    return t.view(torch.uint8).numpy().reshape(t.shape[0], -1)

"""`Worker.Abort` sent to other workers (a prompt worker telling the token worker that a request is
over), without waiting for the answer. One channel per address, kept until close()."""

from __future__ import annotations

import logging

import grpc

from phasesplit.transport.channels import Channels
from phasesplit.v1 import worker_pb2 as pb
from phasesplit.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class RemoteAborts:
    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout
        self._channels = Channels(options=())

    def send(self, address: str, request_id: str) -> grpc.Future:
        call = pb_grpc.WorkerStub(self._channels.get(address)).Abort.future(
            pb.AbortRequest(request_id=request_id), timeout=self.timeout)
        call.add_done_callback(lambda f: _log_failure(f, address, request_id))
        return call

    def close(self) -> None:
        self._channels.close()


def _log_failure(call: grpc.Future, address: str, request_id: str) -> None:
    if not call.cancelled() and call.exception() is not None:
        log.warning("abort of %s on %s failed: %s", request_id, address, call.exception())

"""gRPC channels to other workers, one per address, kept until close(); every call on them carries the
prompt-worker credential (`phasesplit.auth`): the only worker-to-worker calls are a prompt worker's."""

from __future__ import annotations

import threading

import grpc

from phasesplit import auth
from phasesplit.grpc_auth import authenticated

MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES))
SERVER_OPTIONS = CHANNEL_OPTIONS  # pass to grpc.server(options=...) on a token worker


class Channels:
    def __init__(self, options=CHANNEL_OPTIONS):
        self._options = options
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, addr: str) -> grpc.Channel:
        with self._lock:
            if addr not in self._channels:
                self._channels[addr] = authenticated(grpc.insecure_channel(addr, options=self._options),
                                                     auth.PROMPT_WORKER)
            return self._channels[addr]

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

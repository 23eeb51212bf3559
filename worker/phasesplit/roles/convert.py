"""Proto messages -> engine objects: the sampling parameters (the KV handoff maps itself: `KVHandoff`)."""

from __future__ import annotations

from phasesplit.engine.sampler import SamplingParams
from phasesplit.v1 import worker_pb2 as pb


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the bad field. proto3 cannot tell an unset top_p from 0: 0 means 1."""
    return SamplingParams(
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p else 1.0,
        top_k=int(msg.top_k),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        max_tokens=int(msg.max_tokens),
        stop=tuple(msg.stop),
        ignore_eos=bool(msg.ignore_eos),
        cache_salt=msg.cache_salt if msg.HasField("cache_salt") else None,
    )

"""Proto messages <-> engine objects: sampling parameters and the KV handoff."""

from __future__ import annotations

from phasesplit.engine.engine import KVExport
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
    )


def kv_header(export: KVExport, layout) -> pb.KVHeader:
    """The KV transfer's header: `export` without its blocks (the receiver reserves its own), with the layout."""
    header = pb.KVHeader(request_id=export.request_id, layout=layout.to_proto(),
                         prompt_token_ids=export.prompt_token_ids)
    if export.first_token is not None:
        header.first_token = export.first_token
    return header


def kv_export(header: pb.KVHeader, block_ids: list[int]) -> KVExport:
    """The KV a header announces, held in `block_ids`."""
    first = header.first_token if header.HasField("first_token") else None
    return KVExport(header.request_id, list(header.prompt_token_ids), first, block_ids)

"""`KVHandoff`: what the prompt worker hands the token worker with a request's prompt KV, mapped 1:1
onto phasesplit.v1.KVHeader (the first message of every KV transfer). The blocks themselves are not
part of it: each side keeps the request's KV in blocks of its own cache."""

from __future__ import annotations

import dataclasses

from phasesplit.prefix_hash import block_hashes
from phasesplit.transport.layout import KVLayout
from phasesplit.v1 import worker_pb2 as pb


@dataclasses.dataclass(frozen=True, slots=True)
class KVHandoff:
    request_id: str
    prompt_token_ids: list[int]
    layout: KVLayout  # the sending rank's
    first_token: int | None = None  # None while the prefill still runs (a layer-wise transfer opens first)
    block_hashes: list[int] = dataclasses.field(default_factory=list)  # one per full prompt block (prefix_hash)
    num_cached_blocks: int = 0  # leading blocks the receiver already holds, which do not move; 0 today

    @classmethod
    def of_prompt(cls, request_id: str, prompt_token_ids: list[int], layout: KVLayout, cache_salt: str | None = None,
                  first_token: int | None = None) -> KVHandoff:
        """The handoff of a prompt, with the prefix-cache hashes of its full blocks (as its engine keys them)."""
        return cls(request_id, list(prompt_token_ids), layout, first_token,
                   block_hashes(prompt_token_ids, layout.block_size, cache_salt))

    def to_proto(self) -> pb.KVHeader:
        header = pb.KVHeader(request_id=self.request_id, layout=self.layout.to_proto(),
                             prompt_token_ids=self.prompt_token_ids, block_hashes=self.block_hashes,
                             num_cached_blocks=self.num_cached_blocks)
        if self.first_token is not None:
            header.first_token = self.first_token
        return header

    @classmethod
    def from_proto(cls, header: pb.KVHeader) -> KVHandoff:
        return cls(header.request_id, list(header.prompt_token_ids), KVLayout.from_proto(header.layout),
                   header.first_token if header.HasField("first_token") else None,
                   list(header.block_hashes), header.num_cached_blocks)

    @property
    def num_blocks(self) -> int:
        """The blocks the prompt's KV fills: what a transfer moves per layer."""
        return -(-len(self.prompt_token_ids) // self.layout.block_size)

    def with_first_token(self, first_token: int | None) -> KVHandoff:
        """The Generate call's first token where it brings one (a layer-wise transfer's header has none)."""
        return self if first_token is None else dataclasses.replace(self, first_token=first_token)

    def for_rank(self, rank: int) -> KVHandoff:
        """The same handoff of tensor-parallel rank `rank`'s shard."""
        return dataclasses.replace(self, layout=dataclasses.replace(self.layout, tensor_parallel_rank=rank))

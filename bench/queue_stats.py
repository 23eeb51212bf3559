"""What counting a worker's waiting queue costs the engine thread after every step: the prompt tokens
still to compute, less each waiting prompt's cached prefix (the autoscaler's queueTokens and the
router's routing read it). The block manager's count goes on from where its last walk stopped; the
baseline, measured in the same run, walks every prompt's cached prefix again (`cached_prefix`).

The queue: N waiting prompts of 4,096 tokens whose first 4,000 tokens are cached (an agent's shared
preamble), 16-token blocks.

    python bench/queue_stats.py [--waiting 500] [--rounds 50]
"""

import argparse
import time

from phasesplit.engine.block_manager import BlockManager
from phasesplit.engine.sampler import SamplingParams
from phasesplit.engine.sequence import Sequence

BLOCK, PREAMBLE, PROMPT = 16, 4000, 4096


def queue(waiting: int) -> tuple[BlockManager, list[Sequence]]:
    manager = BlockManager(4 * PROMPT // BLOCK, BLOCK, prefix_caching=True)
    preamble = list(range(PREAMBLE))
    first = Sequence("first", preamble + [0] * (PROMPT - PREAMBLE), SamplingParams())
    manager.allocate(first)
    first.num_cached_tokens = first.num_tokens
    manager.cache_full_blocks(first)
    manager.deallocate(first)
    seqs = [Sequence(f"r{i}", preamble + [i] * (PROMPT - PREAMBLE), SamplingParams()) for i in range(waiting)]
    for seq in seqs:
        manager.hashes(seq)   # hashed once either way (at the first count, or at admission)
    return manager, seqs


def per_count(count, seqs: list[Sequence], rounds: int) -> tuple[float, int]:
    tokens = sum(seq.num_tokens - count(seq) for seq in seqs)
    start = time.perf_counter()
    for _ in range(rounds):
        sum(seq.num_tokens - count(seq) for seq in seqs)
    return (time.perf_counter() - start) / rounds, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waiting", type=int, default=500, help="prompts waiting")
    p.add_argument("--rounds", type=int, default=50, help="counts timed (one per step)")
    args = p.parse_args()
    manager, seqs = queue(args.waiting)
    walked, walked_tokens = per_count(lambda seq: len(manager.cached_prefix(seq)) * BLOCK, seqs, args.rounds)
    kept, kept_tokens = per_count(manager.num_cached_prefix_tokens, seqs, args.rounds)
    assert walked_tokens == kept_tokens, (walked_tokens, kept_tokens)
    print(f"{args.waiting} waiting prompts ({walked_tokens} tokens to compute): walked again {walked * 1e3:.2f} ms "
          f"per count, walked on {kept * 1e3:.3f} ms; ratio {kept / walked:.3f}")


if __name__ == "__main__":
    main()

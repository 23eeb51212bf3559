"""Prefix caching across the split: cacheAware routing against leastLoaded against caching off, in one run.

Replays multi-turn conversations from the Mooncake conversation trace at small scale: the trace's
turns are chained into conversations (a turn continues the one whose blocks it starts with), each
hash id becomes its own random block of `--block-tokens` tokens (the trace's are 512), outputs are
scaled by the same factor. The first `--conversations` conversations of at least `--turns` turns run
concurrently, each sending its next turn once the previous one answered (closed loop), through the
official `openai` client (streamed completions of token ids, under one `cache_salt` per run) against
real local-mode processes: P prompt + T token workers, three times (cacheAware; leastLoaded; leastLoaded
with `prefixCaching: false`). Prints TTFT P50/P90 (all turns, and turns after the first), the prompt
tokens computed, those reported cached (also as a share of the cacheable ones: the leading blocks an
earlier turn of the conversation had), and the KV bytes the prompt workers sent.

    python bench/prefix.py [--preset tiny|small] [--conversations 8] [--turns 5] [--block-tokens 16]
                           [--prompt-workers 2] [--token-workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import openai
from prometheus_client.parser import text_string_to_metric_families

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.fleet.trace import HASH_BLOCK_TOKENS, load_trace
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.plan import build_plan, validate_manifest
from phasesplit.local.processes import free_port
from phasesplit.tiny_model import make_tiny_model

MAX_MODEL_LEN = 2048
ENGINE_BLOCK = 16   # the workers' KV block size (the engine's default)
MODES = {"cacheAware": ("cacheAware", True), "leastLoaded": ("leastLoaded", True),
         "caching off": ("leastLoaded", False)}


@dataclass
class Turn:
    conversation: int
    turn: int
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    cacheable_tokens: int   # the prompt's leading blocks an earlier turn of its conversation had


def conversations(count: int, turns: int, max_blocks: int) -> list[list[tuple[tuple[int, ...], int]]]:
    """The first `count` conversations of the Mooncake conversation trace with at least `turns` turns that
    fit in `max_blocks` blocks: each a list of (hash ids, output tokens) turns."""
    trace = load_trace("mooncake-conv")
    index: dict[tuple[int, ...], int] = {}
    chains: list[list[int]] = []
    done: list[list[int]] = []
    for i, blocks in enumerate(trace.blocks):
        chain = _continued(blocks, index, chains, trace.blocks)
        if chain is None:
            chain = len(chains)
            chains.append([])
        chains[chain].append(i)
        for k in range(3, len(blocks) + 1):   # past the system prompt's blocks every conversation shares
            index[tuple(blocks[:k])] = chain
        if len(chains[chain]) == turns and len(blocks) <= max_blocks:
            done.append(list(chains[chain]))
            if len(done) == count:
                return [[(trace.blocks[j], int(trace.output[j])) for j in c] for c in done]
    raise SystemExit(f"the trace has fewer than {count} conversations of {turns} turns within {max_blocks} blocks")


def _continued(blocks, index, chains, all_blocks) -> int | None:
    """The conversation whose last turn this one extends (all its blocks but the last, a partial one)."""
    for k in range(len(blocks), 2, -1):
        chain = index.get(tuple(blocks[:k]))
        if chain is not None and k >= len(all_blocks[chains[chain][-1]]) - 1:
            return chain
    return None


def block_tokens(hash_id: int, size: int, vocab: int) -> list[int]:
    rng = random.Random(hash_id)
    return [rng.randrange(3, vocab) for _ in range(size)]


def manifest(model_dir: str, pools: dict[str, int], policy: str, caching: bool) -> dict:
    engine = {"numKvBlocks": 2048, "maxNumSeqs": 64, "maxNumBatchedTokens": 2048, "prefixCaching": caching}
    return {"apiVersion": "phasesplit.io/v1alpha1", "kind": "SplitInference", "metadata": {"name": "bench"},
            "spec": {"model": {"name": "bench", "source": {"hostPath": {"path": model_dir}}, "dtype": "float32",
                               "maxModelLen": MAX_MODEL_LEN},
                     "router": {"routing": {"policy": policy}},
                     "pools": {p: {"replicas": n, "autoscaling": {"minReplicas": n, "maxReplicas": n},
                                   "engine": engine} for p, n in pools.items()}}}


async def one_turn(client: openai.AsyncOpenAI, ids: list[int], output: int, salt: str) -> tuple[float, int, int]:
    """(TTFT seconds, prompt tokens, cached tokens) of one streamed completion."""
    sent, ttft, usage = time.perf_counter(), None, None
    stream = await client.completions.create(model="bench", prompt=ids, max_tokens=output, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True, "cache_salt": salt})
    async for chunk in stream:
        if chunk.choices and ttft is None:
            ttft = time.perf_counter() - sent
        usage = chunk.usage or usage
    return ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


async def converse(base_url: str, convs, size: int, vocab: int, scale: float, salt: str) -> list[Turn]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        async def run(c: int, turns) -> list[Turn]:
            done, seen = [], set()
            for t, (blocks, output) in enumerate(turns):
                ids = [tok for h in blocks for tok in block_tokens(h, size, vocab)]
                out = max(2, min(64, round(output * scale)))
                ttft, prompt, cached = await one_turn(client, ids, out, salt)
                shared = next((k for k, h in enumerate(blocks) if h not in seen), len(blocks))
                cacheable = min(shared * size, prompt - 1) // ENGINE_BLOCK * ENGINE_BLOCK
                done.append(Turn(c, t, ttft, prompt, cached, cacheable))
                seen.update(blocks)
            return done
        results = await asyncio.gather(*(run(c, turns) for c, turns in enumerate(convs)))
    return [turn for conv in results for turn in conv]


def kv_bytes(base_url: str) -> float:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "phasesplit_kv_transfer_bytes_total")


def run_mode(name: str, model_dir: str, pools, convs, args, vocab: int, log_dir: pathlib.Path):
    policy, caching = MODES[name]
    plan = build_plan(validate_manifest(manifest(model_dir, pools, policy, caching)), model_dir, port=free_port(),
                      drain_timeout=10)
    logs = log_dir / name.replace(" ", "-")
    logs.mkdir(parents=True)
    cluster = LocalCluster(plan, logs, ready_timeout=300)
    scale = args.block_tokens / HASH_BLOCK_TOKENS
    try:
        cluster.start()
        asyncio.run(converse(cluster.base_url, [c[:1] for c in convs[:2]], args.block_tokens, vocab, scale,
                             "warm-up"))
        before = kv_bytes(cluster.base_url)
        start = time.perf_counter()
        turns = asyncio.run(converse(cluster.base_url, convs, args.block_tokens, vocab, scale, os.urandom(8).hex()))
        return turns, time.perf_counter() - start, kv_bytes(cluster.base_url) - before
    finally:
        cluster.stop(15)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def row(turns: list[Turn], seconds: float, moved: float) -> dict:
    later = [t.ttft for t in turns if t.turn > 0]
    prompt, cached = sum(t.prompt_tokens for t in turns), sum(t.cached_tokens for t in turns)
    cacheable = sum(t.cacheable_tokens for t in turns)
    return {"TTFT P50": pct([t.ttft for t in turns], 50), "TTFT P90": pct([t.ttft for t in turns], 90),
            "later P50": pct(later, 50), "later P90": pct(later, 90), "computed": prompt - cached,
            "cached": cached, "cached %": 100 * cached / prompt,
            "of cacheable %": 100 * cached / cacheable if cacheable else float("nan"),
            "KV MiB": moved / 2**20, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: write --preset to a temp dir)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per Mooncake block (the trace's: 512)")
    p.add_argument("--prompt-workers", type=int, default=2)
    p.add_argument("--token-workers", type=int, default=2)
    args = p.parse_args(argv)
    max_blocks = (MAX_MODEL_LEN - 64) // args.block_tokens
    convs = conversations(args.conversations, args.turns, max_blocks)
    pools = {"prompt": args.prompt_workers, "token": args.token_workers}
    with tempfile.TemporaryDirectory(prefix="phasesplit-prefix-bench-") as tmp:
        model = args.model or str(make_tiny_model(f"{tmp}/model", seed=0, preset=args.preset))
        vocab = Tokenizer.from_dir(model).vocab_size
        rows = {name: row(*run_mode(name, model, pools, convs, args, vocab, pathlib.Path(tmp))) for name in MODES}
    prompts = [len(turns[-1][0]) * args.block_tokens for turns in convs]
    print(f"{args.conversations} Mooncake conversations x {args.turns} turns (last prompts {min(prompts)}-"
          f"{max(prompts)} tokens, {args.block_tokens}-token blocks), {args.prompt_workers}P+{args.token_workers}T, "
          f"preset {args.preset}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    keys = list(next(iter(rows.values())))
    print(f"{'':<14}" + "".join(f"{k:>15}" for k in keys))
    for name, r in rows.items():
        print(f"{name:<14}" + "".join(f"{r[k]:>15.3f}" if isinstance(r[k], float) else f"{r[k]:>15}" for k in keys))
    off = rows["caching off"]
    for name in ("cacheAware", "leastLoaded"):
        print(f"{name} / caching off: TTFT P50 {rows[name]['TTFT P50'] / off['TTFT P50']:.2f}, "
              f"later-turn P50 {rows[name]['later P50'] / off['later P50']:.2f}, "
              f"computed tokens {rows[name]['computed'] / off['computed']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

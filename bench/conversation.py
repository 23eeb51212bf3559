"""One growing conversation through 1 prompt + 1 token worker, prefix caching on against off, in one run.

Each of --turns turns sends the whole history (every earlier prompt and answer) plus --user-tokens
new tokens, greedy, --output tokens each (the `small` preset by default: about 100M parameters),
streamed through the official `openai` client against real local-mode processes; the same
conversation runs against a cluster with `prefixCaching: true` and one with `false`, which take
turns (turn k on one, then on the other) so that both meet the same load on a shared machine.
Prints each turn's TTFT in both, the ratio, the tokens reported cached, and whether every answer
is the same text. Target (the prefix-caching issue): the last turn's TTFT at most 0.5x of caching off.

    python bench/conversation.py [--preset small] [--turns 6] [--user-tokens 250] [--output 16]
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import random
import sys
import tempfile
import time

import openai

from phasesplit.engine.tokenizer import Tokenizer
from phasesplit.local.launcher import LocalCluster
from phasesplit.local.plan import build_plan, validate_manifest
from phasesplit.local.processes import free_port
from phasesplit.tiny_model import make_tiny_model

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from prefix import manifest  # noqa: E402  (the same cluster, sizes and spec as bench/prefix.py)

TARGET = 0.5


async def turn(base_url: str, ids: list[int], output: int) -> tuple[float, list[int], int]:
    """(TTFT seconds, answer token ids, cached tokens) of one streamed completion of token ids."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        sent, ttft, usage, text = time.perf_counter(), None, None, ""
        stream = await client.completions.create(model="bench", prompt=ids, max_tokens=output, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                ttft = ttft or time.perf_counter() - sent
                text += chunk.choices[0].text
            usage = chunk.usage or usage
    return ttft, text, usage.prompt_tokens_details.cached_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: write --preset to a temp dir)")
    p.add_argument("--preset", default="small", choices=("tiny", "small"))
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-tokens", type=int, default=250, help="new tokens each turn adds")
    p.add_argument("--output", type=int, default=16, help="tokens of each answer")
    args = p.parse_args(argv)
    model_dir = args.model or str(make_tiny_model(tempfile.mkdtemp(prefix="phasesplit-bench-"), preset=args.preset))
    tokenizer = Tokenizer.from_dir(model_dir)
    rng = random.Random(0)
    logs = pathlib.Path(tempfile.mkdtemp(prefix="phasesplit-conversation-"))
    clusters = {}
    for caching in (True, False):
        plan = build_plan(validate_manifest(manifest(model_dir, {"prompt": 1, "token": 1}, "cacheAware", caching)),
                          model_dir, port=free_port(), drain_timeout=10)
        (logs / str(caching)).mkdir()
        clusters[caching] = LocalCluster(plan, logs / str(caching), ready_timeout=300)
    history = {True: [], False: []}
    rows = []
    try:
        for cluster in clusters.values():
            cluster.start()
        for k in range(args.turns):
            user = [rng.randrange(3, tokenizer.vocab_size) for _ in range(args.user_tokens)]
            result = {}
            for caching in ((True, False) if k % 2 == 0 else (False, True)):
                ids = history[caching] + user
                ttft, text, cached = asyncio.run(turn(clusters[caching].base_url, ids, args.output))
                history[caching] = ids + tokenizer.encode(text)
                result[caching] = (ttft, text, cached, len(ids))
            rows.append(result)
    finally:
        for cluster in clusters.values():
            cluster.stop(15)
    print(f"1 prompt + 1 token worker, {args.preset} preset, {args.turns} turns of {args.user_tokens} new tokens "
          f"and {args.output}-token answers (load average {open('/proc/loadavg').read().split()[0]})")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT on':>9} {'TTFT off':>9} {'ratio':>6}  same text")
    for k, r in enumerate(rows, 1):
        (on, text_on, cached, n), (off, text_off, _, _) = r[True], r[False]
        print(f"{k:>4} {n:>7} {cached:>7} {on:>8.2f}s {off:>8.2f}s {on / off:>5.2f}x  {text_on == text_off}")
    ratio = rows[-1][True][0] / rows[-1][False][0]
    same = all(r[True][1] == r[False][1] for r in rows)
    print(f"last turn TTFT with caching / without: {ratio:.2f}x (target <= {TARGET}x: "
          f"{'met' if ratio <= TARGET else 'missed'}); every answer the same text: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

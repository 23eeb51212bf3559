"""`phasesplit generate`: one-shot generation with the engine, streamed to stdout or as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from phasesplit.cli_format import HelpFormatter

if TYPE_CHECKING:  # the engine (torch) is imported only once the arguments are read
    from phasesplit.engine.engine import LLMEngine
    from phasesplit.engine.sampler import SamplingParams


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="phasesplit generate", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens "
                   "up to this total probability (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even past EOS")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over N ranks (N GPUs on cuda; N processes with gloo on cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, finish_reason")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from phasesplit.engine.config import ModelConfig
    from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
    from phasesplit.engine.parallel import check_tensor_parallel
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        config = EngineConfig(args.model, dtype=args.dtype, device=args.device, max_num_seqs=1)
        if args.tensor_parallel == 1:
            return generate(LLMEngine(config), args, params)
        from phasesplit.engine.ranks import RankGroup, run_engine_ranks
        check_tensor_parallel(ModelConfig.from_dir(args.model), args.tensor_parallel)
        group = RankGroup(args.tensor_parallel, run_engine_ranks, (config, generate, args, params), args.device)
    except (ValueError, FileNotFoundError) as exc:
        return error(exc)
    return group.start().wait()


def error(exc: Exception) -> int:
    print(f"phasesplit generate: error: {exc}", file=sys.stderr)
    return 2


def generate(engine: LLMEngine, args: argparse.Namespace, params: SamplingParams) -> int:
    try:
        engine.add_request("generate", engine.tokenizer.encode(args.prompt), params)
    except ValueError as exc:
        return error(exc)
    token_ids, text, finish_reason = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            token_ids += out.token_ids
            text.append(out.text)
            finish_reason = out.finish_reason
            if not args.json:
                print(out.text, end="", flush=True)
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": "".join(text), "finish_reason": finish_reason}), flush=True)
    else:
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a legal stop list (16 strings of 256 characters, the router's limit) costs per token, against
no stop strings, measured in the same run.

1. The matching alone: a token's text pushed and the streamable text taken (`push_text` + `take_text`),
   microseconds per token, for prose that never matches and for text that keeps matching partially.
2. The engine: another client's stream (greedy, `tiny` preset on the CPU) decoding beside requests
   that send the stop list, against the same batch without it on a second engine, a step of each in
   turn: milliseconds per step.

    python bench/stop_strings.py [--tokens 20000] [--steps 64] [--batch 8] [--rounds 4]
"""

import argparse
import random
import statistics
import string
import tempfile
import time

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.engine.sequence import Sequence, push_text, take_text
from phasesplit.tiny_model import make_tiny_model

WORDS = ["the ", "a ", "cat ", "sat ", "on ", "mat, ", "and ", "then\n", "ran "]


def legal_stops(rng: random.Random, partial: bool) -> tuple[str, ...]:
    if partial:  # all begin alike, and the text below is made of their beginnings
        return tuple("ab" * 127 + "a" + chr(ord("c") + i) for i in range(16))
    return tuple("".join(rng.choice(string.ascii_letters) for _ in range(256)) for _ in range(16))


def per_token_us(pieces: list[str], stops: tuple[str, ...]) -> float:
    seq = Sequence("r", [1], SamplingParams(stop=stops, max_tokens=len(pieces)))
    start = time.perf_counter()
    for piece in pieces:
        push_text(seq, piece)
        take_text(seq)
    return (time.perf_counter() - start) / len(pieces) * 1e6


def matching(tokens: int) -> None:
    rng = random.Random(0)
    prose = [rng.choice(WORDS) for _ in range(tokens)]
    partial = ["ab"] * tokens
    print("matching, us per token (push_text + take_text):")
    for name, pieces, stops in [("prose, no stop strings", prose, ()),
                                ("prose, 16 x 256", prose, legal_stops(rng, False)),
                                ("partial matches, no stop strings", partial, ()),
                                ("partial matches, 16 x 256", partial, legal_stops(rng, True))]:
        print(f"  {name:34} {per_token_us(pieces, stops):8.2f}")


def start(engine: LLMEngine, prompt: list[int], batch: int, steps: int, stops: tuple[str, ...]) -> None:
    """`batch` requests of `steps` decode steps each (request 0 without stop strings), prefilled."""
    for i in range(batch):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps + 1,
                                                          stop=stops if i else ()))
    engine.step()


def timed_step(engine: LLMEngine) -> float:
    start = time.perf_counter()
    engine.step()
    return (time.perf_counter() - start) * 1e3


def engine_steps(steps: int, batch: int, rounds: int) -> None:
    """Two engines on the same model, one step each in turn, so that the machine's load falls on both."""
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(tmp, seed=0, preset="tiny"))
        plain, stopping = LLMEngine(EngineConfig(model)), LLMEngine(EngineConfig(model))
        prompt = plain.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
        stops = legal_stops(random.Random(1), False)
        none, legal = [], []
        for _ in range(rounds):
            start(plain, prompt, batch, steps, ())
            start(stopping, prompt, batch, steps, stops)
            while plain.has_unfinished() or stopping.has_unfinished():
                none.append(timed_step(plain))
                legal.append(timed_step(stopping))
        print(f"engine, ms per decode step (median of {len(none)}, in turn), {batch} sequences, "
              f"request 0 sends no stop strings:")
        print(f"  the others send none {statistics.median(none):7.2f}   "
              f"the others send 16 x 256 {statistics.median(legal):7.2f}   "
              f"ratio {statistics.median(legal) / statistics.median(none):5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    matching(args.tokens)
    engine_steps(args.steps, args.batch, args.rounds)


if __name__ == "__main__":
    main()

"""Stop strings: the earliest one in the text ends it, whatever the tokens' boundaries, and the work per
token follows the characters the token added, not how many stop strings there are or how long."""

import random

import pytest

from phasesplit.engine.engine import EngineConfig, LLMEngine, SamplingParams
from phasesplit.engine.stop_strings import StopMatcher
from phasesplit.engine.stop_strings import stop_matcher as cached_stop_matcher
from phasesplit.engine.sequence import Sequence, push_text, take_text


def reference(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins (what the output is cut to)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """The longest end of `text` that begins a stop string."""
    return next((n for n in range(len(text), 0, -1) if any(s.startswith(text[-n:]) for s in stops)), 0)


def sequence(stops: tuple[str, ...]) -> Sequence:
    return Sequence("r", [1], SamplingParams(stop=stops, max_tokens=10_000))


def feed(seq: Sequence, pieces: list[str]) -> tuple[bool, list[str]]:
    """Push each piece as one token's text; (whether a stop string ended it, what streamed each time)."""
    streamed = []
    for piece in pieces:
        if push_text(seq, piece):
            return True, streamed
        streamed.append(take_text(seq))
    return False, streamed


def split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("seed", range(300))
def test_the_text_is_cut_where_the_earliest_stop_string_begins_whatever_the_token_boundaries(seed):
    rng = random.Random(seed)
    stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4)))
    text = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 30)))
    pieces = split(text, rng)
    seq = sequence(stops)
    stopped, streamed = feed(seq, pieces)

    # the first piece after which a stop string is in the text ends it, cut where the earliest one begins
    seen = ""
    for piece in pieces:
        seen += piece
        if (cut := reference(seen, stops)) is not None:
            assert stopped and seq.output_text == seen[:cut]
            break
    else:
        assert not stopped and seq.output_text == text
        assert "".join(streamed) == text[: len(text) - held_back(text, stops)]
    assert "".join(streamed) == seq.output_text[: len("".join(streamed))]  # nothing streamed is taken back


def test_a_longer_stop_string_that_begins_earlier_in_the_same_token_wins():
    seq = sequence(("cd", "abcde"))
    assert feed(seq, ["xabcdey"]) == (True, []) and seq.output_text == "x"


def test_a_stop_string_spanning_tokens_is_held_back_until_it_completes_or_breaks():
    seq = sequence(("hello world",))
    stopped, streamed = feed(seq, ["say hel", "lo wor", "ld!"])
    assert stopped and streamed == ["say ", ""] and seq.output_text == "say "
    seq = sequence(("hello world",))
    assert feed(seq, ["say hel", "lo wor", "k"]) == (False, ["say ", "", "hello work"])


class CountingList(list):
    """A list that counts its reads: the automaton's failure links, followed on mismatches."""

    reads = 0

    def __getitem__(self, index):
        CountingList.reads += 1
        return super().__getitem__(index)


def legal_worst_stops(rng: random.Random) -> tuple[str, ...]:
    """16 stop strings of 256 characters (the router's limit) that all begin alike, so that text made of
    their beginnings keeps matching partially."""
    return tuple("ab" * 127 + rng.choice("ab") + chr(ord("c") + i) for i in range(16))


def test_a_legal_stop_list_costs_each_token_work_in_proportion_to_its_new_characters(monkeypatch):
    rng = random.Random(0)
    matcher = StopMatcher(legal_worst_stops(rng))
    monkeypatch.setattr(matcher, "fail", CountingList(matcher.fail))
    state, examined = 0, 0
    CountingList.reads = 0
    text = "".join(rng.choice(["ab", "a", "b", "abab" * 40, "x"]) for _ in range(2000))
    for piece in split(text, rng) + [text[i:i + 3] for i in range(0, len(text), 3)]:
        state, start = matcher.feed(state, piece)
        examined += len(piece)
        assert start is None
    # every character is read once, every failure link followed at most once per character read
    assert CountingList.reads <= examined
    assert examined == len(text) * 2


def test_another_clients_tokens_are_untouched_and_a_stop_list_examines_only_its_own_new_text(
        tiny_model_dir, monkeypatch):
    """One engine, two requests: B sends 16 stop strings of 256 characters. A streams the same tokens as
    alone, and the stop matching of each step reads only the characters that step added to B."""
    examined = []
    feed_text = StopMatcher.feed
    monkeypatch.setattr(StopMatcher, "feed", lambda self, state, text: examined.append(text) or
                        feed_text(self, state, text))
    cached_stop_matcher.cache_clear()
    engine = LLMEngine(EngineConfig(str(tiny_model_dir)))
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    params = dict(temperature=0, ignore_eos=True, max_tokens=40)
    stops = legal_worst_stops(random.Random(1))

    def run(requests: dict) -> dict[str, list[int]]:
        tokens = {rid: [] for rid in requests}
        for rid, p in requests.items():
            engine.add_request(rid, prompt, SamplingParams(**params, **p))
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.token_ids)
        return tokens

    alone = run({"a": {}})
    together = run({"a2": {}, "b": {"stop": stops}})
    assert together["a2"] == alone["a"] and len(together["b"]) == 40
    text_b = engine.tokenizer.decode(together["b"])
    assert sum(map(len, examined)) == len(text_b)


def test_each_request_builds_its_automaton_once_however_many_distinct_stop_lists_are_in_flight(monkeypatch):
    built = []
    init = StopMatcher.__init__
    monkeypatch.setattr(StopMatcher, "__init__", lambda self, stops: built.append(stops) or init(self, stops))
    cached_stop_matcher.cache_clear()
    seqs = [sequence((f"stop {i}", "the end")) for i in range(40)]   # more lists than the cache keeps
    for _ in range(50):
        for seq in seqs:
            assert not push_text(seq, "word ")
            take_text(seq)
    assert len(built) == 40

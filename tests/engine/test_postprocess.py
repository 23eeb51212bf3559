"""A step's tokens after the scheduler: their text, where EOS and stop strings end it, and what streams."""

from phasesplit.engine.kv_cache import BlockManager
from phasesplit.engine.postprocess import postprocess
from phasesplit.engine.sampler import SamplingParams
from phasesplit.engine.scheduler import Scheduler
from phasesplit.engine.sequence import Sequence, take_text

EOS = 0


class LetterDetokenizer:
    """Token t reads as one letter: 1 -> 'a', 2 -> 'b', ..."""

    def push(self, token_id: int) -> str:
        return chr(ord("a") + (token_id - 1) % 26)

    def flush(self) -> str:
        return ""


def scheduler() -> Scheduler:
    return Scheduler(BlockManager(100, 4), 8, 100, 400, {EOS})


def seq(rid: str, n: int, **params) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(temperature=0, **params), LetterDetokenizer())


def stream(sch: Scheduler, tokens: list[int]) -> tuple[Sequence, list[str]]:
    """One running sequence, a token a step until it finishes: it and the text each step streamed."""
    streamed = []
    for token in tokens:
        batch, _ = sch.schedule()
        postprocess(sch, batch, [token])
        streamed.append(take_text(batch[0]))
        if batch[0].is_finished:
            break
    return batch[0], streamed


def test_eos_is_not_part_of_the_text():
    sch = scheduler()
    sch.add(seq("a", 3))
    s, _ = stream(sch, [1, 2, EOS, 3])
    assert (s.output_token_ids, s.finish_reason, s.output_text) == ([1, 2, EOS], "stop", "ab")
    assert sch.block_manager.num_used_blocks == 0


def test_stop_string_is_cut_from_the_text_and_never_streamed():
    sch = scheduler()
    sch.add(seq("a", 3, stop=("cde",), max_tokens=20))
    s, streamed = stream(sch, [1, 2, 3, 4, 5, 6])  # a b c d e f
    assert streamed == ["a", "b", "", "", ""]
    assert s.finish_reason == "stop" and s.output_text == "ab"
    assert sch.block_manager.num_used_blocks == 0 and not sch.has_unfinished()


def test_a_partial_stop_match_is_released_when_it_does_not_complete():
    sch = scheduler()
    sch.add(seq("a", 3, stop=("cd",), max_tokens=3))
    s, streamed = stream(sch, [3, 5, 4])  # c e d
    assert streamed == ["", "ce", "d"] and s.finish_reason == "length"


def test_a_stop_string_completed_by_the_last_token_allowed_still_reads_as_stop():
    sch = scheduler()
    sch.add(seq("a", 3, stop=("cd",), max_tokens=2))
    s, streamed = stream(sch, [3, 4])  # c d
    assert streamed == ["", ""] and (s.finish_reason, s.output_text) == ("stop", "")

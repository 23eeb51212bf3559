import pytest

from phasesplit.engine.kv_cache import BlockManager, KVCapacityError, KVLayout
from phasesplit.engine.sampler import SamplingParams
from phasesplit.engine.scheduler import Scheduler
from phasesplit.engine.sequence import Sequence, SequenceStatus

EOS = 0


def seq(rid: str, n: int, **params) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(temperature=0, **params))


def scheduler(num_blocks=100, block_size=4, max_num_seqs=8, budget=100, max_model_len=None) -> Scheduler:
    max_model_len = max_model_len or num_blocks * block_size
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, max_model_len, {EOS})


def test_layout_differences_name_the_fields():
    a = KVLayout("m", "float32", 2, 4, 64, 16)
    b = KVLayout("m", "bfloat16", 2, 4, 128, 16)
    assert a.differences(a) == []
    assert a.differences(b) == ["dtype: 'float32' != 'bfloat16'", "head_dim: 64 != 128"]


def test_block_accounting_is_exact():
    bm = BlockManager(10, 4)
    s = seq("a", 9)  # 9 tokens -> 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert (len(s.block_table), bm.num_used_blocks, bm.num_free_blocks) == (3, 3, 7)
    with pytest.raises(KVCapacityError, match="need 8 KV blocks, 7 free of 10"):
        bm.take(8)
    s.append_token(5)  # 10 tokens still fit 3 blocks
    bm.may_append(s)
    assert len(s.block_table) == 3
    s.token_ids += [5, 5, 5]  # 13 tokens need a 4th
    bm.may_append(s)
    assert len(s.block_table) == 4
    bm.deallocate(s)
    assert (s.block_table, bm.num_used_blocks) == ([], 0)


def test_prefill_batches_respect_the_token_budget():
    sch = scheduler(budget=100)
    for rid, n in [("a", 60), ("b", 30), ("c", 50)]:
        sch.add(seq(rid, n))
    first, is_prefill = sch.schedule()
    assert is_prefill and [s.request_id for s in first] == ["a", "b"]
    sch.postprocess(first, [7, 7])
    second, is_prefill = sch.schedule()
    assert is_prefill and [s.request_id for s in second] == ["c"]


def test_a_prompt_longer_than_the_budget_runs_alone():
    sch = scheduler(budget=16)
    sch.add(seq("long", 40))
    sch.add(seq("short", 4))
    batch, _ = sch.schedule()
    assert [s.request_id for s in batch] == ["long"]


def test_max_num_seqs_caps_the_running_set_and_every_running_sequence_decodes():
    sch = scheduler(max_num_seqs=2)
    for rid in "abc":
        sch.add(seq(rid, 3))
    batch, is_prefill = sch.schedule()
    assert is_prefill and len(batch) == 2
    sch.postprocess(batch, [7, 7])
    batch, is_prefill = sch.schedule()
    assert not is_prefill and [s.request_id for s in batch] == ["a", "b"]
    assert [s.request_id for s in sch.waiting] == ["c"]


def test_prefill_waits_for_blocks_instead_of_failing():
    sch = scheduler(num_blocks=3, block_size=4)
    sch.add(seq("a", 8))  # 2 blocks
    sch.add(seq("b", 8))  # 2 more: does not fit yet
    batch, _ = sch.schedule()
    assert [s.request_id for s in batch] == ["a"]
    sch.postprocess(batch, [7])
    batch, is_prefill = sch.schedule()
    assert not is_prefill and [s.request_id for s in batch] == ["a"]
    assert sch.waiting[0].request_id == "b"


def test_decode_preempts_the_newest_when_blocks_run_out():
    sch = scheduler(num_blocks=4, block_size=4)
    sch.add(seq("old", 8))
    sch.add(seq("new", 8))
    batch, _ = sch.schedule()
    sch.postprocess(batch, [7, 7])  # both now hold 9 tokens in 2 blocks; the 9th needs a 3rd block
    batch, is_prefill = sch.schedule()
    assert not is_prefill and [s.request_id for s in batch] == ["old"]
    new = sch.waiting[0]
    assert (new.request_id, new.status, new.block_table, new.num_cached_tokens) == ("new", SequenceStatus.WAITING, [], 0)
    assert new.token_ids[-1] == 7  # its output so far is recomputed, not lost
    assert sch.block_manager.num_used_blocks == 3
    assert sch.num_preemptions == 1


def test_a_sequence_never_outgrows_the_cache():
    with pytest.raises(ValueError, match="max_model_len: 9 exceeds the KV cache"):
        scheduler(num_blocks=2, block_size=4, max_model_len=9)
    sch = scheduler(num_blocks=2, block_size=4, max_model_len=8)
    sch.add(seq("a", 7, max_tokens=100))
    s = run_to_end(sch, [1, 2, 3])
    assert (s.num_tokens, s.finish_reason, sch.block_manager.num_used_blocks) == (8, "length", 0)


def run_to_end(sch: Scheduler, tokens: list[int]) -> Sequence:
    out = None
    for token in tokens:
        batch, _ = sch.schedule()
        sch.postprocess(batch, [token])
        out = batch[0]
        if out.is_finished:
            break
    return out


def test_eos_stops_unless_ignored():
    sch = scheduler()
    sch.add(seq("a", 3))
    s = run_to_end(sch, [1, 2, EOS, 3])
    assert (s.output_token_ids, s.finish_reason) == ([1, 2, EOS], "stop")
    assert sch.block_manager.num_used_blocks == 0
    sch.add(seq("b", 3, ignore_eos=True, max_tokens=4))
    s = run_to_end(sch, [1, EOS, 2, 3, 4])
    assert (s.output_token_ids, s.finish_reason) == ([1, EOS, 2, 3], "length")


def test_max_model_len_ends_a_sequence():
    sch = scheduler(max_model_len=6)
    sch.add(seq("a", 4, max_tokens=100))
    s = run_to_end(sch, [1, 2, 3, 4])
    assert (s.num_tokens, s.finish_reason) == (6, "length")


def test_abort_frees_blocks_wherever_the_sequence_is():
    sch = scheduler()
    a, b = seq("a", 10), seq("b", 10)
    sch.add(a)
    batch, _ = sch.schedule()
    sch.postprocess(batch, [7])
    sch.add(b)
    sch.abort(a)
    sch.abort(b)
    assert sch.block_manager.num_used_blocks == 0 and not sch.has_unfinished()
    assert a.finish_reason == b.finish_reason == "abort"

"""After the scheduler: each new token's text, and the stop strings it may complete.

The scheduler ends a sequence on EOS or its length; a stop string that the text completes ends it
here, with the same "stop" the caller sees for EOS."""

from __future__ import annotations

from phasesplit.engine.scheduler import Scheduler
from phasesplit.engine.sequence import Sequence, SequenceStatus, push_text


def postprocess(scheduler: Scheduler, seqs: list[Sequence], token_ids: list[int | None]) -> None:
    """A step's sampled tokens (None: a prompt chunk that is not its last): the scheduler's bookkeeping,
    then their text."""
    scheduler.postprocess(seqs, token_ids)
    for seq, token_id in zip(seqs, token_ids):
        if token_id is None or seq.finish_reason == "abort":
            continue  # no token yet, or aborted during the step: its token was dropped
        running = seq.status is SequenceStatus.RUNNING
        if detokenize(seq, token_id) and running:
            scheduler.finish(seq)


def detokenize(seq: Sequence, token_id: int) -> bool:
    """Adds the text of `token_id`, just appended to `seq` (`finish_reason`: the scheduler's verdict on
    it). True when a stop string in the text ends the sequence instead; its text is cut before it."""
    if seq.finish_reason == "stop":  # EOS: its text is not shown
        push_text(seq, seq.detokenizer.flush())
    elif push_text(seq, seq.detokenizer.push(token_id)):
        seq.finish_reason = "stop"
        return True
    elif seq.finish_reason is not None:
        push_text(seq, seq.detokenizer.flush())
    return False

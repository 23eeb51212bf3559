"""The builtin autoscaler: a kopf timer per SplitInference that scales each pool on its own queue.

Loaded next to the other handlers: `kopf run -m phasesplit.operator.handlers -m phasesplit.operator.autoscaler`.
kopf fixes a timer's interval when the decorator runs, so the timer ticks often and skips
resources whose `spec.autoscaling.intervalSeconds` has not elapsed yet.
"""

import kopf

TICK_SECONDS = 5.0


@kopf.timer("phasesplit.io", "v1alpha1", "splitinferences", interval=TICK_SECONDS, idle=TICK_SECONDS)
async def autoscale_timer(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, patch: kopf.Patch, logger, **_):
    """Placeholder until the policy lands: does nothing yet."""
    return None

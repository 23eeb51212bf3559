"""When local mode stops restarting a process: a crash loop is reported, not repeated forever."""

from __future__ import annotations

from phasesplit.local.processes import ManagedProcess

LIMIT = 3             # failures in a row of one part (the router, a pool) before local mode gives up
QUICK_SECONDS = 10.0  # a process that served longer than this before it died was not crash looping


class Restarts:
    """Counts, for each part, the processes in a row that failed to start or died within `quick` seconds
    of being ready; `died` raises ProcessFailed, with the last one's log, once there are `limit` of them."""

    def __init__(self, limit: int = LIMIT, quick: float = QUICK_SECONDS):
        self.limit = limit
        self.quick = quick
        self.in_a_row: dict[str, int] = {}

    def died(self, part: str, proc: ManagedProcess) -> None:
        served = proc.served_seconds()
        quick = served is None or served < self.quick
        self.in_a_row[part] = self.in_a_row.get(part, 0) + 1 if quick else 0
        if self.in_a_row[part] >= self.limit:
            raise proc.fail(f"failed {self.limit} times in a row (exit code {proc.popen.returncode}; each before "
                            f"it was ready or within {self.quick:g} s of it): not restarting it", lines=12)

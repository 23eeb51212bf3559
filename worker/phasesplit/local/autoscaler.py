"""Local mode's autoscaler: the operator's policy (`phasesplit.control.scaling`) applied to worker processes.

Every `interval` seconds it reads the router's `/metrics` with the operator's parser, asks the
policy for each pool's replicas, and starts workers (ready before the router sees them) or
removes the least-loaded ones (out of the router first, then drained; see `LocalCluster`)."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from phasesplit.control.scaling import Decision, SplitScaler
from phasesplit.local.plan import LocalPlan
from phasesplit.local.processes import ProcessFailed
from phasesplit.control.router_metrics import MetricsUnavailable, RouterScrape

log = logging.getLogger("phasesplit.local.autoscaler")


def enabled(plan: LocalPlan) -> bool:
    return plan.spec.autoscaling.mode == "builtin"


@dataclass(frozen=True, slots=True)
class Applied:
    """A decision that changed a pool, and when its workers were ready (or gone from the router)."""
    pool: str
    decision: Decision
    done_at: float


class LocalAutoscaler:
    """The pool's replica count is its ready workers plus those still starting, as a Deployment's
    `spec.replicas` counts pods that are not ready yet: evaluations go on while workers start, so the
    stabilization window sees the whole burst, and a start in progress is not asked for twice."""

    def __init__(self, cluster, interval: float, clock=time.time):
        self.cluster = cluster
        self.interval = interval
        self.clock = clock
        self.scaler = SplitScaler.from_spec(cluster.plan.spec)
        self.scrape = RouterScrape(f"{cluster.base_url}/metrics")
        self.history: list[Applied] = []
        self._lock = threading.Lock()
        self._starters = ThreadPoolExecutor(max_workers=8, thread_name_prefix="start-worker")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LocalAutoscaler:
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._starters.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.evaluate_once()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad evaluation
                log.exception("autoscaling evaluation failed")

    def evaluate_once(self) -> dict[str, Decision]:
        """One tick: read the metrics, decide for every pool, start or remove workers."""
        try:
            snapshot = self.scrape.parse(self._read_metrics())
        except MetricsUnavailable as e:
            log.warning("metrics unavailable, keeping replicas: %s", e)
            return {}
        current = {pool: self.cluster.replicas(pool) for pool in self.scaler.pools}
        decisions = self.scaler.evaluate(snapshot.pools, current, self.clock())
        for pool, d in decisions.items():
            if d.changed:
                log.info("%s pool: %d -> %d replicas (%s=%s): %s", pool, d.current, d.desired, d.metric,
                         "missing" if d.metric_value is None else f"{d.metric_value:g}", d.reason)
                self._apply(pool, d)
        return decisions

    def _read_metrics(self) -> str:
        try:
            with urllib.request.urlopen(self.scrape.url, timeout=5) as reply:
                return reply.read().decode()
        except (urllib.error.URLError, OSError) as e:
            raise MetricsUnavailable(f"{self.scrape.url}: {e}") from e

    def _apply(self, pool: str, d: Decision) -> None:
        if d.desired > d.current:
            try:
                handles = [self.cluster.begin_start(pool) for _ in range(d.desired - d.current)]
            except OSError as e:
                log.error("%s pool: starting a worker failed: %s", pool, e)
                return
            left = [len(handles)]
            for handle in handles:
                self._starters.submit(self._finish_start, handle, d, left)
            return
        for _ in range(d.current - d.desired):
            try:
                # workers still starting go first (as a ReplicaSet deletes pods that are not ready first)
                if self.cluster.cancel_start(pool) is None:
                    self.cluster.remove_worker(pool)
            except (OSError, ValueError) as e:
                log.error("%s pool: removing a worker failed: %s", pool, e)
                return
        self._done(pool, d)

    def _finish_start(self, handle, d: Decision, left: list[int]) -> None:
        pool = handle.pool
        try:
            self.cluster.finish_start(handle)
        except (ProcessFailed, OSError) as e:
            log.warning("%s pool: a new worker did not join: %s", pool, str(e).splitlines()[0])
        finally:
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
        if last:
            self._done(pool, d)

    def _done(self, pool: str, d: Decision) -> None:
        self.history.append(Applied(pool, d, self.clock()))
        log.info("%s pool: %d replicas ready", pool, len(self.cluster.addresses(pool)))

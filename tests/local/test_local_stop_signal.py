"""A stop signal ends `phasesplit local` even when its exception is swallowed where it lands: the
handler raises in whatever the main thread runs, and a logging handler, for one, catches it."""

import logging
import signal

import pytest

from phasesplit.local import launcher


class SwallowingCluster:
    """Its round of replacing dead processes logs, and a signal lands inside the handler's emit."""

    def __init__(self, stop_signal):
        self.stop_signal, self.rounds = stop_signal, 0

    def replace_dead(self) -> list[str]:
        self.rounds += 1
        if self.rounds == 2:
            try:   # what logging.Handler.emit does with an exception raised inside it
                self.stop_signal(signal.SIGTERM, None)
            except Exception:  # noqa: BLE001
                logging.getLogger(__name__).debug("swallowed")
        assert self.rounds <= 2, "the watch went on after the stop signal"
        return []


def test_the_watch_ends_after_a_stop_signal_whose_exception_was_swallowed(monkeypatch):
    monkeypatch.setattr(launcher.time, "sleep", lambda seconds: None)
    stop_signal = launcher._StopSignal()
    cluster = SwallowingCluster(stop_signal)
    launcher._watch(cluster, stop_signal)
    assert cluster.rounds == 2 and stop_signal.name == "SIGTERM"


def test_the_signal_still_cuts_short_what_the_main_thread_waits_on():
    with pytest.raises(launcher._Stop, match="SIGINT"):
        launcher._StopSignal()(signal.SIGINT, None)

"""`simulate --plot` and `plan --plot`: PNGs with matplotlib, a clear refusal without it, text unchanged."""

import sys

import pytest

from phasesplit.cli import main as cli
from phasesplit.fleet.plots import frontier

SIMULATE = ["simulate", "--trace", "mooncake-conv", "--requests", "300", "--prompt", "h100-80gb:2",
            "--token", "h100-80gb:2", "--routing", "cacheAware"]
PLAN = ["plan", "--trace", "code", "--rate", "3", "--sample", "200", "--hardware", "h100-80gb"]


def test_the_frontier_keeps_the_candidates_no_other_beats_on_cost_and_rate():
    points = [(10, 5), (12, 4), (12, 9), (20, 9), (30, 15), (8, 1)]
    assert frontier(points) == [5, 0, 2, 4]


def test_without_matplotlib_plot_is_refused_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli(SIMULATE + ["--plot", str(tmp_path / "s.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert cli(SIMULATE) == 0 and "prefix cache" in capsys.readouterr().out


def test_plots_are_written_and_the_text_is_unchanged(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli(SIMULATE) == 0
    plain = capsys.readouterr().out
    assert cli(SIMULATE + ["--plot", str(tmp_path / "s.png")]) == 0
    assert capsys.readouterr().out == plain + f"plotted {tmp_path / 's.png'}\n"
    assert cli(PLAN + ["--plot", str(tmp_path / "p.png")]) == 0
    for name in ("s.png", "p.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

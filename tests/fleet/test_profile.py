"""`phasesplit profile` measures the project's own engine into a table `simulate` can use."""

import csv
import json

from phasesplit.cli import main as cli
from phasesplit.fleet.perf import Profiles


def test_profile_of_the_tiny_model_drives_a_simulation(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tiny.csv"
    assert cli(["profile", "--model", str(tiny_model_dir), "--name", "tiny", "--prompt-sizes", "8,32",
                "--batch-sizes", "1,4", "--token-steps", "3", "--repeats", "1", "--out", str(out)]) == 0
    assert "wrote 4 rows for tiny on cpu" in capsys.readouterr().out
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("cpu: {gpus: 1, gpu_memory_gib: 0, cost_per_hour: 0.1, power_w: 65, link_gbps_per_gpu: 10}\n")
    perf = Profiles(out, catalog).get("tiny", "cpu", 1)
    assert perf.prompt_time(4 * 32) > 0 and perf.token_time(4) > 0 and perf.kv_capacity_tokens > 1000
    assert cli(["simulate", "--profiles", str(out), "--catalog", str(catalog), "--model", "tiny", "--tp", "1",
                "--synthetic", "20-30:4", "--rate", "5", "--requests", "50", "--prompt", "cpu:1", "--token", "cpu:1",
                "--slo-reference", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == 50 and summary["cost_per_hour"] == 0.2 and summary["power_w"] == 130


def test_profile_refuses_bad_sizes(tiny_model_dir, tmp_path, capsys):
    assert cli(["profile", "--model", str(tiny_model_dir), "--prompt-sizes", "0,x", "--out", str(tmp_path / "p")]) == 2
    assert "--prompt-sizes: '0,x' is not a comma-separated list" in capsys.readouterr().err


def test_profile_times_a_prompt_chunk_beside_decodes(tiny_model_dir, tmp_path, capsys):
    out, mixed = tmp_path / "tiny.csv", tmp_path / "mixed.csv"
    assert cli(["profile", "--model", str(tiny_model_dir), "--name", "tiny", "--prompt-sizes", "8,32",
                "--batch-sizes", "1,4", "--token-steps", "3", "--repeats", "1", "--out", str(out),
                "--mixed-out", str(mixed)]) == 0
    with mixed.open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["chunk_tokens"]), int(r["num_decodes"])) for r in rows] == [(8, 1), (8, 4), (32, 1), (32, 4)]
    assert all(r["model"] == "tiny" and float(r["step_time"]) > 0 for r in rows)

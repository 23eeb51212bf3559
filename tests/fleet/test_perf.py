"""The performance model: interpolation inside the measured range, the stated rule outside it."""

import pytest

from phasesplit.fleet.perf import Curve, Profiles, kv_transfer_time

from support.fleet_profiles import write_profile


def test_curve_interpolates_inside_and_follows_the_stated_rule_outside():
    c = Curve.from_points({100: [10.0, 12.0], 200: [21.0], 400: [41.0]})
    assert c(100) == 11.0, "repeats are averaged"
    assert c(150) == pytest.approx(16.0)
    assert c(300) == pytest.approx(31.0)
    assert c(10) == 11.0, "below the smallest point: the smallest point's time"
    assert c(800) == pytest.approx(81.0), "above the largest: the last two points' slope continued"


def test_bundled_table_gives_the_papers_machines():
    p = Profiles()
    h100, a100, pcap = (p.get("llama2-70b", hw, 8) for hw in ("h100-80gb", "a100-80gb", "h100-80gb-pcap"))
    # A prompt of 1024 tokens: measured 77-80 ms on H100, about 155 ms on A100.
    assert 0.070 < h100.prompt_time(1024) < 0.090 and 0.140 < a100.prompt_time(1024) < 0.170
    # Token phase: the power cap barely matters, the A100 is about 1.5x slower.
    assert pcap.token_time(8) == pytest.approx(h100.token_time(8), rel=0.05)
    assert 1.3 < a100.token_time(8) / h100.token_time(8) < 1.7
    # Prompt time grows with the batch's tokens; 8 x 512 costs more than 1 x 512.
    assert h100.prompt_time(4096) > 4 * h100.prompt_time(512)
    # Llama2-70B's KV: 80 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes.
    assert h100.kv_bytes_per_token == 327_680 and h100.kv_capacity_tokens > 1_000_000
    assert h100.instances_per_machine == 1 and p.get("llama2-70b", "h100-80gb", 2).instances_per_machine == 4


def test_layerwise_transfer_hides_behind_the_prefill_unless_the_link_is_slower():
    # 1000 tokens x 1000 bytes over 1 MB/s: 1 s of transfer, 4 layers.
    assert kv_transfer_time(1000, 10.0, 1000, 1e6, 4) == pytest.approx(0.25), "only the last layer shows"
    assert kv_transfer_time(1000, 0.4, 1000, 1e6, 4) == pytest.approx(0.7), "the backlog shows"
    assert kv_transfer_time(1000, 10.0, 1000, 1e6, 4, layerwise=False) == pytest.approx(1.0)


def test_bad_tables_and_names_are_refused_with_the_field(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,hardware\nx,y\n")
    with pytest.raises(ValueError, match="missing column.*tensor_parallel"):
        Profiles(bad)
    p = Profiles()
    with pytest.raises(ValueError, match="no profile rows for model=llama2-70b hardware=tpu-v9 tp=8.*a100-80gb"):
        p.get("llama2-70b", "tpu-v9", 8)
    tiny = write_profile(tmp_path / "b.csv", [{"model": "bloom-176b", "hardware": "h100-80gb", "tensor_parallel": 2,
                                               "prompt_size": 1, "batch_size": 1, "prompt_time": 1, "token_time": 1}])
    with pytest.raises(ValueError, match="does not fit on 2 GPUs"):
        Profiles(tiny).get("bloom-176b", "h100-80gb", 2)

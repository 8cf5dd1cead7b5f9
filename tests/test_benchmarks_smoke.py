"""The benchmark scripts run end to end on tiny models and write their JSON and plot (marked slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
def test_forward_time_quick(tmp_path):
    import forward_time

    results = forward_time.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "forward_time_cpu.json").read_text())
    assert (tmp_path / "forward_time_cpu.png").stat().st_size > 10_000
    for backbone in ("transformers", "open_clip"):
        ratios = data["backbones"][backbone]["ratios"]
        assert set(ratios) >= {"up-person / bare", "s-prefix L=10 / prefix L=10"}
        assert all(r > 0 for r in ratios.values())
    assert results["machine"]["device"] == "cpu"


@pytest.mark.slow
def test_train_memory_quick(tmp_path):
    import train_memory

    train_memory.main(["--quick", "--out", str(tmp_path), "--methods", "full fine-tuning", "unipt"])
    data = json.loads((tmp_path / "train_memory_cpu_quick.json").read_text())
    rows = data["methods"]
    assert rows["full fine-tuning"]["trainable"] == rows["full fine-tuning"]["total"]
    assert 0 < rows["unipt"]["trainable"] < rows["unipt"]["total"]
    assert rows["unipt"]["peak_ratio_to_full"] < 1.0
    assert (tmp_path / "train_memory_cpu_quick.png").is_file()


@pytest.mark.slow
def test_cli_bench_runs_the_routing_benchmark(tmp_path):
    from petl_tpr.cli import main

    assert main(["bench", "moa", "--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "moa_routing_cpu.json").read_text())
    vision = data["shapes"]["vision"]
    assert vision["roofline_percent"] is None          # no peak bandwidth known for a CPU
    assert set(vision["bandwidth_gbs"]) == {"infer_ms", "fwd_ms"}
    assert all(set(entry) >= {"reference", "torch"} for entry in vision["bandwidth_gbs"].values())


def test_routing_minimal_bytes_and_peak_lookup():
    import moa_routing

    # x and y (2 T d), gates (T k) and weights (E (2 d r + r + d)) at 2 bytes, ids at 8 bytes
    assert moa_routing.minimal_bytes(10, 4, 2, 3, 2, 2) == 2 * (80 + 20 + 3 * (16 + 2 + 4)) + 8 * 20
    assert moa_routing.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert moa_routing.peak_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert moa_routing.peak_bandwidth("Intel Xeon") is None


@pytest.mark.slow
def test_sdpa_takeover_quick(tmp_path):
    import sdpa_takeover

    results = sdpa_takeover.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "sdpa_takeover_cpu_quick.json").read_text())
    assert data["max_output_difference"] < 1e-5          # both prefix paths compute the same thing
    assert set(data["ratios"]) >= {"s-prefix, sdpa / s-prefix, hf", "sdpa, prefixes off / bare"}
    assert all(r > 0 for r in data["ratios"].values())
    assert (tmp_path / "sdpa_takeover_cpu_quick.png").stat().st_size > 10_000
    assert results["machine"]["device"] == "cpu"

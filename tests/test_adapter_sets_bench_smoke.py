"""The adapter-sets benchmark runs end to end on a tiny tower (--quick) and writes its JSON and plot."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "adapter_sets.py"


def _load():
    spec = importlib.util.spec_from_file_location("adapter_sets_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_adapter_sets_benchmark_quick(tmp_path):
    bench = _load()
    results = bench.main(["--quick", "--out", str(tmp_path), "--switch-repeats", "50"])
    data = json.loads((tmp_path / "adapter_sets_cpu_quick.json").read_text())
    assert (tmp_path / "adapter_sets_cpu_quick.png").stat().st_size > 0
    assert data["quick"] is True and data["batch"] == 8 and data["set_counts"] == [1, 2, 4, 8]
    assert set(data) >= {"machine", "mixed", "switching", "max_abs_diff", "parity_ok", "mixed_size",
                         "switching_size", "modes", "target_ratio"}
    assert set(data["machine"]) >= {"torch", "cpu_count", "device_name", "threads"}
    assert set(data["mixed"]) == set(bench.METHODS)
    for method, row in data["mixed"].items():
        ratios = row["forward"]["ratio_mixed_to_single"]
        assert set(ratios) == {"1", "2", "4", "8"}, method
        assert all(math.isfinite(r) and r > 0 for r in ratios.values()), (method, ratios)
        assert all(math.isfinite(r) and r > 0 for r in row["forward"]["ratio_of_minima"].values())
        assert set(row["forward"]["times"]) == {"single", "mixed 1", "mixed 2", "mixed 4", "mixed 8"}
        assert set(row["max_abs_diff"]) == {"1", "2", "4", "8"}
        assert row["sets_apart"] > 1e-3, f"{method}: the perturbed sets must give different outputs"
    assert data["parity_ok"] is True and data["max_abs_diff"] <= bench.TOLERANCE
    assert set(data["switching"]) == {"up-person", "lora"}
    for by_sets in data["switching"].values():
        assert set(by_sets) == {"2", "8"}
        for row in by_sets.values():
            for op in ("activate", "set_trainable", "disabled", "per_sample"):
                assert 0 < row[op]["median_us"] < math.inf and row[op]["repeats"] >= 20
    assert results["max_abs_diff"] == data["max_abs_diff"]


def test_adapter_sets_benchmark_train_mode(tmp_path):
    bench = _load()
    bench.main(["--quick", "--train", "--batch", "4", "--methods", "lora", "prefix", "--switch-presets",
                "--out", str(tmp_path)])
    data = json.loads((tmp_path / "adapter_sets_cpu_quick.json").read_text())
    assert data["modes"] == ["forward", "train"] and data["set_counts"] == [1, 2, 4]
    for row in data["mixed"].values():
        assert all(math.isfinite(r) and r > 0 for r in row["train"]["ratio_mixed_to_single"].values())
    assert data["switching"] == {} and data["parity_ok"] is True

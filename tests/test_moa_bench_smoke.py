"""The routed-adapter benchmark runs end to end in --quick mode and writes its JSON and plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "moa_routing.py"


def test_moa_routing_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("moa_routing_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "moa_routing_cpu.json").read_text())
    assert (tmp_path / "moa_routing_cpu.png").stat().st_size > 0
    assert data["quick"] is True and set(data) >= {"machine", "shapes", "e_sweep", "t_sweep", "repeats"}
    assert set(data["machine"]) >= {"torch", "cpu_count", "device_name", "threads"}
    assert set(data["shapes"]) == {"vision", "text"}
    for entry in [*data["shapes"].values(), *data["e_sweep"], *data["t_sweep"]]:
        assert set(entry["ms"]) >= {"reference", "torch"}
        assert all(set(t) == {"infer_ms", "fwd_ms", "fwd_bwd_ms"} and min(t.values()) > 0 for t in entry["ms"].values())
        assert entry["speedup_vs_reference"]["reference"] == {"infer_ms": 1.0, "fwd_ms": 1.0, "fwd_bwd_ms": 1.0}
        assert all(err < 1e-3 for err in entry["max_abs_diff_vs_reference"].values())
    assert [c["E"] for c in data["e_sweep"]] == [2, 4, 8] and results["shapes"]["vision"]["E"] == 6

"""examples/serve_several_domains.py: two adapter sets trained, saved, loaded by name and mixed per row.

The example's `main` runs in-process with a few steps on tiny domains (a few seconds); the checks
read both its returned results and its printed report. The full-length run, where each domain
is best served by its own set, is marked slow.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import petl_tpr as pt

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "serve_several_domains.py"
ROWS = ["bare backbone", "set indoor", "set outdoor"]
DOMAINS = ["indoor", "outdoor"]


def load_example():
    spec = importlib.util.spec_from_file_location("serve_several_domains", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_report(result: dict, text: str, out: Path) -> None:
    assert list(result["table"]) == ROWS
    for row, values in result["table"].items():
        assert list(values) == DOMAINS, row
        assert all(0.0 <= v <= 100.0 for v in values.values()), (row, values)
    # the mixed batch: every row equals that row's single-set (or bare) output
    assert result["parity"] is True and result["max_diff"] < 1e-5
    assert re.search(r"^\[per_sample\] one batch of 7 rows, .*equals its set run alone: True", text, re.M)
    # the printed table: a header with both domains, one line per row of the returned table
    assert re.search(r"^\s+indoor\s+outdoor$", text, re.M)
    for row, values in result["table"].items():
        printed = re.search(rf"^{row}\s+([\d.]+)\s+([\d.]+)$", text, re.M)
        assert printed, row
        assert [float(g) for g in printed.groups()] == [round(v, 1) for v in values.values()]
    assert re.search(r"^\[load\] sets \['indoor', 'outdoor'\], active \['outdoor'\]", text, re.M)
    # one file per set, each a one-set file under its name
    for name in DOMAINS:
        path = out / f"{name}.safetensors"
        assert result["files"][name] == path and path.is_file()
        metadata = pt.io.read_header(path).metadata
        assert metadata["set"] == name and "sets" not in metadata


def test_serve_several_domains_quick(tmp_path, capsys):
    result = load_example().main(["--out", str(tmp_path), "--steps", "3", "--pretrain-steps", "3",
                                  "--identities", "10", "--batch-size", "16"])
    check_report(result, capsys.readouterr().out, tmp_path)


@pytest.mark.slow
def test_serve_several_domains_full(tmp_path, capsys):
    result = load_example().main(["--out", str(tmp_path)])
    check_report(result, capsys.readouterr().out, tmp_path)
    table = result["table"]
    assert result["best"] == {"indoor": "indoor", "outdoor": "outdoor"}
    for domain in DOMAINS:
        assert table[f"set {domain}"][domain] > table["bare backbone"][domain]

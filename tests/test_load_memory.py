"""A tampered adapter file is refused before anything is allocated: checked under a hard memory limit.

The child process (benchmarks/refused_load_memory.py) caps its address space at its current size
plus 200 MB (RLIMIT_AS) just before `load_adapters`; a file whose stored spec says LoRA rank 10**7
would need about 1 GB per site of the test CLIP, so building the spec first fails in the allocator,
while the header check refuses it with a CheckpointError and a peak RSS a few MB above before.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


def test_tampered_rank_refused_under_memory_limit():
    from refused_load_memory import run_child

    row = run_child(10**7, model="tiny", limit_mb=200)
    assert row["error"] is not None and row["error"]["type"] == "CheckpointError", row["error"]
    assert "(10000000, 32) as the stored spec implies for this model" in row["error"]["message"]
    assert row["peak_above_before_mb"] < 8, row

"""The per-library examples run as shipped and print what their docstrings promise.

Each script runs in a subprocess from the repository root (as a user would), with a temporary
folder as its OUT_DIR argument; the checks parse numbers from its output, so a silent failure
(an eject that leaves a difference, a merge that changes outputs, a run with no metrics) fails.
tests/test_examples_and_dtypes.py only checks that every example exits 0 and prints something.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def numbers(pattern: str, text: str) -> list[float]:
    """Every group of every match of `pattern` (lines anchored with ^ $) as floats, in order."""
    matches = re.findall(pattern, text, flags=re.M)
    found = [float(g.replace(",", "")) for m in matches for g in (m if isinstance(m, tuple) else (m,))]
    assert found, f"no match for {pattern!r} in:\n{text}"
    return found


def per_preset(text: str) -> dict[str, str]:
    """The output split at the `== <preset>` headers."""
    parts = re.split(r"^== (\S+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def check_inject_output(text: str, presets: list[str], aux_preset: str = "dm-adapter") -> dict[str, str]:
    """Every preset: trainable > 0, eject leaves no difference; the router preset has aux_loss > 0."""
    sections = per_preset(text)
    assert list(sections) == presets
    for preset, section in sections.items():
        assert numbers(r"^trainable\s+([\d,]+)$", section)[0] > 0, preset
        # the CLIP examples compare features, the timm one the whole state dict
        restored = (r"^after eject: (max \|feature difference\| to the original = 0\.00e\+00"
                    r"|state_dict equal to the original, bit for bit: True)")
        assert re.search(restored, section, re.M), preset
        aux = numbers(r"aux_loss = (\S+)$", section)[0]
        assert aux > 0 if preset == aux_preset else aux == 0, (preset, aux)
    return sections


def test_inject_transformers_clip(tmp_path):
    presets = ["up-person", "dm-adapter", "unipt"]
    sections = check_inject_output(run_example("inject_transformers_clip.py", str(tmp_path)), presets)
    for preset, section in sections.items():
        got, trainable, frozen = numbers(r"backward: (\d+) of (\d+) trainable tensors got a gradient, "
                                         r"frozen tensors with one: (\d+)", section)
        assert got == trainable > 0 and frozen == 0, preset


def test_inject_open_clip(tmp_path):
    text = run_example("inject_open_clip.py", str(tmp_path))
    sections = check_inject_output(text, ["lora", "up-person", "dm-adapter"])
    # open_clip fuses q, k, v in MultiheadAttention's in_proj_weight: LoRA sits on a row slice of it
    assert re.search(r"adapter tensors, e\.g\. \S+\.attn\.in_proj_weight\.q\.lora\.lora_a$", sections["lora"], re.M)


@pytest.mark.slow
def test_inject_timm(tmp_path):
    text = run_example("inject_timm.py", str(tmp_path))
    assert text.startswith("vision: 12 timm_vit blocks of width 192")
    check_inject_output(text, ["lora", "dm-adapter", "unipt"])


def test_merge_lora_for_deployment(tmp_path):
    text = run_example("merge_lora_for_deployment.py", str(tmp_path))
    bare, with_lora = numbers(r"bare model ([\d,]+) parameters; with LoRA ([\d,]+)", text)
    merged, after, bare_again = numbers(r"merged (\d+) LoRA deltas; parameters now ([\d,]+) "
                                        r"\(bare model: ([\d,]+)\)", text)
    assert with_lora > bare and merged > 0 and after == bare_again == bare
    assert numbers(r"merged vs unmerged: max \|feature difference\| = (\S+)$", text)[0] < 1e-4
    modules, reload_diff = numbers(r"petl_tpr modules in it: (\d+); max \|feature difference\| vs merged = (\S+)$",
                                   text)
    assert modules == 0 and reload_diff == 0.0
    assert (tmp_path / "clip-merged" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["up-person", "dm-adapter"])
def test_train_on_dataset(tmp_path, preset):
    text = run_example("train_on_dataset.py", str(tmp_path), "--preset", preset)
    assert numbers(r"^trainable\s+([\d,]+)$", text)[0] > 0
    losses = numbers(r"^epoch \d+: loss (\S+) ", text)
    assert len(losses) == 2 and all(0 < loss < 1e3 for loss in losses)
    aux = numbers(r"aux (\S+)\)", text)
    assert all(a > 0 for a in aux) if preset == "dm-adapter" else aux == [0.0, 0.0]
    test = json.loads(re.search(r"^test: (\{.*\})$", text, re.M).group(1))
    assert test["num_queries"] > 0 and all(0 <= test[k] <= 100 for k in ("R@1", "R@5", "R@10", "mAP", "mINP"))
    run = tmp_path / f"run_{preset}"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and "R@1" in records[-1]["val"]
    assert (run / "best.safetensors").is_file() and (run / "checkpoints" / "latest.json").is_file()

"""`petl-tpr demo`: the synthetic transfer demo (quick sizes here; the full size is a slow test)."""

from __future__ import annotations

import json

import pytest

from petl_tpr.cli import main
from petl_tpr.tpr.demo import METHODS, DemoConfig, run_demo
from petl_tpr.tpr.errors import TaskInputError

PETL = ("lora", "up-person", "dm-adapter", "unipt")


def by_method(results):
    return {r["method"]: r for r in results}


def test_quick_demo_prints_the_table_writes_the_files_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "demo_results.json").read_text())
    results = by_method(record["results"])
    assert list(results) == list(METHODS)
    table = (out / "demo_table.txt").read_text()
    for method in METHODS:
        assert any(line.startswith(method) for line in table.splitlines()), method
    assert table.strip() in printed
    total = results["full fine-tuning"]["total"]
    assert results["zero-shot"]["trainable"] == 0 and results["full fine-tuning"]["trainable"] == total
    for method in PETL:
        row = results[method]
        assert 0 < row["trainable"] < 0.1 * total, method
        assert row["percent"] == pytest.approx(100 * row["trainable"] / row["total"])
        assert row["total"] > total          # the frozen backbone plus the adapters
    memory = {m: r["step_memory_mb"] for m, r in results.items() if m != "zero-shot"}
    assert results["zero-shot"]["train_mb"] == 0.0
    assert all(memory[m]["optimizer"] < memory["full fine-tuning"]["optimizer"] / 10 for m in PETL)
    # UniPT's side network needs no backbone activations: far fewer saved tensors than LoRA's.
    assert memory["unipt"]["activations"] < memory["lora"]["activations"] / 2
    for row in results.values():
        assert all(0 <= row[k] <= 100 for k in ("R@1", "R@5", "R@10", "mAP", "mINP"))
        assert row["peak_mb"] > 0 and row["memory"] == "rss"
    assert (out / "demo_r1_vs_params.png").stat().st_size > 1000
    assert 0 <= record["pretrain"]["R@1"] <= 100 and (out / "pretrain" / "pretrained.safetensors").exists()
    assert (out / "lora" / "curves.png").exists()

    # A second run reuses every finished step and reports the same numbers.
    logged: list[str] = []
    again = run_demo(DemoConfig.quick(out, progress=False), log=logged.append)
    assert by_method(again) == results
    assert sum("reusing" in line for line in logged) == len(METHODS) + 1
    assert "[pretrain] epoch 2/2: loss" in printed and "[lora] epoch 1/1: loss" in printed



def test_changed_settings_are_not_reused_and_subsets_run(tmp_path):
    out = tmp_path / "demo"
    lines: list[str] = []
    first = run_demo(DemoConfig.quick(out, methods=("zero-shot", "lora"), progress=False), log=lines.append)
    assert [r["method"] for r in first] == ["zero-shot", "lora"]
    lines.clear()
    second = run_demo(DemoConfig.quick(out, methods=("lora",), transfer_epochs=2, progress=False),
                      log=lines.append)
    assert not any("reusing" in line and "lora" in line for line in lines)
    assert any("reusing" in line and "pretrain" in line for line in lines)   # pre-training settings are the same
    assert second[0]["epochs"] == 2


def test_a_method_alone_matches_it_in_the_full_list(tmp_path):
    """Adapter initialisation is seeded per method: running one method alone (as a re-run of a lost
    step does) gives the numbers it had after the other methods."""
    common = dict(progress=False)
    full = by_method(run_demo(DemoConfig.quick(tmp_path / "a", **common), log=lambda line: None))
    alone = run_demo(DemoConfig.quick(tmp_path / "b", methods=("dm-adapter",), **common), log=lambda line: None)
    keys = ("trainable", "R@1", "R@5", "R@10", "mAP", "mINP", "final_loss")
    assert {k: alone[0][k] for k in keys} == {k: full["dm-adapter"][k] for k in keys}


def test_open_clip_backbone(tmp_path):
    results = run_demo(DemoConfig.quick(tmp_path, backbone="open_clip", methods=("zero-shot", "up-person"),
                                        progress=False), log=lambda line: None)
    assert [r["method"] for r in results] == ["zero-shot", "up-person"] and results[1]["trainable"] > 0


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(TaskInputError, match="methods"):
        DemoConfig(out_dir=tmp_path, methods=("prompt-tuning",))
    with pytest.raises(TaskInputError, match="backbone"):
        DemoConfig(out_dir=tmp_path, backbone="jax")
    with pytest.raises(TaskInputError, match="transfer_epochs"):
        DemoConfig(out_dir=tmp_path, transfer_epochs=0)
    with pytest.raises(TaskInputError, match="patch size"):
        DemoConfig(out_dir=tmp_path, image_size=(100, 48))


@pytest.mark.slow
def test_full_demo_petl_methods_beat_zero_shot(tmp_path):
    """The README's main job at its real size: every PETL method clearly beats zero-shot transfer."""
    results = by_method(run_demo(DemoConfig(out_dir=tmp_path, progress=False), log=print))
    zero = results["zero-shot"]["R@1"]
    for method in PETL + ("full fine-tuning",):
        assert results[method]["R@1"] >= zero + 10, (method, results[method]["R@1"], zero)

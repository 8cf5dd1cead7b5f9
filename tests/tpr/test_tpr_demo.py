"""`petl-tpr demo`: the synthetic transfer demo (quick sizes here; the full size is a slow test)."""

from __future__ import annotations

import json

import pytest

from petl_tpr.cli import main
from petl_tpr.tpr.demo import METHODS, DemoConfig, run_demo, run_seeds
from petl_tpr.tpr.demo.seeds import summarise
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
    # The unseen domain (2): evaluated for every method, with its chance level in the record.
    header = table.splitlines()[0]
    assert "unseen R@1" in header and "unseen mAP" in header
    unseen = record["unseen"]
    assert unseen["queries"] > 0 and unseen["gallery"] > 0 and 0 < unseen["chance_R@1"] < 100
    for row in results.values():
        assert 0 <= row["unseen_R@1"] <= 100 and 0 < row["unseen_mAP"] <= 100
        assert row["seed"] == 0 and row["versions"]["torch"] and row["versions"]["transformers"]
    assert "seed 0; petl_tpr" in table
    # The retrieval pictures: the same example captions for every method, a picture per method.
    queries = {tuple(e["query"] for e in row["examples"]) for row in results.values()}
    assert len(queries) == 1 and len(next(iter(queries))) == 4
    for method in METHODS:
        assert (out / "retrieval" / f"{method.replace(' ', '-')}.png").stat().st_size > 5000, method
    assert (out / "demo_retrieval.png").stat().st_size > 10000
    assert 0 <= record["pretrain"]["R@1"] <= 100 and (out / "pretrain" / "pretrained.safetensors").exists()
    assert (out / "lora" / "curves.png").exists()

    # A second run reuses every finished step and reports the same numbers.
    logged: list[str] = []
    again = run_demo(DemoConfig.quick(out, progress=False), log=logged.append)
    assert by_method(again) == results
    assert sum("reusing" in line for line in logged) == len(METHODS) + 1
    assert any("retrieval pictures" in line for line in logged)
    assert "[pretrain] epoch 2/2: loss" in printed and "[lora] epoch 1/1: loss" in printed



def check_zero_shot_against_a_reference_ranking(config, row):
    """The zero-shot row's top 5 of each example caption is numpy's stable descending sort of the
    pre-trained model's scores, its R@1 the share of queries whose top 1 is their identity, and the
    unseen metrics are those of `evaluate` on the unseen test split."""
    import numpy as np

    from petl_tpr.tpr import build_dataset, build_test_transform, ClipTokenizer, TransformConfig, encode_split
    from petl_tpr.tpr import evaluate
    from petl_tpr.tpr.demo.run import build_model
    from petl_tpr.tpr.training.run_files import load_weights

    tmp_path = config.out_dir
    model = build_model(config)
    load_weights(model.clip, tmp_path / "pretrain" / "pretrained.safetensors", full=True)
    tokenizer = ClipTokenizer(context_length=config.context_length)
    transform = build_test_transform(TransformConfig(height=64, width=32, padding=2))
    split = build_dataset("cuhk-pedes", tmp_path / "data" / "target").test
    feats = encode_split(model, split, tokenizer=tokenizer, transform=transform)
    scores = (feats.text @ feats.images.T).numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    for example in row["examples"]:
        assert example["top5"] == order[example["query"], :5].tolist()
    pids = np.array(split.image_pids)
    assert row["R@1"] == pytest.approx(100 * np.mean(pids[order[:, 0]] == np.array(split.caption_pids)))
    unseen = evaluate(model, build_dataset("cuhk-pedes", tmp_path / "data" / "unseen").test, tokenizer=tokenizer,
                      transform=transform)
    assert row["unseen_R@1"] == pytest.approx(unseen["R@1"]) and row["unseen_mAP"] == pytest.approx(unseen["mAP"])


def test_summary_over_seeds_is_mean_and_sample_sd():
    import statistics

    def record(seed, r1):
        rows = [{"method": m, "seed": seed, "versions": {"torch": "x"}, **{k: r1 + i for k in
                 ("trainable", "total", "percent", "R@1", "R@5", "R@10", "mAP", "mINP", "unseen_R@1", "unseen_R@5",
                  "unseen_R@10", "unseen_mAP", "unseen_mINP", "train_s", "train_mb", "peak_mb")}}
                for i, m in enumerate(("zero-shot", "lora"))]
        return {"results": rows}

    rows = summarise([record(0, 10.0), record(1, 14.0), record(2, 15.0)])
    assert [r["method"] for r in rows] == ["zero-shot", "lora"] and rows[1]["seeds"] == [0, 1, 2]
    assert rows[1]["R@1"] == pytest.approx(14.0) and rows[1]["spread"]["R@1"] == pytest.approx(
        statistics.stdev([11.0, 15.0, 16.0]))


def test_several_seeds_report_mean_and_spread(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["demo", "--quick", "--seeds", "2", "--methods", "zero-shot", "--out", str(out),
                 "--no-progress"]) == 0
    record = json.loads((out / "demo_results.json").read_text())
    assert record["seeds"] == [0, 1] and len(record["per_seed"]) == 2
    single = [r["results"][0]["unseen_R@1"] for r in record["per_seed"]]
    row = record["results"][0]
    assert row["unseen_R@1"] == pytest.approx(sum(single) / 2)
    assert row["spread"]["unseen_R@1"] == pytest.approx(abs(single[0] - single[1]) / 2 ** 0.5)
    assert (out / "seed-1" / "demo_retrieval.png").exists() and (out / "demo_r1_vs_params.png").exists()
    table = (out / "demo_table.txt").read_text()
    assert "±" in table and "seeds 0, 1 (mean ± sample sd)" in table and table.strip() in capsys.readouterr().out
    assert table.splitlines()[2].split()[:3] == ["zero-shot", "0", "0.00±0.00"]   # counts stay integers
    with pytest.raises(TaskInputError, match="seeds"):
        run_seeds(DemoConfig.quick(tmp_path), 0)


def test_changed_settings_are_not_reused_and_subsets_run(tmp_path):
    out = tmp_path / "demo"
    lines: list[str] = []
    config = DemoConfig.quick(out, methods=("zero-shot", "lora"), progress=False)
    first = run_demo(config, log=lines.append)
    assert [r["method"] for r in first] == ["zero-shot", "lora"]
    check_zero_shot_against_a_reference_ranking(config, first[0])
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
    """The README's main job at its real size: every PETL method clearly beats zero-shot transfer;
    the retrieval pictures are drawn, and every method's unseen-domain metrics are finite and
    above chance."""
    import math

    results = by_method(run_demo(DemoConfig(out_dir=tmp_path, progress=False), log=print))
    zero = results["zero-shot"]["R@1"]
    for method in PETL + ("full fine-tuning",):
        assert results[method]["R@1"] >= zero + 10, (method, results[method]["R@1"], zero)
    unseen = json.loads((tmp_path / "demo_results.json").read_text())["unseen"]
    for method, row in results.items():
        assert math.isfinite(row["unseen_R@1"]) and math.isfinite(row["unseen_mAP"]), method
        assert row["unseen_R@1"] > unseen["chance_R@1"] and row["unseen_mAP"] > unseen["chance_mAP"], (method, row)
        assert (tmp_path / "retrieval" / f"{method.replace(' ', '-')}.png").stat().st_size > 10000, method
    assert (tmp_path / "demo_retrieval.png").stat().st_size > 20000

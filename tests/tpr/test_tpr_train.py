"""Training loop, schedule and evaluation on a tiny transformers CLIP and the synthetic dataset (CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()

import petl_tpr as pt  # noqa: E402
import petl_tpr.tpr as tpr  # noqa: E402
from petl_tpr.errors import CheckpointError  # noqa: E402
from petl_tpr.tpr.training.schedule import OptimConfig, build_optimizer, build_scheduler, lr_factor, param_groups  # noqa: E402
from petl_tpr.tpr.training.run_files import RunFiles  # noqa: E402
from petl_tpr.tpr.training.trainer import TrainConfig, train  # noqa: E402
from transformers import CLIPConfig  # noqa: E402

SIZE = tpr.TransformConfig(height=64, width=32)
LORA = pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"rank": 4, "alpha": 4, "roles": ["q", "v"]},
                                       "where": {"branches": ["vision", "text"]}}]})


def tiny_model(seed: int = 0, name: str = "default") -> tpr.DualEncoder:
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        projection_dim=16)
    torch.manual_seed(seed)
    model = tpr.build_clip(config, image_size=(64, 32))
    pt.inject(model.clip, LORA, name=name)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tpr.write_synthetic(tmp_path_factory.mktemp("synth"), identities=10, images_per_id=2,
                               captions_per_image=2, test_fraction=0.2, val_fraction=0.2, seed=3)
    return tpr.build_dataset("cuhk-pedes", root)


@pytest.fixture(scope="module")
def tokenizer():
    return tpr.ClipTokenizer()


def run(model, data, tokenizer, out_dir, **overrides):
    resume, stop_after = overrides.pop("resume", False), overrides.pop("stop_after", None)
    settings = dict(epochs=2, batch_size=8, lr=5e-3, warmup_epochs=1, seed=1, id_loss=True, plot=False)
    config = TrainConfig(out_dir=out_dir, **{**settings, **overrides})
    return train(model, data, config, tokenizer=tokenizer, train_transform=tpr.build_train_transform(SIZE),
                 eval_transform=tpr.build_test_transform(SIZE), resume=resume, stop_after=stop_after)


# ------------------------------------------------------------------------------------- schedule


def test_lr_factor_matches_the_formula():
    factors = [lr_factor(e, epochs=60, warmup_epochs=5, warmup_factor=0.1) for e in range(60)]
    assert factors[:6] == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82, 1.0])
    for e in range(5, 60):
        assert factors[e] == pytest.approx(0.5 * (1 + math.cos(math.pi * (e - 5) / 55)))
    assert 0 < factors[59] < 1e-3 and all(a >= b for a, b in zip(factors[5:], factors[6:]))


def test_scheduler_steps_per_epoch_and_groups_split_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_parameter("scale", torch.nn.Parameter(torch.ones(())))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    groups = param_groups([model, frozen, model], weight_decay=4e-5)
    assert [len(g["params"]) for g in groups] == [1, 4] and [g["weight_decay"] for g in groups] == [4e-5, 0.0]
    config = OptimConfig(lr=1e-3, epochs=10, warmup_epochs=2)
    optimizer = build_optimizer([model, frozen], config)
    assert optimizer.defaults["eps"] == 1e-3 and optimizer.defaults["betas"] == (0.9, 0.999)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * lr_factor(e, epochs=10, warmup_epochs=2, warmup_factor=0.1) for e in range(10)]
    assert seen == pytest.approx(expected, rel=1e-12)
    with pytest.raises(tpr.TaskInputError, match="warmup_epochs"):
        OptimConfig(epochs=5, warmup_epochs=5)
    with pytest.raises(tpr.TaskInputError, match="no trainable"):
        param_groups([frozen], weight_decay=0.0)


def test_train_config_validates(tmp_path):
    with pytest.raises(tpr.TaskInputError, match="eval_split"):
        TrainConfig(out_dir=tmp_path, eval_split="train")
    with pytest.raises(tpr.TaskInputError, match="grad_accum"):
        TrainConfig(out_dir=tmp_path, grad_accum=0)
    with pytest.raises(tpr.TaskInputError, match="lr"):
        TrainConfig(out_dir=tmp_path, lr=0.0)
    assert TrainConfig(out_dir=str(tmp_path)).optim.eps == 1e-3


# ------------------------------------------------------------------------------------- evaluate


def test_evaluate_returns_metrics_and_restores_mode(data, tokenizer):
    model = tiny_model().train()
    metrics = tpr.evaluate(model, data.test, tokenizer=tokenizer, transform=tpr.build_test_transform(SIZE),
                           batch_size=3)
    assert set(metrics) == {"R@1", "R@5", "R@10", "mAP", "mINP", "num_queries", "num_gallery"}
    assert metrics["num_gallery"] == len(data.test.image_paths) and model.training
    feats = tpr.encode_split(model, data.test, tokenizer=tokenizer, transform=tpr.build_test_transform(SIZE))
    assert torch.allclose(feats.text.norm(dim=1), torch.ones(len(feats.text)))
    again = tpr.evaluate(model, data.test, tokenizer=tokenizer, transform=tpr.build_test_transform(SIZE),
                         batch_size=64)
    assert again == pytest.approx(metrics)


# ------------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_logs(data, tokenizer, tmp_path):
    history = run(tiny_model(), data, tokenizer, tmp_path, epochs=4, plot=True, grad_accum=2)
    assert history[-1]["loss"] < history[0]["loss"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and lines == json.loads(json.dumps(history))
    assert set(lines[0]["val"]) >= {"R@1", "R@5", "R@10", "mAP", "mINP"} and lines[0]["id"] > 0
    assert [r["lr"] for r in lines] == pytest.approx([5e-4, 5e-3, 3.75e-3, 1.25e-3], abs=1e-12)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "best.safetensors").exists()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch_*"))
    assert kept == ["epoch_003.safetensors", "epoch_003.state.pt", "epoch_004.safetensors", "epoch_004.state.pt"]
    fresh = tiny_model()
    pt.load_adapters(fresh.clip, RunFiles(tmp_path).adapters(4))   # a plain adapter file
    with pytest.raises(CheckpointError, match="resume=True"):
        run(tiny_model(), data, tokenizer, tmp_path, epochs=4)


def strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in history]


def adapters(model):
    return {k: v.clone() for k, v in pt.adapter_state_dict(model.clip).items()}


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_reproduces_the_uninterrupted_run(data, tokenizer, tmp_path, workers):
    """2 epochs straight == epoch 1, a fresh process state (new model, RNG disturbed), resume for epoch 2.
    With workers, augmentation is drawn in the workers, seeded from the epoch's generator."""
    options = dict(mask_captions=True, eval_split="test", num_workers=workers)
    straight = tiny_model()
    full = run(straight, data, tokenizer, tmp_path / "a", **options)

    first = run(tiny_model(), data, tokenizer, tmp_path / "b", stop_after=1, **options)
    assert len(first) == 1 and RunFiles(tmp_path / "b").read_latest() == {"epoch": 1}
    with open(tmp_path / "b" / "metrics.jsonl", "a") as handle:   # a record of an epoch that never checkpointed
        handle.write('{"epoch": 2, "partial": true}\n')
    resumed_model = tiny_model()          # same frozen backbone (checkpoints hold adapters only) ...
    torch.manual_seed(1234)
    with torch.no_grad():                 # ... but other adapter values: all must come from the files
        for param in pt.adapter_state_dict(resumed_model.clip).values():
            param.normal_()
    resumed = run(resumed_model, data, tokenizer, tmp_path / "b", resume=True, **options)

    assert strip_times(resumed) == strip_times(full)
    ours, theirs = adapters(resumed_model), adapters(straight)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip_times(logged) == strip_times(json.loads(json.dumps(full)))
    with pytest.raises(CheckpointError, match="changed settings.*lr"):
        run(tiny_model(), data, tokenizer, tmp_path / "b", resume=True, lr=1e-2, **options)


def test_per_step_warmup_ramps_the_lr_and_survives_resume(data, tokenizer, tmp_path, monkeypatch):
    """warmup_steps=4: optimiser step s runs at lr * factor(epoch) * min(1, (s+1)/4), counted over the
    whole run, so a run resumed after epoch 1 takes the same steps at the same lrs."""
    import petl_tpr.tpr.training.trainer as trainer

    seen: dict[str, list[float]] = {}
    real = trainer.build_optimizer

    def recording(modules, config, _out=None):
        optimizer = real(modules, config)
        optimizer.register_step_pre_hook(lambda opt, *_: seen[key].append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", recording)
    options = dict(warmup_steps=4, id_loss=False)
    key = "straight"
    seen[key] = []
    full = run(tiny_model(), data, tokenizer, tmp_path / "a", **options)
    key = "split"
    seen[key] = []
    run(tiny_model(), data, tokenizer, tmp_path / "b", stop_after=1, **options)
    run(tiny_model(), data, tokenizer, tmp_path / "b", resume=True, **options)

    steps = [record["steps"] for record in full]
    assert sum(steps) > 4 and steps[0] < 4            # the ramp crosses the epoch boundary
    want, s = [], 0
    for epoch, n in enumerate(steps):
        for _ in range(n):
            want.append(5e-3 * lr_factor(epoch, epochs=2, warmup_epochs=1, warmup_factor=0.1) * min(1.0, (s + 1) / 4))
            s += 1
    assert seen["straight"] == pytest.approx(want, rel=1e-12) and seen["split"] == seen["straight"]
    assert [r["lr"] for r in full] == pytest.approx([5e-4, 5e-3])   # the recorded per-epoch lr is unchanged
    with pytest.raises(CheckpointError, match="changed settings.*warmup_steps"):
        run(tiny_model(), data, tokenizer, tmp_path / "b", resume=True, warmup_steps=8, id_loss=False)


def test_checkpoints_without_newer_settings_still_resume(data, tokenizer, tmp_path):
    """A checkpoint written before a setting existed (here warmup_steps) resumes as if it held the default."""
    import petl_tpr.tpr.training.trainer as trainer

    config = TrainConfig(out_dir=tmp_path, warmup_epochs=1, epochs=2)
    saved = {k: v for k, v in config.to_json().items() if k != "warmup_steps"}
    trainer._check_resume_config(saved, config, tmp_path)                  # no error
    with pytest.raises(CheckpointError, match="warmup_steps"):
        trainer._check_resume_config(saved, TrainConfig(out_dir=tmp_path, warmup_epochs=1, epochs=2,
                                                        warmup_steps=5), tmp_path)


CHILD = """
import os, signal, sys
sys.path[:0] = [{tests!r}, {checkout!r}]   # this checkout's petl_tpr, not an installed one
import test_tpr_train as t
import petl_tpr.tpr as tpr
import petl_tpr.tpr.training.trainer as train_module

kill_at = int(sys.argv[1])
if kill_at:
    real, calls = train_module.sdm_loss, []
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    train_module.sdm_loss = dying
data = tpr.build_dataset("cuhk-pedes", {root!r})
t.run(t.tiny_model(), data, tpr.ClipTokenizer(), {out!r}, resume=True, **{options!r})
"""


def test_sigkill_mid_epoch_then_resume(data, tokenizer, tmp_path):
    """A process killed with SIGKILL in the middle of epoch 2 resumes (in a new process) to the
    adapters and log of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    options = dict(epochs=3, eval_split="test")
    straight = tiny_model()
    full = run(straight, data, tokenizer, tmp_path / "a", **options)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), checkout=str(Path(__file__).resolve().parents[2]),
                                   root=str(data.root.parent),
                                   out=str(tmp_path / "b"), options=options))
    killed = subprocess.run([sys.executable, str(script), "5"], capture_output=True, text=True)   # 3 batches/epoch
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert RunFiles(tmp_path / "b").read_latest() == {"epoch": 1}
    done = subprocess.run([sys.executable, str(script), "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    resumed = tiny_model()
    pt.load_adapters(resumed.clip, RunFiles(tmp_path / "b").adapters(3))
    ours, theirs = adapters(resumed), adapters(straight)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    logged = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip_times(logged) == strip_times(json.loads(json.dumps(full)))


def test_no_val_split_means_no_evaluation_and_bad_inputs_are_refused(data, tokenizer, tmp_path):
    import dataclasses

    no_val = dataclasses.replace(data, val=None, val_source="none")
    history = run(tiny_model(), no_val, tokenizer, tmp_path / "a", epochs=2, stop_after=1, id_loss=False)
    assert "val" not in history[0] and "test" not in history[0] and history[0]["id"] == 0.0
    assert not (tmp_path / "a" / "best.safetensors").exists()
    bare = tpr.build_clip(tiny_model().clip.config, image_size=(64, 32))
    with pytest.raises(tpr.TaskInputError, match="pt.inject"):
        run(bare, data, tokenizer, tmp_path / "b")
    with pytest.raises(tpr.TaskInputError, match="eval_transform"):
        train(tiny_model(), data, TrainConfig(out_dir=tmp_path / "c"), tokenizer=tokenizer,
              train_transform=tpr.build_train_transform(SIZE))


def bare_model(seed: int = 0) -> tpr.DualEncoder:
    model = tiny_model(seed)
    pt.eject(model.clip)
    return model


def test_whole_model_training_checkpoints_and_resumes(data, tokenizer, tmp_path):
    """trainable='all' (pre-training / full fine-tuning) trains every weight, checkpoints the whole
    state dict and resumes to the same weights as an uninterrupted run."""
    from petl_tpr.tpr.training.run_files import load_weights

    before = {k: v.clone() for k, v in bare_model().clip.state_dict().items()}
    straight = bare_model()
    full = run(straight, data, tokenizer, tmp_path / "a", trainable="all", eval_split="test")
    changed = [k for k, v in straight.clip.state_dict().items() if not torch.equal(v, before[k])]
    assert "text_model.embeddings.token_embedding.weight" in changed and len(changed) > 0.9 * len(before)

    run(bare_model(), data, tokenizer, tmp_path / "b", trainable="all", eval_split="test", stop_after=1)
    resumed = bare_model(seed=5)          # other weights: everything must come from the checkpoint
    again = run(resumed, data, tokenizer, tmp_path / "b", trainable="all", eval_split="test", resume=True)
    assert strip_times(again) == strip_times(full)
    ours, theirs = resumed.clip.state_dict(), straight.clip.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    loaded = bare_model(seed=7)
    load_weights(loaded.clip, tmp_path / "b" / "best.safetensors", full=True)
    assert (tmp_path / "b" / "best.safetensors").exists()
    with pytest.raises(CheckpointError, match="not a whole-model checkpoint"):
        load_weights(loaded.clip, pt.save_adapters(tiny_model().clip, tmp_path / "lora.safetensors"), full=True)
    with pytest.raises(tpr.TaskInputError, match="eject"):
        run(tiny_model(), data, tokenizer, tmp_path / "d", trainable="all")
    with pytest.raises(tpr.TaskInputError, match="trainable"):
        TrainConfig(out_dir=tmp_path, trainable="some")


def test_resume_of_a_named_adapter_set(data, tokenizer, tmp_path):
    """A run whose adapters are a named set (not "default") resumes into the same set of a fresh model."""
    full = run(tiny_model(name="indoor"), data, tokenizer, tmp_path / "a", epochs=2)
    run(tiny_model(name="indoor"), data, tokenizer, tmp_path / "b", epochs=2, stop_after=1)
    resumed_model = tiny_model(name="indoor")
    resumed = run(resumed_model, data, tokenizer, tmp_path / "b", epochs=2, resume=True)
    assert pt.adapter_sets(resumed_model.clip) == ["indoor"]
    assert strip_times(resumed) == strip_times(full)

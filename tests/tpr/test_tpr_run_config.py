"""Run configs: every shipped config matches REFERENCE.md, bad keys are refused, `petl-tpr train` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import petl_tpr as pt
from petl_tpr.tpr.training.run_config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
# REFERENCE.md: UP-Person lr 1e-3 (1e-4 on RSTPReid); DM-Adapter lr 3e-4; batch 128, 60 epochs, masked captions
EXPECTED_LR = {"up_person_cuhk": 1e-3, "up_person_icfg": 1e-3, "up_person_rstp": 1e-4,
               "dm_adapter_cuhk": 3e-4, "dm_adapter_icfg": 3e-4, "dm_adapter_rstp": 3e-4}


def test_every_paper_and_dataset_has_a_config_with_the_reference_values():
    assert {c.stem for c in CONFIGS} == set(EXPECTED_LR)
    for path in CONFIGS:
        config = load_run_config(path)
        assert config.train["lr"] == EXPECTED_LR[path.stem], path.name
        assert config.train["batch_size"] == 128 and config.train["epochs"] == 60
        assert config.train["eps"] == 1e-3 and config.train["weight_decay"] == 4e-5 and config.train["seed"] == 1
        assert config.train["mask_captions"] and config.image_size == (384, 128)
        pt.Spec.preset(config.preset)            # the preset exists and builds
        if path.stem.startswith("up_person"):
            assert config.preset == f"up-person:{config.dataset}"


@pytest.mark.parametrize("text,fragment", [
    ("[run]\npreset='lora'\n", "needs 'dataset'"),
    ("[run]\npreset='lora'\ndataset='rstpreid'\n[train]\nlearning_rate=1\n", "[train] has no key(s) ['learning_rate']"),
    ("[runn]\n", "unknown section [runn]"),
    ("[run\n", "cannot read"),
])
def test_bad_run_configs(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(pt.SpecError) as info:
        load_run_config(path)
    assert fragment in str(info.value)


def test_cli_train_on_synthetic_data_with_a_saved_clip(tmp_path, capsys):
    from petl_tpr.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import CLIPConfig, CLIPModel

    import petl_tpr.tpr as tpr
    from petl_tpr.cli import main

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=16),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        projection_dim=16)).save_pretrained(tmp_path / "clip")
    root = tpr.write_synthetic(tmp_path / "data", identities=8, images_per_id=2, captions_per_image=2,
                               test_fraction=0.25, val_fraction=0.25, seed=1)
    config = tmp_path / "run.toml"
    config.write_text('[run]\npreset = "lora"\ndataset = "cuhk-pedes"\n[model]\nimage_size = [64, 32]\n'
                      '[train]\nepochs = 2\nbatch_size = 4\nwarmup_epochs = 1\nlr = 1e-3\nplot = false\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--data-root", str(root), "--backbone", str(tmp_path / "clip"),
                 "--out", str(out), "--stop-after", "1"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and "R@1" in lines[0]["val"]
    assert main(["train", "--config", str(config), "--data-root", str(root), "--backbone", str(tmp_path / "clip"),
                 "--out", str(out), "--resume"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2

    # petl-tpr eval of best.safetensors on val reproduces the best epoch's logged val metrics.
    best = max(lines, key=lambda r: r["val"]["R@1"])     # first of equal maxima, as the trainer keeps
    capsys.readouterr()
    common = ["--config", str(config), "--data-root", str(root), "--backbone", str(tmp_path / "clip"),
              "--adapters", str(out / "best.safetensors")]
    assert main(["eval", *common, "--split", "val"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["split"] == "val"
    assert {k: printed[k] for k in best["val"]} == pytest.approx(best["val"])
    assert main(["eval", *common]) == 0
    test = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert test["split"] == "test" and test["num_gallery"] == 2 * 2      # 2 test ids x 2 images

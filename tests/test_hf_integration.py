"""petl_tpr.integrations.hf: Trainer checkpoints, resume, save/from_pretrained, accelerate save/load_state.

Tiny CLIPs (width 32, 2 layers, 32x32 images) built from configs, 24 in-memory samples whose images
get noise from the global RNG at every load (so the RNG restore matters), a few steps each.
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import petl_tpr as pt
import petl_tpr.tpr as tpr
from petl_tpr.integrations import hf

from conftest import perturb

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 10000
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=dict(SMALL, image_size=32, patch_size=16),
                        text_config=dict(SMALL, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=VOCAB - 2,
                                         eos_token_id=VOCAB - 1), projection_dim=32)
    return CLIPModel(config).eval()


class Scaled(tpr.DualEncoder):
    """A DualEncoder with one trainable non-adapter parameter (as a task head would be)."""

    def __init__(self, clip):
        super().__init__(clip)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, ids):
        image, text = super().forward(images, ids)
        return image * self.scale, text


def tiny_model(preset: str = "up-person") -> Scaled:
    model = Scaled(tiny_clip())
    pt.inject(model.clip, preset)
    return model


class Noisy(torch.utils.data.Dataset):
    """24 pairs, 12 pids; with `noise`, images get noise from the global RNG at every load (augmentation)."""

    def __init__(self, n: int = 24, noise: bool = True):
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.ids = torch.randint(1, VOCAB - 1, (n, 16), generator=g)
        self.pids = torch.arange(n) // 2
        self.noise = noise

    def __len__(self):
        return len(self.pids)

    def __getitem__(self, i):
        noise = 0.1 * torch.randn(3, 32, 32) if self.noise else 0.0
        return {"images": self.images[i] + noise, "ids": self.ids[i], "labels": self.pids[i]}


def sdm(outputs, labels, num_items_in_batch=None):
    return tpr.sdm_loss(outputs[0], outputs[1], labels)


def trainer_for(model, out: Path, noise: bool = True, eval_dataset=None, **changes):
    settings = dict(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                    lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                    seed=0, disable_tqdm=True, label_names=["labels"], save_strategy="steps")
    return hf.PetlTrainer(model=model, args=TrainingArguments(**{**settings, **changes}),
                          train_dataset=Noisy(noise=noise),
                          eval_dataset=eval_dataset, compute_loss_func=sdm)


def trained_state(model) -> dict[str, torch.Tensor]:
    return {**pt.adapter_state_dict(model.clip), "scale": model.scale.detach()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps (2 epochs of 3 batches), checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    model = tiny_model()
    trainer = trainer_for(model, out)
    trainer.train()
    return out, model, trainer


def test_importable_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['accelerate'] = None\n"
            "import petl_tpr as pt, petl_tpr.integrations.hf as hf\n"
            "assert callable(pt.from_pretrained) and callable(hf.register_accelerate_hooks)\n"
            "try:\n    hf.PetlTrainer\nexcept ImportError:\n    print('needs transformers')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "needs transformers"


def test_checkpoints_hold_only_trainable_tensors(straight_run):
    out, model, _ = straight_run
    folder = out / "checkpoint-3"
    files = {f.name: f.stat().st_size for f in folder.iterdir()}
    assert set(files) == {"adapters.clip.safetensors", "trainable.safetensors", "petl_checkpoint.json", "optimizer.pt",
                          "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
    adapters = pt.adapter_state_dict(model.clip)
    with safe_open(str(folder / "adapters.clip.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(adapters)
        assert pt.Spec.from_json(handle.metadata()["spec"]) == pt.Spec.preset("up-person")
    with safe_open(str(folder / "trainable.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["scale"]
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    base_bytes = sum(t.numel() * t.element_size() for t in tiny_clip().state_dict().values())
    assert adapter_bytes < files["adapters.clip.safetensors"] < adapter_bytes + 32 * 1024
    # Adam keeps two moments per trainable tensor (plus about 250 bytes of records each); nothing of the base
    assert 2 * adapter_bytes < files["optimizer.pt"] < 2 * adapter_bytes + 128 * 1024
    assert sum(files.values()) < 3 * adapter_bytes + 192 * 1024 < base_bytes / 3
    # the last checkpoint holds the final values
    final = pt.load_adapters(copy.deepcopy(tiny_clip()), out / "checkpoint-6" / "adapters.clip.safetensors")
    assert all(torch.equal(v, pt.adapter_state_dict(final)[k]) for k, v in adapters.items())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_run_is_bit_identical(straight_run, tmp_path):
    out, straight, straight_trainer = straight_run
    resumed = tiny_model()
    trainer = trainer_for(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert trainer.state.global_step == 6
    expected, start = trained_state(straight), trained_state(tiny_model())
    assert max((expected[k] - start[k]).abs().max().item() for k in expected) > 1e-3   # training moved them
    assert _same(expected, trained_state(resumed))
    a, b = straight_trainer.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(_same(a[i], b[i]) for i in a)
    assert trainer.lr_scheduler.state_dict() == straight_trainer.lr_scheduler.state_dict()

    # control: without the RNG file the augmentation draws differ, and so does the result
    broken = tmp_path / "no-rng"
    shutil.copytree(out / "checkpoint-3", broken)
    (broken / "rng_state.pth").unlink()
    torch.manual_seed(123)
    other = tiny_model()
    trainer_for(other, tmp_path / "other").train(resume_from_checkpoint=str(broken))
    assert not _same(expected, trained_state(other))


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    """Step 4 of 5 is inside the second epoch: the Trainer skips the epoch's first batch on resume.
    (No global-RNG augmentation here: accelerate's loader fetches one batch ahead, so at a mid-epoch
    save the next batch's draws are already taken; see docs/integrations.md.)"""
    straight = tiny_model()
    trainer_for(straight, tmp_path / "a", noise=False, max_steps=5, save_steps=4).train()
    resumed = tiny_model()
    trainer_for(resumed, tmp_path / "b", noise=False, max_steps=5, save_steps=4).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert _same(trained_state(straight), trained_state(resumed))


def test_resume_refusals(straight_run, tmp_path):
    out, _, _ = straight_run
    with pytest.raises(pt.InputError, match="nothing is injected"):
        trainer_for(Scaled(tiny_clip()), tmp_path / "a")
    with pytest.raises(pt.CheckpointError):     # another spec: keys and shapes do not fit
        trainer_for(tiny_model("lora"), tmp_path / "b").train(resume_from_checkpoint=str(out / "checkpoint-3"))
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save({}, plain / "model.safetensors")
    with pytest.raises(pt.CheckpointError, match="not a checkpoint written by PetlTrainer"):
        trainer_for(tiny_model(), tmp_path / "c").train(resume_from_checkpoint=str(plain))


def _features(model: CLIPModel, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, ids = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, VOCAB - 1, (2, 16), generator=g)
    with torch.no_grad():
        out = model(pixel_values=images, input_ids=ids)
    return torch.cat([out.image_embeds, out.text_embeds])


@pytest.mark.parametrize("preset", ["up-person", "unipt"])
def test_save_pretrained_round_trip_is_exact(preset, tmp_path):
    model = tiny_clip()
    base_keys = set(model.state_dict())
    pt.inject(model, preset)
    perturb(model)
    expected = _features(model)
    assert not torch.equal(expected, _features(tiny_clip()))     # the adapters change the outputs
    folder = pt.save_pretrained(model, tmp_path / "saved")
    assert {f.name for f in folder.iterdir()} == {"config.json", "model.safetensors", "adapters.safetensors",
                                                  "petl_checkpoint.json"}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) <= base_keys and len(base_keys - set(handle.keys())) <= 2   # (+ position ids)
    back = pt.from_pretrained(CLIPModel, folder)
    assert torch.equal(_features(back), expected)
    assert sorted(pt.adapter_state_dict(back)) == sorted(pt.adapter_state_dict(model))

    # the patched method writes the same folder, also on a deep copy or an unpickled copy (bound to it)
    patched = copy.deepcopy(hf.patch_save_pretrained(model))
    assert hf.is_patched(patched) and patched.save_pretrained.model is patched
    unpickled = pickle.loads(pickle.dumps(model))
    assert hf.is_patched(unpickled) and unpickled.save_pretrained.model is unpickled
    patched.save_pretrained(tmp_path / "patched")
    assert torch.equal(_features(pt.from_pretrained(CLIPModel, tmp_path / "patched")), expected)


def test_inject_patches_save_pretrained_and_the_unpatched_folder_is_refused_on_load(tmp_path):
    model = tiny_clip()
    pt.inject(model, "up-person")
    assert hf.is_patched(model), "inject makes model.save_pretrained keep the adapters"
    perturb(model)
    expected = _features(model)
    model.save_pretrained(tmp_path / "split")
    assert torch.equal(_features(pt.from_pretrained(CLIPModel, tmp_path / "split")), expected)
    CLIPModel.save_pretrained(model, tmp_path / "raw")      # transformers' own method, called past the patch
    # what transformers does with that folder: the adapters are dropped (UNEXPECTED keys, a warning)
    assert torch.equal(_features(CLIPModel.from_pretrained(tmp_path / "raw")), _features(tiny_clip()))
    with pytest.raises(pt.CheckpointError, match="patch_save_pretrained"):
        pt.from_pretrained(CLIPModel, tmp_path / "raw")
    assert torch.equal(_features(pt.from_pretrained(CLIPModel, tmp_path / "raw", spec="up-person")), expected)
    with pytest.raises(pt.CheckpointError, match="do not fit the given spec"):
        pt.from_pretrained(CLIPModel, tmp_path / "raw", spec="lora")
    tiny_clip().save_pretrained(tmp_path / "plain")
    with pytest.raises(pt.CheckpointError, match="holds no adapters"):
        pt.from_pretrained(CLIPModel, tmp_path / "plain")
    with pytest.raises(pt.InputError, match="state_dict"):
        pt.save_pretrained(model, tmp_path / "x", state_dict={})


def test_trainer_patches_save_pretrained(straight_run, tmp_path):
    _, model, _ = straight_run
    assert hf.is_patched(model.clip)
    model.clip.save_pretrained(tmp_path / "after")
    assert (tmp_path / "after" / "adapters.safetensors").is_file()


def test_accelerate_round_trip_is_bit_identical(tmp_path):
    accelerate = pytest.importorskip("accelerate")

    def run(steps: int, *, save_at: int | None = None, load: Path | None = None):
        accelerator = accelerate.Accelerator(cpu=True)
        hf.register_accelerate_hooks(accelerator)
        accelerate.utils.set_seed(0)
        model = tiny_model()
        head = torch.nn.Linear(32, 32)                     # a second prepared model, nothing injected
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
        loader = torch.utils.data.DataLoader(Noisy(), batch_size=8, shuffle=True)
        model, head, optimizer, schedule, loader = accelerator.prepare(model, head, optimizer, schedule, loader)
        step = 0
        if load is not None:
            accelerator.load_state(str(load))
            step = 3
        while step < steps:
            for batch in loader:
                image, text = model(batch["images"], batch["ids"])
                accelerator.backward(sdm((image, head(text)), batch["labels"]))
                optimizer.step(), schedule.step(), optimizer.zero_grad()
                step += 1
                if step == save_at:                        # an epoch boundary (3 batches per epoch)
                    accelerator.save_state(str(tmp_path / "state"))
        return accelerator.unwrap_model(model), accelerator.unwrap_model(head)

    model, head = run(6, save_at=3)
    saved = tmp_path / "state"
    assert (saved / "petl_model_0" / "adapters.clip.safetensors").is_file()
    with safe_open(str(saved / "model.safetensors"), framework="pt") as handle:   # the head, by accelerate
        assert sorted(handle.keys()) == ["bias", "weight"]
    assert not (saved / "model_1.safetensors").exists()
    again, again_head = run(6, load=saved)
    assert _same(trained_state(model), trained_state(again))
    assert torch.equal(head.weight, again_head.weight)


def test_nothing_injected_or_all_merged_is_refused(tmp_path):
    with pytest.raises(pt.CheckpointError, match="nothing is injected"):
        hf.save_adapter_folder(tiny_clip(), tmp_path)
    model = tiny_clip()
    pt.inject(model, "lora")
    pt.merge(model)
    with pytest.raises(pt.CheckpointError, match="merged"):
        hf.save_adapter_folder(model, tmp_path)
    assert not (tmp_path / "petl_checkpoint.json").exists()


def test_example_train_with_hf_trainer(tmp_path):
    """The example at a tiny size: the listed checkpoint has adapters and no base weights, the run resumes
    where it stopped, and the from_pretrained copy gives the same metrics."""
    args = ["--steps", "12", "--pretrain-steps", "6", "--identities", "12", "--batch-size", "16"]
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "train_with_hf_trainer.py"), str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    listing = dict(re.findall(r"^  (\S+)\s+([\d.]+) KiB$", text, flags=re.M))
    assert {"adapters.clip.safetensors", "optimizer.pt", "rng_state.pth", "petl_checkpoint.json"} <= set(listing)
    assert "model.safetensors" not in listing
    assert float(listing["adapters.clip.safetensors"]) < 1024
    assert re.search(r"^\[resumed\] steps 7\.\.12,", text, flags=re.M)
    assert re.search(r"^from_pretrained gives the same metrics: True$", text, flags=re.M)
    assert re.search(r"^up-person \(target\)\s+R@1\s+[\d.]+", text, flags=re.M)


def test_load_best_model_at_end(tmp_path):
    """The best checkpoint is loaded back at the end of training. "Best" is the highest eval loss here, so
    that it is the first checkpoint and loading it changes the model (the eval loss falls from 3 to 6)."""
    model = tiny_model()
    trainer = trainer_for(model, tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3,
                          load_best_model_at_end=True,
                          metric_for_best_model="loss", greater_is_better=True, eval_dataset=Noisy(noise=False))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-3"
    expected = pt.load_adapters(tiny_clip(), best / "adapters.clip.safetensors")
    last = pt.load_adapters(tiny_clip(), tmp_path / "checkpoint-6" / "adapters.clip.safetensors")
    assert _same(pt.adapter_state_dict(expected), pt.adapter_state_dict(model.clip))
    assert not _same(pt.adapter_state_dict(last), pt.adapter_state_dict(model.clip))

"""Train UP-Person with `transformers.Trainer` on the synthetic domains, with adapter-only checkpoints.

Run: python examples/train_with_hf_trainer.py [OUT_DIR] [--steps 300] [--pretrain-steps 300]
No download; about 20 s on 2 CPU cores (OMP_NUM_THREADS=1 on busy cores, docs/integrations.md). Steps:

1. draws the two synthetic domains (`tpr.write_synthetic`): a source (domain 0) and a target (domain 1);
2. pre-trains a small randomly initialised CLIP on the source with the plain `transformers.Trainer`
   (every weight trains, nothing is saved), so that the transfer starts from a model that knows the task;
3. injects UP-Person (`pt.inject(model.clip, "up-person")`) and trains it on the target with
   `pt.integrations.hf.PetlTrainer` and the project's SDM loss; a callback stops the run half-way,
   as a crash would, and the checkpoint folder is listed with file sizes: adapters (with their
   spec), optimiser, scheduler, RNG and trainer state, and no base weights;
4. resumes as a rerun of the script would (a fresh copy of the pre-trained model, the same
   injection, a new PetlTrainer) with `train(resume_from_checkpoint=...)`, and finishes the run;
5. evaluates with the project's metrics (`tpr.evaluate`: R@1/5/10, mAP, mINP on the target test
   split) against zero-shot, then `pt.save_pretrained` + `pt.from_pretrained(tpr.load_clip, ...)`
   and evaluates the reloaded model (the same numbers).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers on CPU-only torch

import torch  # noqa: E402
from transformers import CLIPConfig, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import petl_tpr as pt  # noqa: E402
import petl_tpr.tpr as tpr  # noqa: E402
from petl_tpr.integrations.hf import PetlTrainer  # noqa: E402

IMAGE_SIZE = (128, 48)      # (H, W): 8 x 3 patches of 16
CONTEXT = 32                # caption length in tokens

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", help="output folder (default: a temporary one)")
parser.add_argument("--steps", type=int, default=300, help="UP-Person training steps")
parser.add_argument("--pretrain-steps", type=int, default=300, help="full pre-training steps on the source domain")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--identities", type=int, default=100, help="identities per domain")
args = parser.parse_args()
out = Path(args.out or tempfile.mkdtemp(prefix="hf_trainer_"))
began = time.perf_counter()
torch.manual_seed(0)


def elapsed() -> str:
    return f"{time.perf_counter() - began:5.1f} s"


# 1. data: both domains, CUHK-PEDES layout
common = dict(identities=args.identities, images_per_id=4, captions_per_image=2, overwrite=True)
source = tpr.build_dataset("cuhk-pedes", tpr.write_synthetic(out / "data" / "source", domain=0,
                                                             caption_domains=(0, 1), seed=0, **common))
target = tpr.build_dataset("cuhk-pedes", tpr.write_synthetic(out / "data" / "target", domain=1, seed=1, **common))
tokenizer = tpr.ClipTokenizer(context_length=CONTEXT)
size = tpr.TransformConfig(height=IMAGE_SIZE[0], width=IMAGE_SIZE[1], padding=4)
test_transform = tpr.build_test_transform(size)


class Pairs(torch.utils.data.Dataset):
    """The training pairs of a split as the DualEncoder's forward arguments plus `labels` (the pids).

    Images are decoded and transformed once (the test transform, no augmentation) and kept in memory,
    so that the steps, not the PNG decoding, take the time of this example.
    """

    def __init__(self, data):
        self.samples = data.train
        self.images = {p: test_transform(tpr.load_image(p)) for p in sorted({s.path for s in self.samples})}
        self.ids = tokenizer([s.caption for s in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        return {"images": self.images[sample.path], "ids": self.ids[index], "labels": torch.tensor(sample.pid)}


source_pairs, target_pairs = Pairs(source), Pairs(target)
print(f"[data] source {len(source.train)} / target {len(target.train)} training captions, target test "
      f"{len(target.test.captions)} queries x {len(target.test.image_paths)} images ({elapsed()})")

def sdm(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    image_features, text_features = outputs
    return tpr.sdm_loss(image_features, text_features, labels)


def training_args(folder: Path, steps: int, lr: float, **changes) -> TrainingArguments:
    settings = dict(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=lr,
                    lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, logging_steps=50,
                    seed=0, use_cpu=True, report_to="none", disable_tqdm=True, label_names=["labels"],
                    dataloader_num_workers=0, save_strategy="no")
    return TrainingArguments(**{**settings, **changes})


def metrics_line(name: str, model) -> dict:
    m = tpr.evaluate(model, target.test, tokenizer=tokenizer, transform=test_transform, progress=False)
    print(f"{name:<24} R@1 {m['R@1']:5.1f}  R@5 {m['R@5']:5.1f}  R@10 {m['R@10']:5.1f}  mAP {m['mAP']:5.1f}  "
          f"mINP {m['mINP']:5.1f}")
    return m


class StopAt(TrainerCallback):
    """Ends training after `step` steps without changing the schedule (stands in for a crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, train_args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


# 2. a small CLIP, pre-trained in full on the source domain with the plain Trainer
tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
config = CLIPConfig(vision_config=dict(tower, image_size=IMAGE_SIZE[0], patch_size=16),
                    text_config=dict(tower, vocab_size=tpr.VOCAB_SIZE, max_position_embeddings=CONTEXT,
                                     bos_token_id=tpr.SOT_ID, eos_token_id=tpr.EOT_ID, pad_token_id=0),
                    projection_dim=64)
model = tpr.build_clip(config, image_size=IMAGE_SIZE)
# the 49,408 x 64 token embedding (94% of the weights) keeps its random values: it would take most of the
# optimiser's time, and a fixed random code per token is enough for these captions
model.clip.text_model.embeddings.token_embedding.weight.requires_grad_(False)
Trainer(model=model, args=training_args(out / "pretrain", args.pretrain_steps, 1e-3), train_dataset=source_pairs,
        compute_loss_func=sdm).train()
pretrained = copy.deepcopy(model).eval()
print(f"[pretrain] {args.pretrain_steps} steps, every weight but the token embedding ({elapsed()})")
zero_shot = metrics_line("zero-shot (target)", pretrained)

# 3. UP-Person on the target with PetlTrainer, stopped half-way
pt.inject(model.clip, "up-person")
print(pt.summary(model.clip))
half = args.steps // 2
run_dir = out / "up-person"
petl_args = training_args(run_dir, args.steps, 3e-3, save_strategy="steps", save_steps=half, save_total_limit=2)
PetlTrainer(model=model, args=petl_args, train_dataset=target_pairs, compute_loss_func=sdm,
            callbacks=[StopAt(half)]).train()
checkpoint = run_dir / f"checkpoint-{half}"
base_mb = sum(t.numel() * t.element_size() for t in pretrained.state_dict().values()) / 2**20
print(f"[stopped] after step {half} ({elapsed()}); {checkpoint} (base weights would be {base_mb:.1f} MiB):")
for file in sorted(checkpoint.iterdir()):
    print(f"  {file.name:<28} {file.stat().st_size / 2**10:9.1f} KiB")

# 4. resume as a rerun of the same script would: the pre-trained base, the same injection, the checkpoint
resumed = copy.deepcopy(pretrained)
pt.inject(resumed.clip, "up-person")
trainer = PetlTrainer(model=resumed, args=petl_args, train_dataset=target_pairs, compute_loss_func=sdm)
result = trainer.train(resume_from_checkpoint=str(checkpoint))
print(f"[resumed] steps {half + 1}..{trainer.state.global_step}, train_loss {result.training_loss:.3f} ({elapsed()})")

# 5. metrics, then the save_pretrained / from_pretrained round trip
resumed.eval()
trained = metrics_line("up-person (target)", resumed)
folder = pt.save_pretrained(resumed.clip, out / "final")
print(f"[save_pretrained] {folder}: " + ", ".join(f"{f.name} {f.stat().st_size / 2**10:.0f} KiB"
                                                 for f in sorted(folder.iterdir()) if f.is_file()))
reloaded = pt.from_pretrained(tpr.load_clip, folder, target="clip", image_size=None)
again = metrics_line("from_pretrained (target)", reloaded)
print(f"from_pretrained gives the same metrics: {again == trained}")
print(f"R@1 gain over zero-shot: {trained['R@1'] - zero_shot['R@1']:+.1f} ({elapsed()} in all)")

"""Train UP-Person, DM-Adapter or UniPT adapters on a person-retrieval dataset with `petl_tpr.tpr`.

Run: python examples/train_on_dataset.py [OUT_DIR] [--preset up-person|dm-adapter|unipt]
       no --data-root: writes a small synthetic CUHK-PEDES-layout set and trains a tiny random CLIP
       for 2 epochs (well under a minute on a CPU);
     python examples/train_on_dataset.py runs/ex --preset up-person --data-root /data --dataset cuhk-pedes \
         --backbone openai/clip-vit-base-patch16 --epochs 60 --batch-size 128
       (or --backbone ViT-B-16 --pretrained openai for open_clip; a GPU run: see docs/reproduce.md)
Prints the trainable-parameter summary, one line per epoch (loss, validation R@1), the test
metrics of the final adapters (R@1, R@5, R@10, mAP, mINP) and the run directory's files.
"""

import argparse
import json
import tempfile
from pathlib import Path

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers/open_clip on CPU-only torch

import torch  # noqa: E402

import petl_tpr as pt  # noqa: E402
import petl_tpr.tpr as tpr  # noqa: E402

LR = {"up-person": 1e-3, "dm-adapter": 3e-4, "unipt": 1e-3}   # the papers' lr; UniPT has no TPR recipe
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", default=None, help="folder for the run (default: a temp dir)")
parser.add_argument("--preset", choices=sorted(LR), default="up-person")
parser.add_argument("--data-root", default=None, help="folder holding CUHK-PEDES/, ICFG-PEDES/ or RSTPReid/")
parser.add_argument("--dataset", default="cuhk-pedes", help="cuhk-pedes | icfg-pedes | rstpreid")
parser.add_argument("--backbone", default=None, help="anything tpr.load_clip takes (default: tiny random CLIP)")
parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file, e.g. openai")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

out = Path(args.out or tempfile.mkdtemp(prefix="petl_tpr_example_"))
if args.data_root is None:       # 16 identities x 2 images x 2 captions, 25% test and 25% validation ids
    args.data_root = tpr.write_synthetic(out / "synthetic", identities=16, images_per_id=2, captions_per_image=2,
                                         test_fraction=0.25, val_fraction=0.25, seed=0, overwrite=True)
data = tpr.build_dataset(args.dataset, args.data_root, val_fraction=0.1 if "icfg" in args.dataset else 0.0)
if args.backbone:                # pretrained weights, position embedding resized to 384 x 128
    model = tpr.load_clip(args.backbone, pretrained=args.pretrained)
else:
    from transformers import CLIPConfig

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = tpr.build_clip(CLIPConfig(vision_config=dict(small, image_size=32, patch_size=16),
                                      text_config=dict(small, max_position_embeddings=77), projection_dim=16),
                           image_size=(64, 32))
preset = f"up-person:{data.name}" if args.preset == "up-person" else args.preset   # per-dataset rank and length
pt.inject(model.clip, preset)    # both towers; everything else frozen
print(pt.summary(model.clip))

size = tpr.TransformConfig(height=model.image_size[0], width=model.image_size[1])
lr = 1e-4 if preset == "up-person:rstpreid" else LR[args.preset]
config = tpr.TrainConfig(out_dir=out / f"run_{args.preset}", epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                         warmup_epochs=min(5, args.epochs - 1), mask_captions=True, progress=False)
tokenizer = tpr.ClipTokenizer()
history = tpr.train(model, data, config, tokenizer=tokenizer, train_transform=tpr.build_train_transform(size),
                    eval_transform=tpr.build_test_transform(size), device=args.device,
                    resume=True)         # resume: a stopped run continues from its last checkpoint
for record in history:
    val = record.get("val", {}).get("R@1")
    print(f"epoch {record['epoch']}: loss {record['loss']:.4f} (sdm {record['sdm']:.4f}, aux {record['aux']:.4f})"
          + (f", val R@1 {val:.2f}" if val is not None else ""))
test = tpr.evaluate(model, data.test, tokenizer=tokenizer, transform=tpr.build_test_transform(size),
                    amp=args.device.startswith("cuda"))
print("test:", json.dumps({k: round(v, 2) for k, v in test.items()}))
print(f"run directory {config.out_dir}:", sorted(str(p.relative_to(config.out_dir)) for p in config.out_dir.rglob("*")
                                                if p.is_file()))

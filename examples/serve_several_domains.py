"""Serve several domains from one frozen CLIP: one adapter set per domain, mixed row by row in one batch.

Run: python examples/serve_several_domains.py [--out DIR] [--steps 120] [--pretrain-steps 200]
No download; about 26 s of CPU time on one thread (30 to 40 s wall-clock on busy shared cores). Steps:

1. draws three synthetic person-retrieval domains (`tpr.write_synthetic`, docs/tpr.md): "night"
   (domain 2) to pre-train on, "indoor" (domain 0) and "outdoor" (domain 1) to serve;
2. pre-trains a tiny randomly initialised CLIP briefly, in full, on "night" (a stand-in for CLIP's
   own pre-training; at this size and length it learns little, so the bare backbone stays near
   chance on the served domains), then freezes it;
3. trains one UP-Person adapter set per served domain on that one frozen CLIP:
   `pt.inject(clip, spec, name="indoor")`, train; `pt.inject(clip, spec, name="outdoor")` (the new set
   becomes the only active one, "indoor" stays attached and inert, its parameters frozen), train;
   each set is saved to its own file (`pt.save_adapters(clip, path, name=...)`);
4. loads both files into a fresh copy of the pre-trained CLIP, each under its stored name, and runs
   one mixed batch (captions and images of both domains, one row on the bare backbone) under
   `pt.per_sample`, checking every row against the same row run with its set alone (`pt.activate`)
   or, for the bare row, under `pt.disabled`;
5. prints text -> image R@1 (`tpr.evaluate`) of the bare backbone and of each set on each domain's
   test split: each domain is best served by its own set.

The training loop is a few lines over pre-decoded images (the steps, not PNG decoding, take the
time) with the project's SDM loss and optimiser; `tpr.train` (epochs, run folders, checkpoints) and
`pt.integrations.hf.PetlTrainer` train a set the same way. See docs/adapter_sets.md.
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
from transformers import CLIPConfig  # noqa: E402

import petl_tpr as pt  # noqa: E402
import petl_tpr.tpr as tpr  # noqa: E402

IMAGE_SIZE = (128, 48)      # (H, W): 8 x 3 patches of 16
CONTEXT = 32                # caption length in tokens
SOURCE = ("night", 2)                              # pre-training domain
SERVED = {"indoor": 0, "outdoor": 1}               # set name -> synthetic domain it is trained on and serves


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="output folder, as --out")
    parser.add_argument("--out", help="output folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=120, help="training steps of each adapter set")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="full pre-training steps on the source domain")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--identities", type=int, default=60, help="identities per domain (20%% form its test split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def build_clip() -> tpr.DualEncoder:
    """A tiny randomly initialised transformers CLIP (2 layers of width 64 per tower) as a DualEncoder."""
    torch.manual_seed(0)
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(vision_config=dict(tower, image_size=IMAGE_SIZE[0], patch_size=16),
                        text_config=dict(tower, vocab_size=tpr.VOCAB_SIZE, max_position_embeddings=CONTEXT,
                                         bos_token_id=tpr.SOT_ID, eos_token_id=tpr.EOT_ID, pad_token_id=0),
                        projection_dim=64)
    return tpr.build_clip(config, image_size=IMAGE_SIZE)


class Pairs:
    """A split's training pairs, images decoded and transformed once (test transform) and kept in memory."""

    def __init__(self, data, tokenizer, transform):
        samples = data.train
        images = {p: transform(tpr.load_image(p)) for p in sorted({s.path for s in samples})}
        self.images = torch.stack([images[s.path] for s in samples])
        self.ids = tokenizer([s.caption for s in samples])
        self.pids = torch.tensor([s.pid for s in samples])

    def batches(self, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        while True:
            for rows in torch.randperm(len(self.pids), generator=generator).split(size):
                if len(rows) > 1:
                    yield self.images[rows], self.ids[rows], self.pids[rows]


def fit(model: tpr.DualEncoder, pairs: Pairs, *, steps: int, lr: float, batch_size: int, seed: int = 0) -> float:
    """`steps` Adam steps on SDM (+ router aux loss) over what requires grad, batches drawn with `seed`;
    returns the last loss."""
    optimizer = tpr.build_optimizer([model], tpr.OptimConfig(lr=lr, eps=1e-8, weight_decay=0.0, epochs=1,
                                                             warmup_epochs=0))
    model.train()
    loss = torch.zeros(())
    for _, (images, ids, pids) in zip(range(steps), pairs.batches(batch_size, seed=seed)):
        image_features, text_features = model(images, ids)
        loss = tpr.sdm_loss(image_features, text_features, pids) + pt.aux_loss(model.clip)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def mixed_batch(tests: dict, tokenizer, transform, per_domain: int = 3):
    """`per_domain` test captions (with the image each describes) of each served domain, interleaved,
    plus one more "indoor" pair for the bare backbone (set None); returns (images, ids, set names)."""
    rows = [(name, i) for i in range(per_domain) for name in tests] + [("indoor", per_domain)]
    names = [name for name, _ in rows[:-1]] + [None]
    images = torch.stack([transform(tpr.load_image(tests[name].image_paths[tests[name].caption_image_index[i]]))
                          for name, i in rows])
    return images, tokenizer([tests[name].captions[i] for name, i in rows]), names


def main(argv=None) -> dict:
    """Run the example (argv as on the command line); returns the R@1 table, the parity check and the files."""
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    out = Path(args.out or args.out_dir or tempfile.mkdtemp(prefix="serve_domains_"))

    def elapsed() -> str:
        return f"{time.perf_counter() - began:4.1f} s"

    # 1. data
    tokenizer = tpr.ClipTokenizer(context_length=CONTEXT)
    transform = tpr.build_test_transform(tpr.TransformConfig(height=IMAGE_SIZE[0], width=IMAGE_SIZE[1], padding=4))
    common = dict(identities=args.identities, images_per_id=4, captions_per_image=2, overwrite=True)
    source = tpr.build_dataset("cuhk-pedes", tpr.write_synthetic(out / "data" / SOURCE[0], domain=SOURCE[1],
                                                                 caption_domains=(0, 1, 2), seed=2, **common))
    served = {name: tpr.build_dataset("cuhk-pedes", tpr.write_synthetic(out / "data" / name, domain=domain,
                                                                        seed=domain, **common))
              for name, domain in SERVED.items()}
    tests = {name: data.test for name, data in served.items()}
    print(f"[data] {SOURCE[0]} (domain {SOURCE[1]}) to pre-train; "
          + ", ".join(f"{name} (domain {SERVED[name]}): {len(d.train)} training captions, test "
                      f"{len(d.test.captions)} queries x {len(d.test.image_paths)} images" for name, d in served.items())
          + f" ({elapsed()})")

    # 2. a tiny CLIP, pre-trained in full on the source domain, then frozen
    model = build_clip()
    # the 49,408 x 64 token embedding keeps its random values (a fixed random code per token is enough here)
    model.clip.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    loss = fit(model, Pairs(source, tokenizer, transform), steps=args.pretrain_steps, lr=3e-4,
               batch_size=args.batch_size, seed=args.seed)
    pretrained = copy.deepcopy(model)
    print(f"[pretrain] {args.pretrain_steps} steps on {SOURCE[0]}, loss {loss:.3f} ({elapsed()})")

    # 3. one adapter set per served domain on the one frozen CLIP, each saved to its own file
    spec = pt.Spec.preset("up-person")
    files = {}
    for name, data in served.items():
        torch.manual_seed(SERVED[name])
        pt.inject(model.clip, spec, name=name)     # the new set is the only active one; the others are inert
        assert pt.active_sets(model.clip) == [name]
        loss = fit(model, Pairs(data, tokenizer, transform), steps=args.steps, lr=3e-3, batch_size=args.batch_size,
                   seed=args.seed + 1 + SERVED[name])
        files[name] = pt.save_adapters(model.clip, out / f"{name}.safetensors", name=name)
        print(f"[train] set {name!r}: {args.steps} steps on domain {SERVED[name]}, loss {loss:.3f}, "
              f"{pt.summary(model.clip).trainable:,} trainable -> {files[name].name} "
              f"({files[name].stat().st_size / 2**10:.0f} KiB) ({elapsed()})")

    # 4. a fresh copy of the frozen CLIP, both sets loaded under their names, one mixed batch
    fresh = copy.deepcopy(pretrained)
    for path in files.values():
        pt.load_adapters(fresh.clip, path)
    fresh.eval()
    print(f"[load] sets {pt.adapter_sets(fresh.clip)}, active {pt.active_sets(fresh.clip)} (the last loaded); "
          + ", ".join(f"{name}: {params:,} parameters, {trainable:,} require grad"
                      for name, _, params, trainable in pt.summary(fresh.clip).sets))
    images, ids, names = mixed_batch(tests, tokenizer, transform)
    with torch.no_grad():
        with pt.per_sample(fresh.clip, names):
            mixed = fresh(images, ids)
        alone = {}
        for name in SERVED:
            pt.activate(fresh.clip, name)
            alone[name] = fresh(images, ids)
        with pt.disabled(fresh.clip):
            alone[None] = fresh(images, ids)
    diff = max(float((m[i] - alone[n][t][i]).abs().max()) for i, n in enumerate(names)
               for t, m in enumerate(mixed))
    parity = diff < 1e-5
    print(f"[per_sample] one batch of {len(names)} rows, sets {names}: every row (image and text features) "
          f"equals its set run alone: {parity} (max |difference| {diff:.1e})")

    # 5. R@1 of the bare backbone and of each set on each served domain
    def r1(split) -> float:
        return tpr.evaluate(fresh, split, tokenizer=tokenizer, transform=transform, progress=False)["R@1"]

    table: dict[str, dict[str, float]] = {}
    with pt.disabled(fresh.clip):
        table["bare backbone"] = {domain: r1(split) for domain, split in tests.items()}
    for name in SERVED:
        pt.activate(fresh.clip, name)
        table[f"set {name}"] = {domain: r1(split) for domain, split in tests.items()}
    width = max(map(len, table)) + 2
    lines = [f"text -> image R@1 (%) on each domain's test split",
             f"{'':<{width}}" + "".join(f"{d:>10}" for d in tests)]
    lines += [f"{row:<{width}}" + "".join(f"{v:>10.1f}" for v in values.values()) for row, values in table.items()]
    best = {domain: max(SERVED, key=lambda n: table[f"set {n}"][domain]) for domain in tests}
    lines.append("best set per domain: " + ", ".join(f"{d} -> {n}" for d, n in best.items()))
    print("\n".join(lines))
    seconds = time.perf_counter() - began
    print(f"done in {seconds:.1f} s; adapter files in {out}")
    return {"table": table, "best": best, "parity": parity, "max_diff": diff, "files": files, "seconds": seconds}


if __name__ == "__main__":
    main()

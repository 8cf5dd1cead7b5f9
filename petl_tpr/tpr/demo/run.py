"""`petl-tpr demo`: pre-train a small CLIP-style dual encoder on synthetic domain 0, then transfer it
to domain 1 with zero-shot, full fine-tuning and the PETL presets, on any machine, without downloads;
every transferred model is also evaluated on domain 2, which no model trains on.

    results = run_demo(DemoConfig(out_dir="runs/demo"))   # list of per-method result dicts

Steps (each in its own run directory under `out_dir`):

1. data: `write_synthetic` writes the source set (domain-0 images; captions in both domains'
   wordings, so the pre-trained text tower knows every word, as CLIP's web captions do) and the
   target set (domain-1 images and wording) and the unseen set (domain 2: its own looks and
   sentences, the words of the other two; only its test split is used) in CUHK-PEDES format;
2. `pretrain/`: a randomly initialised CLIP (transformers `CLIPConfig` or open_clip config dict)
   trained in full on the source set;
3. `zero-shot`: the pre-trained model evaluated on the target test split;
4. one directory per method: a copy of the pre-trained model, the preset injected into both
   towers (full fine-tuning trains everything), trained on the target train split and evaluated
   once at the end on the target test split (no epoch selection on test) and on the unseen test
   split; the top-5 gallery images of `examples` fixed target test captions are kept for the
   retrieval pictures (`pictures.py`).

Every finished step writes `result.json`; a later run with the same settings reuses it, so an
interrupted demo continues where it stopped (`fresh=True` starts over). The report (table, JSON,
plot of R@1 against trainable parameters, target and unseen) is in `report.py`; `seeds.py` runs
several seeds and reports mean and spread.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...atomic import write_atomic
from ...memory import PeakMemory, training_memory_mb
from ..errors import TaskInputError, check_int

METHODS = ("zero-shot", "full fine-tuning", "lora", "up-person", "dm-adapter", "unipt")
BACKBONES = ("transformers", "open_clip")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedule of the demo. The defaults finish in a few minutes on 2 CPU cores;
    `DemoConfig.quick()` is a smoke-test size."""

    out_dir: Path = Path("runs/demo")
    backbone: str = "transformers"
    methods: tuple[str, ...] = METHODS
    source_identities: int = 300
    target_identities: int = 200
    unseen_identities: int = 50     # 80% of them (40) form the unseen test split; the rest go unused
    examples: int = 4               # fixed target test captions in the retrieval pictures
    images_per_id: int = 4
    captions_per_image: int = 2
    width: int = 128
    layers: int = 4
    heads: int = 4
    patch_size: int = 16
    image_size: tuple[int, int] = (128, 48)
    context_length: int = 48
    pretrain_epochs: int = 16
    transfer_epochs: int = 10
    batch_size: int = 64
    pretrain_lr: float = 1e-3
    full_lr: float = 3e-4       # the whole network moves with small steps ...
    petl_lr: float = 3e-3       # ... adapters start at zero and take larger ones (as in the papers)
    seed: int = 0
    device: str | None = None   # default: cuda when available, else cpu
    threads: int | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "image_size", tuple(self.image_size))
        if self.backbone not in BACKBONES:
            raise TaskInputError(f"DemoConfig.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise TaskInputError(f"DemoConfig.methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        for name in ("source_identities", "target_identities", "unseen_identities", "examples", "images_per_id",
                     "captions_per_image", "width", "layers", "heads", "patch_size", "context_length",
                     "pretrain_epochs", "transfer_epochs", "batch_size"):
            check_int(f"DemoConfig.{name}", getattr(self, name))
        if self.width % self.heads:
            raise TaskInputError(f"DemoConfig.width ({self.width}) must be a multiple of heads ({self.heads})")
        if any(s % self.patch_size for s in self.image_size):
            raise TaskInputError(f"DemoConfig.image_size {self.image_size} must be a multiple of the patch size")

    @classmethod
    def quick(cls, out_dir: str | Path, **changes) -> "DemoConfig":
        """A tiny demo (seconds): for tests and a first look."""
        settings = dict(source_identities=24, target_identities=16, unseen_identities=5, images_per_id=2, width=32,
                        layers=2, heads=2, image_size=(64, 32), pretrain_epochs=2, transfer_epochs=1, batch_size=16)
        return cls(out_dir=out_dir, **{**settings, **changes})

    def settings(self, *, pretrain: bool = False) -> dict:
        """What a cached step must have been computed with: everything but where and how it prints
        (and, for the pre-training, the transfer settings)."""
        out = asdict(self)
        dropped = ("out_dir", "methods", "threads", "progress") + (_TRANSFER_ONLY if pretrain else ())
        for key in dropped:
            out.pop(key)
        out["image_size"] = list(self.image_size)
        return out


_TRANSFER_ONLY = ("transfer_epochs", "full_lr", "petl_lr", "unseen_identities", "examples")
UNSEEN_TEST_FRACTION = 0.8


@dataclass
class DemoContext:
    """Built once per run: data, tokenizer, transforms, and the pre-trained model."""

    config: DemoConfig
    source: object = None
    target: object = None
    unseen: object = None
    tokenizer: object = None
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    pretrained: object = None
    log: Callable[[str], None] = print
    results: list[dict] = field(default_factory=list)


def method_spec(method: str, width: int):
    """The preset of `method`, as published; UniPT's side width m follows the model width (the paper's
    m = 512 is for 512/768-wide towers)."""
    import petl_tpr as pt

    spec = pt.Spec.preset(method)
    return spec.replace_config("unipt", width=width) if method == "unipt" else spec


def build_model(config: DemoConfig):
    """A randomly initialised small CLIP `DualEncoder` from a transformers or open_clip config."""
    from ..model.dual_encoder import build_clip

    torch.manual_seed(config.seed)
    w, h = config.width, config.heads
    if config.backbone == "open_clip":
        arch = {"embed_dim": w,
                "vision_cfg": {"image_size": list(config.image_size), "layers": config.layers, "width": w,
                               "head_width": w // h, "mlp_ratio": 2.0, "patch_size": config.patch_size},
                "text_cfg": {"context_length": config.context_length, "vocab_size": 49408, "width": w,
                             "heads": h, "layers": config.layers, "mlp_ratio": 2.0}}
        return build_clip(arch, image_size=config.image_size)
    from ...compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import CLIPConfig

    tower = dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=config.layers, num_attention_heads=h)
    clip_config = CLIPConfig(
        vision_config=dict(**tower, image_size=config.image_size[0], patch_size=config.patch_size),
        text_config=dict(**tower, vocab_size=49408, max_position_embeddings=config.context_length,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        projection_dim=w)
    return build_clip(clip_config, image_size=config.image_size)


def _prepare(ctx: DemoContext) -> None:
    from ..data.datasets import build_dataset
    from ..data.synthetic import write_synthetic
    from ..data.tokenizer import ClipTokenizer
    from ..data.transforms import TransformConfig, build_test_transform, build_train_transform

    c = ctx.config
    common = dict(images_per_id=c.images_per_id, captions_per_image=c.captions_per_image, overwrite=True)
    began = time.perf_counter()
    src = write_synthetic(c.out_dir / "data" / "source", domain=0, caption_domains=(0, 1),
                          identities=c.source_identities, seed=c.seed, **common)
    tgt = write_synthetic(c.out_dir / "data" / "target", domain=1, identities=c.target_identities,
                          seed=c.seed + 1, **common)
    unseen = write_synthetic(c.out_dir / "data" / "unseen", domain=2, identities=c.unseen_identities,
                             seed=c.seed + 2, test_fraction=UNSEEN_TEST_FRACTION, **common)
    ctx.source, ctx.target = build_dataset("cuhk-pedes", src), build_dataset("cuhk-pedes", tgt)
    ctx.unseen = build_dataset("cuhk-pedes", unseen)
    ctx.log(f"[data] source: {len(ctx.source.train)} training captions; target: {len(ctx.target.train)} training "
            f"captions, test {len(ctx.target.test.captions)} queries x {len(ctx.target.test.image_paths)} images; "
            f"unseen test {len(ctx.unseen.test.captions)} queries x {len(ctx.unseen.test.image_paths)} images "
            f"({time.perf_counter() - began:.1f} s)")
    ctx.tokenizer = ClipTokenizer(context_length=c.context_length)
    size = TransformConfig(height=c.image_size[0], width=c.image_size[1], padding=max(1, c.image_size[1] // 12))
    ctx.train_transform, ctx.eval_transform = build_train_transform(size), build_test_transform(size)


def _train_config(config: DemoConfig, out_dir: Path, *, epochs: int, lr: float, trainable: str):
    from ..training.trainer import TrainConfig

    # Adam with eps 1e-8 and no weight decay for these few hundred steps from a random start (the
    # reference's eps 1e-3 and decay 4e-5 were set for adapting a pre-trained ViT-B/16).
    return TrainConfig(out_dir=out_dir, epochs=epochs, batch_size=config.batch_size, lr=lr, eps=1e-8,
                       weight_decay=0.0, warmup_epochs=1 if epochs > 1 else 0, seed=config.seed + 1,
                       eval_split="none", plot=True, progress=config.progress, trainable=trainable,
                       keep_checkpoints=1)


def _cached(path: Path, settings: dict) -> dict | None:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if result.get("settings") == settings else None


def _step_memory(ctx: DemoContext, model, data) -> dict[str, float]:
    """`training_memory_mb` of one training step (forward, SDM + aux loss) on the first batch."""
    import petl_tpr as pt
    from torch.utils.data import default_collate

    from ..training.losses import sdm_loss
    from ..data.torch_data import ImageTextDataset

    dataset = ImageTextDataset(data.train, transform=ctx.train_transform, tokenizer=ctx.tokenizer)
    batch = default_collate([dataset[i] for i in range(min(ctx.config.batch_size, len(dataset)))])
    device = next(model.parameters()).device
    model.train()

    def step():
        image, text = model(batch["image"].to(device), batch["caption_ids"].to(device))
        return sdm_loss(image, text, batch["pid"].to(device)) + pt.aux_loss(model.clip)

    return {k: round(v, 2) for k, v in training_memory_mb(model, step).items()}


def example_queries(split, count: int) -> list[int]:
    """`count` caption indices spread evenly over `split`'s queries (fixed for every method)."""
    total = len(split.captions)
    return sorted({round(i * total / min(count, total)) for i in range(min(count, total))})


def _evaluate(ctx: DemoContext, model, split, *, examples: list[int] | None = None) -> dict:
    """Text -> image metrics of `model` on `split` (percent); with `examples`, also the gallery
    indices of each example query's top 5 (the metrics' ranking rule: stable, by descending score)."""
    from ..training.evaluation import encode_split
    from ..training.metrics import retrieval_metrics

    feats = encode_split(model, split, tokenizer=ctx.tokenizer, transform=ctx.eval_transform,
                         progress=ctx.config.progress)
    out = retrieval_metrics(feats.text, feats.images, feats.text_pids, feats.image_pids).as_dict()
    if examples:
        scores = feats.text[examples] @ feats.images.T
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :5]
        out["examples"] = [{"query": q, "top5": row} for q, row in zip(examples, order.tolist())]
    return out


def _run_step(ctx: DemoContext, method: str, model, *, epochs: int, lr: float, data, eval_on,
              settings: dict, unseen=None) -> dict:
    """Train `model` (already injected, or whole for full training) and evaluate it on `eval_on`
    (with the example queries' top 5) and on `unseen` when given; a `result.json` computed with the
    same `settings` is reused instead."""
    import petl_tpr as pt

    from ..training.trainer import train
    from .report import versions

    c = ctx.config
    run_dir = c.out_dir / method.replace(" ", "-")
    cached = _cached(run_dir / "result.json", settings)
    if cached is not None:
        ctx.log(f"[{method}] reusing {run_dir / 'result.json'}")
        return cached
    if run_dir.exists():
        shutil.rmtree(run_dir)     # a half-finished step: its settings or state are not to be trusted
    trainable = "all" if method in ("pretrain", "full fine-tuning") else "adapters"
    count = pt.summary(model.clip)
    trainable_count = count.trainable if epochs else 0
    began = time.perf_counter()
    with PeakMemory(next(model.parameters()).device) as memory:
        history = [] if epochs == 0 else train(
            model, data, _train_config(c, run_dir, epochs=epochs, lr=lr, trainable=trainable),
            tokenizer=ctx.tokenizer, train_transform=ctx.train_transform,
            on_epoch=lambda r: ctx.log(f"    [{method}] epoch {r['epoch']}/{epochs}: loss {r['loss']:.3f} "
                                       f"({r['train_s']:.1f} s)"))
    train_s = time.perf_counter() - began
    step_memory = _step_memory(ctx, model, data) if epochs else None
    metrics = _evaluate(ctx, model, eval_on, examples=example_queries(eval_on, c.examples) if unseen else None)
    began = time.perf_counter()
    other = _evaluate(ctx, model, unseen) if unseen is not None else {}
    result = {"method": method, "seed": c.seed, "trainable": trainable_count, "total": count.total,
              "percent": 100.0 * trainable_count / count.total,
              **{k: metrics[k] for k in ("R@1", "R@5", "R@10", "mAP", "mINP")},
              **{f"unseen_{k}": v for k, v in other.items()},
              "unseen_eval_s": round(time.perf_counter() - began, 2) if unseen is not None else None,
              "train_s": round(train_s, 2),
              "train_mb": step_memory["total"] if step_memory else 0.0, "step_memory_mb": step_memory,
              "peak_mb": round(memory.peak_mb, 1), "added_mb": round(memory.added_mb, 1), "memory": memory.kind,
              "epochs": epochs, "lr": lr, "final_loss": history[-1]["loss"] if history else None,
              "examples": metrics.get("examples"), "versions": versions(c.backbone), "settings": settings}
    write_atomic(run_dir / "result.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1), encoding="utf-8"))
    return result


def _pretrained_model(ctx: DemoContext):
    """Pre-train (or reload the cached pre-training of) the source model; returns its result."""
    from ..training.run_config import default_device
    from ..training.run_files import load_weights, save_weights

    c = ctx.config
    model = build_model(c).to(default_device(c.device))
    run_dir = c.out_dir / "pretrain"
    settings = {**c.settings(pretrain=True), "method": "pretrain"}
    weights = run_dir / "pretrained.safetensors"
    cached = _cached(run_dir / "result.json", settings)
    if cached is not None and weights.exists():
        load_weights(model.clip, weights, full=True)
        ctx.log(f"[pretrain] reusing {weights}")
        ctx.pretrained = model
        return cached
    ctx.log(f"[pretrain] {c.backbone} CLIP, width {c.width}, {c.layers} layers per tower, "
            f"{c.pretrain_epochs} epochs on the source domain")
    (run_dir / "result.json").unlink(missing_ok=True)   # a result without its weights file: train again
    result = _run_step(ctx, "pretrain", model, epochs=c.pretrain_epochs, lr=c.pretrain_lr, data=ctx.source,
                       eval_on=ctx.source.test, settings=settings)
    save_weights(model.clip, weights, full=True, epoch=c.pretrain_epochs)
    ctx.pretrained = model
    return result


def run_demo(config: DemoConfig, *, fresh: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Run the demo (see the module docstring); returns one result dict per method, in order, and
    writes `demo_results.json`, `demo_table.txt`, `demo_r1_vs_params.png`, `demo_retrieval.png` and
    `retrieval/<method>.png` under `out_dir`."""
    import petl_tpr as pt

    from .pictures import write_pictures
    from .report import write_report

    if config.threads:
        torch.set_num_threads(config.threads)
    if fresh and config.out_dir.exists():
        shutil.rmtree(config.out_dir)
    ctx = DemoContext(config=config, log=log)
    _prepare(ctx)
    pre = _pretrained_model(ctx)
    log(f"[pretrain] source-domain test R@1 {pre['R@1']:.1f} ({pre['train_s']:.0f} s)")
    for i, method in enumerate(config.methods, 1):
        model = copy.deepcopy(ctx.pretrained)
        if method not in ("zero-shot", "full fine-tuning"):
            # Adapter initialisation draws from the global RNG: seed it, so that a method's result
            # does not depend on which methods ran before it (and a re-run of one step matches).
            torch.manual_seed(config.seed)
            pt.inject(model.clip, method_spec(method, config.width))
        epochs = 0 if method == "zero-shot" else config.transfer_epochs
        lr = config.full_lr if method == "full fine-tuning" else config.petl_lr
        log(f"[{i}/{len(config.methods)}] {method}: " + ("evaluating" if epochs == 0 else f"{epochs} epoch(s)"))
        result = _run_step(ctx, method, model, epochs=epochs, lr=lr, data=ctx.target, eval_on=ctx.target.test,
                           settings={**config.settings(), "method": method}, unseen=ctx.unseen.test)
        log(f"[{i}/{len(config.methods)}] {method}: R@1 {result['R@1']:.1f}, unseen R@1 {result['unseen_R@1']:.1f}, "
            f"{result['train_s']:.0f} s")
        ctx.results.append(result)
    log("\n" + write_report(ctx.results, pre, config.out_dir, unseen=chance_level(ctx.unseen.test)))
    pictures = write_pictures(ctx.results, ctx.target.test, config.out_dir)
    log(f"\nresults: {config.out_dir / 'demo_results.json'}, plot: {config.out_dir / 'demo_r1_vs_params.png'}"
        + (f", retrieval pictures: {config.out_dir / 'demo_retrieval.png'} and {pictures[0].parent}/" if pictures
           else ""))
    return ctx.results


def chance_level(split, *, draws: int = 20) -> dict:
    """What a random ranking scores on `split`: R@1 exactly (the mean share of each query's
    identity in the gallery) and mAP averaged over `draws` seeded random rankings; with the split's
    size, for the report."""
    from ..training.metrics import metrics_from_similarity

    query_pids, gallery_pids = torch.tensor(split.caption_pids), torch.tensor(split.image_pids)
    share = (query_pids[:, None] == gallery_pids[None, :]).float().mean(dim=1)
    generator = torch.Generator().manual_seed(0)
    maps = [metrics_from_similarity(torch.rand(len(query_pids), len(gallery_pids), generator=generator),
                                    query_pids, gallery_pids).mAP for _ in range(draws)]
    return {"queries": len(query_pids), "gallery": len(gallery_pids), "identities": split.num_ids,
            "chance_R@1": 100.0 * float(share.mean()), "chance_mAP": sum(maps) / draws}

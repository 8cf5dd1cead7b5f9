"""The training loop: SDM (+ ID) (+ router aux) losses on adapter parameters, per-epoch
evaluation, adapter-only checkpoints and exact resume.

    history = train(model, data, TrainConfig(out_dir="runs/a"), tokenizer=tok,
                    train_transform=build_train_transform(), eval_transform=build_test_transform())

Per epoch e (0-based): `ImageTextDataset.set_epoch(e)`, a shuffled `DataLoader` whose generator is
seeded from (seed, e) (so the order, and the worker seeds, of an epoch do not depend on what ran
before), forward under float16 autocast on CUDA only, loss =
sdm_loss + [IdentityLoss] + [pt.aux_loss(model.clip)] (the aux terms carry their own weight),
divided by `grad_accum`, an optimiser step every `grad_accum` batches and at the end of the
epoch, then one scheduler step (see `schedule.py`). The epoch's record (mean losses, lr,
time, metrics) is appended to `out_dir/metrics.jsonl` after its checkpoint is written.

Files under `out_dir`:

| file | content |
|---|---|
| `checkpoints/epoch_NNN.safetensors` | adapter tensors after epoch NNN (`pt.save_adapters`) |
| `checkpoints/epoch_NNN.state.pt` | optimiser, scheduler, scaler, ID head, RNG states, history, best |
| `checkpoints/latest.json` | `{"epoch", "adapters", "state"}`: the last complete checkpoint, written last |
| `best.safetensors` | adapters of the epoch with the best eval R@1 (first such epoch on ties) |
| `metrics.jsonl` | one JSON record per completed epoch |
| `curves.png` | losses and eval metrics per epoch (matplotlib, when installed) |

(The run directory itself, its writers and the RNG-state helpers live in `run_files.py`.)

Every file but `metrics.jsonl` (appended) is written atomically, so a kill at any point leaves the
previous checkpoint usable; `train(..., resume=True)` reloads it, rewrites `metrics.jsonl` from the
saved history (dropping the lines of an epoch that never reached its checkpoint) and runs
the remaining epochs with the same batches, augmentation draws and updates as an uninterrupted
run. Under `torchrun` every process runs `train` alike: `batch_size` stays the global batch,
split across the ranks; rank 0 alone writes the run files and evaluates (see `distributed.py`
and docs/tpr.md, "Distributed training"). Not done yet: an fp16 backbone, the MLM head.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ...errors import CheckpointError, PetlError
from ..data.datasets import EvalSplit, PersonRetrievalData
from .distributed import ProcessGroup, join, local_batch_size
from ..errors import TaskInputError, check_int
from .evaluation import _device_of, _progress, evaluate
from .losses import IdentityLoss, sdm_loss
from ..data.masking import MaskingConfig
from ..model.dual_encoder import DualEncoder
from .schedule import OptimConfig, build_optimizer, build_scheduler, step_warmup_factor
from ..data.tokenizer import ClipTokenizer
from .run_files import RunFiles, _seed_all, epoch_seed, load_weights, plot_history, save_weights
from ..data.torch_data import ImageTextDataset

EVAL_SPLITS = ("val", "test", "none")
TRAINABLE = ("adapters", "all")
# Config fields that may change between a run and its resumption (they do not change the result).
_RESUMABLE = {"out_dir", "num_workers", "progress", "plot", "keep_checkpoints", "eval_batch_size"}


class TrainingError(PetlError, RuntimeError):
    """Training cannot go on (the loss became non-finite)."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run; the defaults are the reference recipe (REFERENCE.md section 0).

    `batch_size` is the loader batch (the SDM batch); `grad_accum` batches make one optimiser step.
    `amp` applies on CUDA only (float16 autocast + GradScaler); on CPU it is ignored.
    `warmup_steps` (0: off, the reference) ramps the lr linearly over the first optimiser steps of
    the run, on top of the per-epoch schedule (`schedule.py`).
    `eval_split`: "val" evaluates on `data.val` when the dataset has one (nothing otherwise),
    "test" on the test split (explicit opt-in: selecting on test is what the reference did),
    "none" never. Evaluation runs every `eval_every` epochs and after the last one.
    `mask_captions`: the contrastive losses see masked captions (`MaskingConfig()`), as in the
    reference runs. `keep_checkpoints`: how many epoch checkpoints stay on disk (oldest pruned).
    `trainable`: "adapters" (the default) trains what `pt.inject` left trainable and checkpoints
    the adapters only; "all" trains every parameter of a model with no adapters (pre-training or
    full fine-tuning) and checkpoints the whole `model.clip` state dict.
    """

    out_dir: Path
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-3
    weight_decay: float = 4e-5
    warmup_epochs: int = 5
    warmup_factor: float = 0.1
    warmup_steps: int = 0
    seed: int = 1
    grad_accum: int = 1
    amp: bool = True
    id_loss: bool = False
    aux_loss: bool = True
    mask_captions: bool = False
    drop_last: bool = False
    num_workers: int = 0
    eval_split: str = "val"
    eval_every: int = 1
    eval_batch_size: int = 64
    keep_checkpoints: int = 2
    plot: bool = True
    progress: bool | None = None
    trainable: str = "adapters"
    optim: OptimConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise TaskInputError(f"TrainConfig.out_dir must be a path, got {self.out_dir!r}")
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batch_size", "keep_checkpoints"):
            check_int(f"TrainConfig.{name}", getattr(self, name))
        check_int("TrainConfig.num_workers", self.num_workers, 0)
        check_int("TrainConfig.seed", self.seed, 0)
        if self.eval_split not in EVAL_SPLITS:
            raise TaskInputError(f"TrainConfig.eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        if self.trainable not in TRAINABLE:
            raise TaskInputError(f"TrainConfig.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        for name in ("amp", "id_loss", "aux_loss", "mask_captions", "drop_last", "plot"):
            if not isinstance(getattr(self, name), bool):
                raise TaskInputError(f"TrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        # checks lr, betas, eps, weight_decay, epochs, warmup
        object.__setattr__(self, "optim", OptimConfig(
            lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, epochs=self.epochs,
            warmup_epochs=self.warmup_epochs, warmup_factor=self.warmup_factor, warmup_steps=self.warmup_steps))

    def to_json(self) -> dict:
        """The settings as JSON-ready values (stored in checkpoints, compared on resume)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["out_dir"], out["betas"] = str(self.out_dir), list(self.betas)
        return out


# -------------------------------------------------------------------------------------- training


def _eval_target(data: PersonRetrievalData, config: TrainConfig) -> EvalSplit | None:
    if config.eval_split == "val":
        return data.val
    return data.test if config.eval_split == "test" else None


def _check_resume_config(saved: dict, config: TrainConfig, path: Path) -> None:
    now = config.to_json()
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.init and f.default is not MISSING}
    # a setting added after the checkpoint was written reads as its default (older runs still resume)
    changed = sorted(k for k in now if k not in _RESUMABLE and saved.get(k, defaults.get(k)) != now[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise CheckpointError(f"{path}: cannot resume with changed settings ({details}); "
                              f"use a new out_dir or the saved settings")


def _local_forward(model: DualEncoder, batch: dict | None, *, caption_key: str, device: torch.device,
                   config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's image and text features `(n, E)`, pids `(n,)` and router aux loss (a scalar over
    the local tokens). An empty share of a short last batch (`batch` None) gives empty leaves, so
    that the rank still takes part in the gather and in its backward."""
    import petl_tpr as pt

    zero = torch.zeros((), device=device)
    if batch is None:
        empty = torch.zeros(0, model.embed_dim, device=device, requires_grad=True)
        return empty, empty, torch.zeros(0, dtype=torch.long, device=device), zero
    images = batch["image"].to(device, non_blocking=True)
    ids = batch[caption_key].to(device, non_blocking=True)
    pids = batch["pid"].to(device, non_blocking=True)
    image_features, text_features = model(images, ids)
    aux = pt.aux_loss(model.clip).float() if config.aux_loss else zero
    return image_features, text_features, pids, aux


def _train_epoch(model: DualEncoder, loader: DataLoader, *, id_head: IdentityLoss | None, optimizer, scaler,
                 config: TrainConfig, device: torch.device, amp: bool, epoch: int, group: ProcessGroup,
                 first_step: int = 0) -> dict:
    """One pass over `loader` (this rank's shares); returns the global mean losses and counts.
    `first_step`: optimiser steps taken before this epoch (for the per-step warm-up).

    SDM and ID see the all-gathered global batch; the gradients are averaged over the ranks before
    each step (see `distributed._GatherRows` for why that gives the single-process gradient)."""
    model.train()
    caption_key = "mlm_ids" if config.mask_captions else "caption_ids"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scheduled = [g["lr"] for g in optimizer.param_groups]       # this epoch's lr from the per-epoch schedule
    sums = torch.zeros(5, dtype=torch.float64, device=device)   # loss, sdm, id, aux (sample-weighted), samples
    steps = 0
    optimizer.zero_grad(set_to_none=True)
    batches = _progress(loader, total=len(loader), desc=f"epoch {epoch + 1}",
                        enabled=config.progress if group.is_main else False)
    for step, batch in enumerate(batches):
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            image_features, text_features, pids, aux = _local_forward(model, batch, caption_key=caption_key,
                                                                      device=device, config=config)
            image_all, text_all, pids_all = group.gather_batch(image_features, text_features, pids)
            sdm = sdm_loss(image_all, text_all, pids_all)
            ident = id_head(image_all, text_all, pids_all) if id_head is not None else sdm.new_zeros(())
            loss = sdm + ident + aux
        scaler.scale(loss / config.grad_accum).backward()
        if (step + 1) % config.grad_accum == 0 or step + 1 == len(loader):
            group.average_gradients(params)
            warm = step_warmup_factor(first_step + steps, config.warmup_steps)
            for g, lr in zip(optimizer.param_groups, scheduled):
                g["lr"] = lr * warm
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        sums[:4] += torch.stack([loss.detach(), sdm.detach(), ident.detach(), aux.detach()]).double() * len(pids)
        sums[4] += len(pids)
    for g, lr in zip(optimizer.param_groups, scheduled):       # the warm-up never leaks into the schedule
        g["lr"] = lr
    group.all_reduce_sum(sums)
    samples = int(sums[4])
    means = (sums[:4] / max(samples, 1)).tolist()
    if not all(math.isfinite(v) for v in means):
        raise TrainingError(f"the training loss became non-finite in epoch {epoch + 1} "
                            f"(loss {means[0]}, sdm {means[1]}, id {means[2]}, aux {means[3]})")
    return {"loss": means[0], "sdm": means[1], "id": means[2], "aux": means[3], "steps": steps, "samples": samples}


def train(model: DualEncoder, data: PersonRetrievalData, config: TrainConfig, *, tokenizer: ClipTokenizer,
          train_transform: Callable, eval_transform: Callable | None = None, resume: bool = False,
          stop_after: int | None = None, device: str | torch.device | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train the adapters injected in `model.clip` on `data.train`; returns the per-epoch history.

    `train_transform` / `eval_transform` map a PIL image to `(3, H, W)` at the model's image size
    (`eval_transform` is needed only when an evaluation split is used). `device` defaults to the
    model's; under torchrun a CUDA device becomes `cuda:LOCAL_RANK` and the process group is
    initialised here (see `distributed.join`). `resume=True` continues from
    `out_dir/checkpoints/latest.json` (from scratch when there is none); without it an `out_dir`
    that already holds a checkpoint is refused.
    `stop_after=N` returns after (1-based) epoch N, checkpoint written, without changing the
    schedule: a run split into `stop_after` slices and resumed equals one uninterrupted run.
    Each history record: {"epoch" (1-based), "lr", "loss", "sdm", "id", "aux", "steps", "samples",
    "train_s"} plus, on evaluated epochs, {"val" or "test": {"R@1", ..., "mINP", ...}, "eval_s"}.
    `on_epoch(record)` is called (on rank 0) after each epoch's checkpoint and log line are written.
    """
    from ...api import get_injection

    if not isinstance(model, DualEncoder):
        raise TaskInputError(f"model must be a DualEncoder, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TaskInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.trainable == "adapters" and get_injection(model.clip) is None:
        raise TaskInputError("model.clip has no adapters: call pt.inject(model.clip, ...) before train, "
                             "or set TrainConfig(trainable='all') to train the whole model")
    if config.trainable == "all":
        if get_injection(model.clip) is not None:
            raise TaskInputError("trainable='all' trains the whole model, but model.clip has adapters: "
                                 "pt.eject(model.clip) first, or use trainable='adapters'")
        model.requires_grad_(True)
    eval_split = _eval_target(data, config)
    if eval_split is not None and eval_transform is None:
        raise TaskInputError(f"eval_split={config.eval_split!r} needs an eval_transform")
    device = torch.device(device) if device is not None else _device_of(model)
    group, device = join(device)
    local_batch_size(config.batch_size, group.world_size)
    model.to(device)
    amp = config.amp and device.type == "cuda"
    files = RunFiles(config.out_dir)
    latest = files.read_latest()
    if latest is not None and not resume:
        raise CheckpointError(f"{config.out_dir} already holds a run (epoch {latest['epoch']}); pass resume=True "
                              f"to continue it or choose another out_dir")

    _seed_all(config.seed)
    id_head = None
    if config.id_loss:
        id_head = IdentityLoss(num_ids=data.num_train_ids, feature_dim=model.embed_dim).to(device)
    for module in [model] + ([id_head] if id_head is not None else []):
        group.broadcast_parameters(module)
    group.seed_stream(config.seed)
    optimizer = build_optimizer([model] + ([id_head] if id_head is not None else []), config.optim)
    scheduler = build_scheduler(optimizer, config.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    history: list[dict] = []
    best: dict | None = None
    start = 0
    if latest is not None:
        start = latest["epoch"]
        state = files.read_state(start)
        _check_resume_config(state["config"], config, files.state(start))
        load_weights(model.clip, files.adapters(start), full=config.trainable == "all")
        if id_head is not None:
            id_head.load_state_dict(state["id_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, best = list(state["history"]), state["best"]
        group.restore_rng(state["rng"], state.get("rank_rng"), seed=epoch_seed(config.seed, start))
    if group.is_main:
        files.root.mkdir(parents=True, exist_ok=True)
        files.rewrite_metrics(history)
    group.barrier()

    dataset = ImageTextDataset(data.train, transform=train_transform, tokenizer=tokenizer,
                               masking=MaskingConfig() if config.mask_captions else None, seed=config.seed)
    if stop_after is not None:
        check_int("train.stop_after", stop_after)
    end = config.epochs if stop_after is None else min(stop_after, config.epochs)
    for epoch in range(start, end):
        dataset.set_epoch(epoch)
        loader = group.loader(dataset, batch_size=config.batch_size, drop_last=config.drop_last,
                              generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch)),
                              num_workers=config.num_workers, pin_memory=device.type == "cuda")
        if len(loader) == 0:
            raise TaskInputError(f"no training batch: {len(dataset)} samples, batch_size {config.batch_size}, "
                                 f"drop_last={config.drop_last}")
        lr = optimizer.param_groups[0]["lr"]
        began = time.perf_counter()
        record = {"epoch": epoch + 1, "lr": lr,
                  **_train_epoch(model, loader, id_head=id_head, optimizer=optimizer, scaler=scaler, config=config,
                                 device=device, amp=amp, epoch=epoch, group=group,
                                 first_step=sum(r["steps"] for r in history))}
        record["train_s"] = round(time.perf_counter() - began, 3)
        scheduler.step()
        last = epoch + 1 == config.epochs
        evaluated = eval_split is not None and ((epoch + 1) % config.eval_every == 0 or last)
        if evaluated and group.is_main:      # the other ranks wait in the broadcast below
            began = time.perf_counter()
            metrics = evaluate(model, eval_split, tokenizer=tokenizer, transform=eval_transform,
                               batch_size=config.eval_batch_size, num_workers=config.num_workers, amp=amp,
                               progress=config.progress)
            record[config.eval_split], record["eval_s"] = metrics, round(time.perf_counter() - began, 3)
        record = group.broadcast_object(record)      # rank 0's times and metrics: one history on all ranks
        if evaluated and (best is None or record[config.eval_split]["R@1"] > best["R@1"]):
            best = {"epoch": epoch + 1, "split": config.eval_split, **record[config.eval_split]}
            if group.is_main:
                save_weights(model.clip, files.best, full=config.trainable == "all", epoch=epoch + 1)
        history.append(record)
        _save_checkpoint(files, epoch + 1, model=model, id_head=id_head, optimizer=optimizer, scheduler=scheduler,
                         scaler=scaler, config=config, history=history, best=best, group=group)
        if group.is_main:
            files.append_metrics(record)
            if on_epoch is not None:
                on_epoch(record)
        group.barrier()
    if config.plot and group.is_main:
        plot_history(history, files.curves)
    group.barrier()
    return history


def _save_checkpoint(files: RunFiles, epoch: int, *, model: DualEncoder, id_head: IdentityLoss | None, optimizer,
                     scheduler, scaler, config: TrainConfig, history: list[dict], best: dict | None,
                     group: ProcessGroup) -> None:
    """Adapters (or whole weights), then the sidecar state, then the `latest.json` pointer; then prune.
    Rank 0 writes (the ranks hold the same weights and state); the RNG states of every rank go in."""
    rngs = group.rng_states()
    if not group.is_main:
        return
    save_weights(model.clip, files.adapters(epoch), full=config.trainable == "all", epoch=epoch)
    files.write_state(epoch, {
        "config": config.to_json(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "id_head": id_head.state_dict() if id_head is not None else None,
        "rng": rngs[0], "rank_rng": rngs if len(rngs) > 1 else None, "history": history, "best": best})
    files.write_latest(epoch)
    files.prune(epoch - config.keep_checkpoints + 1)

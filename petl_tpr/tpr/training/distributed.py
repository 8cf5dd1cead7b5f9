"""The run's process group: one process per device under `torchrun`, or one process alone.

    group, device = join(device)        # RANK / WORLD_SIZE / LOCAL_RANK from torchrun's environment
    loader = group.loader(dataset, batch_size=global_batch, ...)   # this rank's share of each batch
    image, text, pids = group.gather_batch(image, text, pids)      # the global batch, differentiable
    loss.backward(); group.average_gradients(params); optimizer.step()

`join` initialises the default process group (gloo on CPU, nccl on CUDA, device
`cuda:LOCAL_RANK`) unless it is initialised already, and leaves it for the life of the process
(initialising it a second time in one process can hang); `cleanup()` destroys it. Without
torchrun (WORLD_SIZE unset or 1) the collectives are no-ops and the loader is the plain one.

Data split: the epoch's permutation comes from the generator the caller seeds (the same on every
rank), is cut into global batches of `batch_size` exactly as a single-process `DataLoader` would
(same generator draws: worker base seed, then the permutation), and rank r takes the contiguous
slice r of each global batch. So the ranks' shares of step i, concatenated in rank order (what
`gather_batch` returns), are the single-process batch i in its order. A short last batch is split
as evenly as possible; a share may then be empty (its loader item is None).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, default_collate

from ..errors import TaskInputError
from .run_files import _rng_state, _seed_all, _set_rng_state

_BUCKET = 1 << 24          # gradient elements per all-reduce (64 MiB in float32)


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Samples one rank loads per step of a global `batch_size`; refuses a split that is not even."""
    if batch_size % world_size:
        raise TaskInputError(f"TrainConfig.batch_size is the global batch and must be divisible by the "
                             f"number of processes: {batch_size} is not divisible by {world_size}")
    return batch_size // world_size


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n rows (the first n % world_size ranks get one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_seed(seed: int, rank: int) -> int:
    """A seed of rank's own random stream (augmentation, dropout) derived from the run's `seed`."""
    return (seed + rank * 2_654_435_761) % 2**63


def _reseed_worker(worker_id: int, *, rank: int) -> None:
    # The loader's base seed comes from the shared generator, so without this rank r's worker w
    # would draw the same augmentation as rank 0's worker w.
    _seed_all(rank_seed(torch.initial_seed(), rank))


def _collate(items: list) -> dict | None:
    return default_collate(items) if items else None


class RankBatches(Sampler):
    """Batch sampler: rank's contiguous share (see `shard`) of each batch of a shuffled BatchSampler."""

    def __init__(self, dataset: Dataset, *, batch_size: int, drop_last: bool, generator: torch.Generator,
                 rank: int, world_size: int) -> None:
        self.batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            start, stop = shard(len(batch), self.rank, self.world_size)
            yield batch[start:stop]


def _gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`(sizes[rank], ...)` on each rank -> `(sum(sizes), ...)` in rank order (padded all_gather)."""
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """`_gather_rows` with a backward: this rank's rows of the gradient summed over the ranks.

    Every rank computes the same global loss from the same gathered rows, so the sum over ranks is
    `world_size` times the gradient of that one loss. `average_gradients` divides by `world_size`
    afterwards, which gives exactly the single-process gradient, both for the parameters behind the
    gather (sum over ranks of world_size * their share, / world_size) and for those applied to the
    gathered rows (the ID head: the full gradient on every rank, averaged). A gather whose backward
    kept only the local gradient would leave the encoder gradients world_size times too small, and
    summing instead of averaging would make every gradient world_size times too large (both are
    caught by tests/tpr/test_tpr_distributed.py). DDP wrapping, which averages too, would be as
    correct; see `average_gradients` for why it is not used.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _gather_rows(local, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run; with `world_size == 1` (the default) the collectives are
    no-ops and `loader` is the plain single-process loader."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run files and evaluates."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def seed_stream(self, seed: int) -> None:
        """Give ranks > 0 their own global random stream (augmentation, dropout) derived from `seed`;
        rank 0 keeps the single-process one."""
        if self.rank:
            _seed_all(rank_seed(seed, self.rank))

    def rng_states(self) -> list[dict]:
        """Every rank's RNG states (`run_files._rng_state`), in rank order, on every rank."""
        return self.gather_objects(_rng_state())

    def restore_rng(self, first: dict, ranks: list[dict] | None, *, seed: int) -> None:
        """Restore this rank's saved RNG states (`ranks`, as `rng_states` returned them). Saved by
        another number of processes (or by one, `ranks` None): rank 0 continues `first`, the
        others start their own stream from `seed`."""
        if ranks is not None and len(ranks) == self.world_size:
            _set_rng_state(ranks[self.rank])
            return
        _set_rng_state(first)
        self.seed_stream(seed)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters (the ranks must start from the same weights, frozen
        ones included, even when adapters were initialised without a common seed)."""
        if self.world_size > 1:
            with torch.no_grad():
                for param in module.parameters():
                    dist.broadcast(param.data, src=0)

    def loader(self, dataset: Dataset, *, batch_size: int, drop_last: bool, generator: torch.Generator,
               num_workers: int, pin_memory: bool) -> DataLoader:
        """The shuffled loader of one epoch; `batch_size` is global, each rank loads its share (see
        the module docstring). `generator` must be seeded the same on every rank."""
        local_batch_size(batch_size, self.world_size)
        batches = RankBatches(dataset, batch_size=batch_size, drop_last=drop_last, generator=generator,
                              rank=self.rank, world_size=self.world_size)
        init = partial(_reseed_worker, rank=self.rank) if self.rank else None
        return DataLoader(dataset, batch_sampler=batches, generator=generator, num_workers=num_workers,
                          pin_memory=pin_memory, collate_fn=_collate, worker_init_fn=init)

    def gather_batch(self, image: torch.Tensor, text: torch.Tensor,
                     pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local `(n_r, E)`, `(n_r, E)`, `(n_r,)` -> the global batch's `(N, E)`, `(N, E)`, `(N,)` in
        rank order; gradients flow back to the local features (see `_GatherRows`). The features
        come back in float32 (the losses compute in float32 anyway)."""
        if self.world_size == 1:
            return image, text, pids
        sizes = torch.tensor([len(pids)], device=pids.device)
        parts = [torch.empty_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(parts, sizes)
        sizes = [int(n) for n in torch.cat(parts).tolist()]
        both = _GatherRows.apply(torch.cat([image.float(), text.float()], dim=1), sizes, self.rank)
        dim = image.shape[1]
        return both[:, :dim], both[:, dim:], _gather_rows(pids, sizes)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (call after backward, before the step).

        Explicit flat all-reduces rather than DDP: the loss is computed on gathered features and a
        rank's share of a short last batch can be empty (no forward there), which DDP's hooks do
        not allow. A parameter without a gradient on every rank keeps none (the optimiser skips it,
        as in one process); one with a gradient somewhere gets zeros for the ranks that had none.
        """
        if self.world_size == 1:
            return
        device = params[0].device
        flags = self.all_reduce_sum(torch.tensor([p.grad is not None for p in params], device=device,
                                                 dtype=torch.int32))
        chosen = [p for p, flag in zip(params, flags.tolist()) if flag]
        for bucket in _buckets(chosen):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            flat = self.all_reduce_sum(flat) / self.world_size
            offset = 0
            for p in bucket:
                part = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is None:
                    p.grad = part.to(p.dtype).clone()
                else:
                    p.grad.copy_(part)


def _buckets(params: list[torch.nn.Parameter]):
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel()
        if size >= _BUCKET:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def join(device: torch.device) -> tuple[ProcessGroup, torch.device]:
    """This process's group and device. Under torchrun (WORLD_SIZE > 1) or with a default group
    already initialised, a CUDA `device` becomes `cuda:LOCAL_RANK`, and the default group is
    initialised (nccl on CUDA, gloo otherwise) unless it is already."""
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ProcessGroup(), device
    if not dist.is_available():
        raise TaskInputError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialised:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessGroup(rank=dist.get_rank(), world_size=world, local_rank=local, backend=dist.get_backend()), device


def process_rank() -> int:
    """This process's rank: the default group's when initialised, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def cleanup() -> None:
    """Destroy the default process group, if one is initialised (at the end of the process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

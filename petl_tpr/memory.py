"""Peak memory of a piece of work: the process RSS on the CPU, the caching allocator on CUDA.

    with PeakMemory("cpu") as peak:
        train(...)
    peak.peak_mb      # highest value seen inside the block (MB)
    peak.added_mb     # peak minus the value when the block started

CPU: the resident set size (`/proc/self/statm`), sampled by a daemon thread every `interval`
seconds (2 ms by default), so a short spike between two samples can be missed; the weights and
anything else already resident count too (`added_mb` removes what was there before). CUDA:
`torch.cuda.max_memory_allocated` after a reset of the peak statistics, exact for tensors, blind
to memory outside PyTorch's allocator. Platforms without `/proc` report 0 on the CPU.
"""

from __future__ import annotations

import os
import threading
import time

import torch

MB = 2 ** 20


def rss_mb() -> float:
    """The process's resident set size in MB (0.0 where `/proc/self/statm` does not exist)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:
        return 0.0


class PeakSampler:
    """Samples the process RSS in a thread; `peak` is the highest value (MB) seen while running."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.peak = rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


class PeakMemory:
    """Peak memory of the `with` block on `device` (see the module docstring); `kind` says which
    measure was taken: "rss" (CPU) or "cuda_allocated"."""

    def __init__(self, device: str | torch.device = "cpu", *, interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "rss"
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0

    @property
    def added_mb(self) -> float:
        return self.peak_mb - self.start_mb

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / MB
        else:
            self._sampler = PeakSampler(self.interval).__enter__()
            self.start_mb = self._sampler.peak
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            self._sampler.__exit__(*exc)
            self.peak_mb = self._sampler.peak


def saved_activation_mb(step, *, exclude=()) -> float:
    """MB of the distinct tensor storages autograd keeps for backward while `step()` builds its graph
    (the activations a training step holds until backward), not counting the storages of `exclude`
    (pass the model's parameters: they are resident anyway). Independent of the allocator and the
    device, so methods compare exactly; the graph is freed before returning."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    del result
    return total / MB


def training_memory_mb(model: torch.nn.Module, step, *, optimizer_states: int = 2) -> dict[str, float]:
    """An allocator-free account of one training step of `model` in MB: `weights` (every parameter),
    `gradients` (trainable ones), `optimizer` (`optimizer_states` tensors per trainable parameter:
    2 for Adam), `activations` (`saved_activation_mb` of `step`) and their `total`."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params) / MB
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad) / MB
    activations = saved_activation_mb(step, exclude=params)
    parts = {"weights": weights, "gradients": trainable, "optimizer": optimizer_states * trainable,
             "activations": activations}
    return {**parts, "total": sum(parts.values())}

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

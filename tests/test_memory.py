"""petl_tpr.memory: the RSS sampler, PeakMemory and the saved-activation account."""

import mmap
import time

import torch

from petl_tpr.memory import PeakMemory, saved_activation_mb, training_memory_mb, MB


def test_saved_activations_count_what_autograd_keeps():
    layer = torch.nn.Linear(256, 512, bias=False)
    x = torch.randn(64, 256)
    # y = relu(x W^T): linear saves its input x (64x256 floats; W is excluded), relu saves its output.
    step = lambda: torch.relu(layer(x)).sum()   # noqa: E731
    expected = (64 * 256 + 64 * 512) * 4 / MB
    assert saved_activation_mb(step, exclude=layer.parameters()) == expected
    x.requires_grad_(True)      # now the weight is needed for dx and saved too, counted unless excluded
    assert saved_activation_mb(step) == expected + 256 * 512 * 4 / MB
    assert saved_activation_mb(step, exclude=layer.parameters()) == expected
    x.requires_grad_(False)
    layer.requires_grad_(False)
    assert saved_activation_mb(step, exclude=layer.parameters()) == 0.0   # nothing needs a gradient


def test_training_memory_parts():
    model = torch.nn.Sequential(torch.nn.Linear(100, 10), torch.nn.Linear(10, 1))
    model[0].requires_grad_(False)
    x = torch.randn(8, 100)
    parts = training_memory_mb(model, lambda: model(x).sum())
    assert parts["weights"] == (100 * 10 + 10 + 10 + 1) * 4 / MB
    assert parts["gradients"] == 11 * 4 / MB and parts["optimizer"] == 2 * parts["gradients"]
    assert parts["activations"] == 8 * 10 * 4 / MB       # the second Linear saves its (8, 10) input
    assert parts["total"] == sum(parts[k] for k in ("weights", "gradients", "optimizer", "activations"))


def test_peak_memory_sees_a_large_allocation():
    # Fresh anonymous pages (an allocator could hand back memory already resident from earlier tests).
    with PeakMemory("cpu") as peak:
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))      # touched: now resident
        time.sleep(0.1)                          # held for many 2 ms sampling intervals
        block.close()
    assert peak.kind == "rss" and peak.added_mb > 40 and peak.peak_mb >= peak.start_mb

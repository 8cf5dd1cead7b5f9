"""`routed_adapters`: the one entry point of the routed mixture-of-adapters op, and its dispatch.

Implementations (all take the same arguments and give the same result and gradients):
- `reference`: Python loop over experts, as DM-Adapter's code (`reference.py`); the test oracle.
- `torch`: sorted, expert-by-expert plain torch with a hand-written backward (`torch_fast.py`).
- `triton`: fused kernels for CUDA tensors. Not available yet: a later issue adds them under
  `kernels/triton/` and hooks them into `select_impl` and `IMPLS`.

`impl=None` reads the environment variable `PETL_TPR_MOA_IMPL` (`reference`, `torch`, `triton` or
`auto`; default `auto`). `auto` picks the best implementation available for the inputs' device:
the torch path for now.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from .checks import RoutingError
from .reference import routed_adapters_reference
from .torch_fast import routed_adapters_torch

ENV_VAR = "PETL_TPR_MOA_IMPL"
CHOICES = ("reference", "torch", "triton", "auto")

IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": routed_adapters_reference,
    "torch": routed_adapters_torch,
}


def triton_available(device: torch.device) -> bool:
    """Whether Triton kernels can run on `device`. The seam for the Triton issue: always False now."""
    return False


def select_impl(impl: str | None, device: torch.device) -> str:
    """Resolve `impl` (None -> `$PETL_TPR_MOA_IMPL` -> `auto`) to a key of `IMPLS` for `device`."""
    source = "impl"
    if impl is None:
        impl, source = os.environ.get(ENV_VAR, "").strip().lower() or "auto", f"${ENV_VAR}"
    if impl not in CHOICES:
        raise RoutingError(f"{source} must be one of {CHOICES}, got {impl!r}")
    if impl == "auto":
        return "triton" if triton_available(device) and "triton" in IMPLS else "torch"
    if impl == "triton" and not (triton_available(device) and "triton" in IMPLS):
        raise RoutingError(f"{source}='triton': the Triton routed-adapter kernels are not available yet "
                           f"(they will need CUDA tensors and the triton package; got device {device}); "
                           f"use 'torch', 'reference' or 'auto'")
    return impl


def routed_adapters(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                    b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, *, activation: str = "relu",
                    impl: str | None = None) -> torch.Tensor:
    """Routed mixture of bottleneck adapters.

    `y_t = sum_j gates[t,j] * (act(x_t @ w_down[e] + b_down[e]) @ w_up[e] + b_up[e])`, `e = expert_ids[t,j]`.

    x `(T, d)`; expert_ids `(T, k)` int64 in `[0, E)`; gates `(T, k)` in x's dtype; w_down `(E, d, r)`;
    b_down `(E, r)`; w_up `(E, r, d)`; b_up `(E, d)` -> y `(T, d)` in x's dtype. `activation` is
    `relu` or `gelu`. fp16/bf16 are computed in fp32. Gradients flow to x, gates and the four weight
    tensors. Bad input raises `RoutingError` (a ValueError).
    """
    return IMPLS[select_impl(impl, x.device)](x, expert_ids, gates, w_down, b_down, w_up, b_up,
                                              activation=activation)

"""`routed_adapters`: the one entry point of the routed mixture-of-adapters op, and its dispatch.

Implementations (all take the same arguments and give the same result and gradients):
- `reference`: Python loop over experts, as DM-Adapter's code (`reference.py`); the test oracle.
- `torch`: sorted, expert-by-expert plain torch with a hand-written backward (`torch_fast.py`).
- `triton`: fused Triton kernels (`kernels/triton/`), for CUDA tensors when the triton package is
  importable. Forced on CPU tensors it runs only under the Triton interpreter (`TRITON_INTERPRET=1`
  set before triton is imported), which is how the tests run it. Imported lazily, on first use.

`impl=None` reads the environment variable `PETL_TPR_MOA_IMPL` (`reference`, `torch`, `triton` or
`auto`; default `auto`). `auto` picks the best implementation available for the inputs' device:
`triton` for CUDA tensors when triton is importable, the torch path otherwise (always on the CPU).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from .checks import RoutingError
from .reference import routed_adapters_reference
from .torch_fast import routed_adapters_torch

ENV_VAR = "PETL_TPR_MOA_IMPL"
CHOICES = ("reference", "torch", "triton", "auto")



def routed_adapters_triton(*args, **kwargs) -> torch.Tensor:
    """The Triton implementation, imported on first use (importing it imports triton)."""
    from .triton import routed_adapters_triton as impl
    return impl(*args, **kwargs)


IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": routed_adapters_reference,
    "torch": routed_adapters_torch,
    "triton": routed_adapters_triton,
}


_TRITON_FOUND = importlib.util.find_spec("triton") is not None   # found, not imported; once (torch.compile-friendly)


def _triton_importable() -> bool:
    return _TRITON_FOUND


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device) -> bool:
    """Whether `auto` picks the Triton kernels for `device`: CUDA tensors with triton importable."""
    return torch.device(device).type == "cuda" and _triton_importable()


def triton_runnable(device: torch.device) -> bool:
    """Whether an explicit `triton` can run on `device`: where `triton_available`, and on CPU tensors
    under the Triton interpreter (TRITON_INTERPRET=1)."""
    device = torch.device(device)
    return triton_available(device) or (device.type == "cpu" and _interpreter_on() and _triton_importable())


def select_impl(impl: str | None, device: torch.device) -> str:
    """Resolve `impl` (None -> `$PETL_TPR_MOA_IMPL` -> `auto`) to a key of `IMPLS` for `device`."""
    source = "impl"
    if impl is None:
        impl, source = os.environ.get(ENV_VAR, "").strip().lower() or "auto", f"${ENV_VAR}"
    if impl not in CHOICES:
        raise RoutingError(f"{source} must be one of {CHOICES}, got {impl!r}")
    if impl == "auto":
        return "triton" if triton_available(device) and "triton" in IMPLS else "torch"
    if impl == "triton" and not (triton_runnable(device) and "triton" in IMPLS):
        raise RoutingError(f"{source}='triton': the Triton routed-adapter kernels are not available here "
                           f"(they need CUDA tensors and the triton package, or TRITON_INTERPRET=1 on the CPU; "
                           f"triton importable: {_triton_importable()}, device {device}); "
                           f"use 'torch', 'reference' or 'auto'")
    return impl


def routed_adapters(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                    b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, *, activation: str = "relu",
                    impl: str | None = None, check_ids: bool = True) -> torch.Tensor:
    """Routed mixture of bottleneck adapters.

    `y_t = sum_j gates[t,j] * (act(x_t @ w_down[e] + b_down[e]) @ w_up[e] + b_up[e])`, `e = expert_ids[t,j]`.

    x `(T, d)`; expert_ids `(T, k)` int64 in `[0, E)`; gates `(T, k)` in x's dtype; w_down `(E, d, r)`;
    b_down `(E, r)`; w_up `(E, r, d)`; b_up `(E, d)` -> y `(T, d)` in x's dtype. `activation` is
    `relu` or `gelu`. fp16/bf16 are computed in fp32. Under `torch.autocast` the torch and Triton
    paths take their operands in autocast's dtype (fp32 accumulation). Gradients flow to x, gates and
    the four weight tensors. Bad input raises `RoutingError` (a ValueError).

    `check_ids=False` is for callers whose ids are valid by construction (top-k of E logits): the
    Triton path then skips the `[0, E)` check and its host transfer, its only host synchronisation
    (invalid ids then give undefined values, with every memory access still in bounds). The
    reference and torch paths check anyway: they bring the expert runs to the host regardless.
    """
    return IMPLS[select_impl(impl, x.device)](x, expert_ids, gates, w_down, b_down, w_up, b_up,
                                              activation=activation, check_ids=check_ids)

"""Input checks shared by every implementation of the routed mixture-of-adapters op.

Shapes (T tokens, d model width, k picks per token, E experts, r bottleneck width):
x `(T, d)`, expert_ids `(T, k)` int64 in `[0, E)`, gates `(T, k)`, w_down `(E, d, r)`, b_down `(E, r)`,
w_up `(E, r, d)`, b_up `(E, d)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PetlError

ACTIVATIONS = ("relu", "gelu")
HALF_DTYPES = (torch.float16, torch.bfloat16)


class RoutingError(PetlError, ValueError):
    """Bad input to the routed mixture-of-adapters op or to a router (shapes, ids, NaN/inf)."""


@dataclass(frozen=True)
class Dims:
    """The sizes of one call: T tokens, d width, k picks per token, E experts, r bottleneck width."""

    T: int
    d: int
    k: int
    E: int
    r: int


def check_inputs(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                 b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, activation: str) -> Dims:
    """Check ranks, shapes, dtypes and devices (no host synchronisation); return the sizes."""
    if activation not in ACTIVATIONS:
        raise RoutingError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    named = {"x": x, "expert_ids": expert_ids, "gates": gates, "w_down": w_down, "b_down": b_down,
             "w_up": w_up, "b_up": b_up}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise RoutingError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, rank, layout in (("x", 2, "(T, d)"), ("expert_ids", 2, "(T, k)"), ("gates", 2, "(T, k)"),
                               ("w_down", 3, "(E, d, r)"), ("b_down", 2, "(E, r)"),
                               ("w_up", 3, "(E, r, d)"), ("b_up", 2, "(E, d)")):
        if named[name].dim() != rank:
            raise RoutingError(f"{name} must have rank {rank} {layout}, got shape {tuple(named[name].shape)}")
    T, d = x.shape
    E, _, r = w_down.shape
    k = expert_ids.shape[1]
    if expert_ids.shape[0] != T:
        raise RoutingError(f"expert_ids has {expert_ids.shape[0]} rows but x has T={T} tokens")
    if expert_ids.dtype != torch.int64:
        raise RoutingError(f"expert_ids must be int64, got {expert_ids.dtype}")
    if tuple(gates.shape) != (T, k):
        raise RoutingError(f"gates must have shape (T, k) = {(T, k)} like expert_ids, got {tuple(gates.shape)}")
    if gates.dtype != x.dtype:
        raise RoutingError(f"gates must have x's dtype {x.dtype}, got {gates.dtype}")
    expected = {"w_down": (E, d, r), "b_down": (E, r), "w_up": (E, r, d), "b_up": (E, d)}
    layouts = {"w_down": "(E, d, r)", "b_down": "(E, r)", "w_up": "(E, r, d)", "b_up": "(E, d)"}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise RoutingError(f"{name} must have shape {layouts[name]} = {shape} (E={E}, d={d}, r={r} from "
                               f"w_down and x), got {tuple(named[name].shape)}")
    if E < 1:
        raise RoutingError("w_down has E=0 experts; need at least one")
    for name, t in named.items():
        if name != "expert_ids" and not t.is_floating_point():
            raise RoutingError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise RoutingError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
    return Dims(T=T, d=d, k=k, E=E, r=r)


def check_id_range(lo: int, hi: int, E: int) -> None:
    """Raise when the smallest/largest expert id (already on the host) falls outside [0, E)."""
    if lo < 0 or hi >= E:
        bad = lo if lo < 0 else hi
        raise RoutingError(f"expert_ids must lie in [0, E) = [0, {E}), found {bad}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in: the promoted dtype of its inputs, fp32 for fp16/bf16 ones."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in HALF_DTYPES else dtype


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype `torch.autocast` runs matmuls in on `device`'s type while it is on there; None when
    it is off. Under autocast the implementations take their matmul operands in this dtype (fp32
    weights are cast as autocast casts a Linear's), still accumulating in fp32."""
    kind = torch.device(device).type
    try:
        on = torch.is_autocast_enabled(kind)
    except TypeError:                          # torch < 2.4: no device-type argument
        on = torch.is_autocast_enabled() if kind == "cuda" else kind == "cpu" and torch.is_autocast_cpu_enabled()
        if not on:
            return None
        return torch.get_autocast_gpu_dtype() if kind == "cuda" else torch.get_autocast_cpu_dtype()
    return torch.get_autocast_dtype(kind) if on else None

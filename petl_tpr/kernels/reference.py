"""Plain-torch oracles for the routed mixture-of-adapters op; autograd gives their gradients.

`routed_adapters_reference` routes as DM-Adapter's code does: a Python loop over experts that
selects the tokens sent to expert e, runs the expert on them, weights by the gate and index-adds the
result (one `nonzero`, i.e. one host synchronisation, per expert). `dense_all_experts` runs every
expert on every token and combines with the gates (E/k times the work; no data-dependent shapes).

Both compute in fp32 for fp16/bf16 inputs and return `(T, d)` in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_id_range, check_inputs, compute_dtype

_ACT = {"relu": F.relu, "gelu": F.gelu}


def _cast(dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(dtype) for t in tensors]


def routed_adapters_reference(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                              b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, *,
                              activation: str = "relu", check_ids: bool = True) -> torch.Tensor:
    """`y_t = sum_j gates[t,j] * Ad_e(x_t)` with `e = expert_ids[t,j]`, by a loop over experts.

    x `(T, d)`, expert_ids `(T, k)`, gates `(T, k)`, w_down `(E, d, r)`, b_down `(E, r)`,
    w_up `(E, r, d)`, b_up `(E, d)` -> y `(T, d)`; `Ad_e(z) = act(z W_down[e] + b_down[e]) W_up[e] + b_up[e]`.
    The ids are checked whatever `check_ids` says (the loop synchronises per expert anyway).
    """
    dims = check_inputs(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation)
    del check_ids
    if expert_ids.numel():
        check_id_range(int(expert_ids.min()), int(expert_ids.max()), dims.E)
    dtype = compute_dtype(x, gates, w_down, b_down, w_up, b_up)
    xc, gc, wd, bd, wu, bu = _cast(dtype, x, gates, w_down, b_down, w_up, b_up)
    act = _ACT[activation]
    y = torch.zeros_like(xc)
    for e in range(dims.E):
        token, slot = (expert_ids == e).nonzero(as_tuple=True)   # an expert with no token runs on 0 rows
        h = act(xc[token] @ wd[e] + bd[e]) @ wu[e] + bu[e]
        y = y.index_add(0, token, h * gc[token, slot].unsqueeze(1))
    return y.to(x.dtype)


def dense_all_experts(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                      b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, *,
                      activation: str = "relu") -> torch.Tensor:
    """Same result as the reference, computing all E experts for all T tokens `(E, T, d)`, then
    combining them with a `(T, E)` weight matrix built by scattering the gates at the ids."""
    dims = check_inputs(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation)
    if expert_ids.numel():
        check_id_range(int(expert_ids.min()), int(expert_ids.max()), dims.E)
    dtype = compute_dtype(x, gates, w_down, b_down, w_up, b_up)
    xc, gc, wd, bd, wu, bu = _cast(dtype, x, gates, w_down, b_down, w_up, b_up)
    h = _ACT[activation](torch.baddbmm(bd.unsqueeze(1), xc.unsqueeze(0).expand(dims.E, -1, -1), wd))  # (E, T, r)
    out = torch.baddbmm(bu.unsqueeze(1), h, wu)                                                      # (E, T, d)
    weight = torch.zeros(dims.T, dims.E, dtype=dtype, device=x.device).scatter_add(1, expert_ids, gc)  # (T, E)
    y = torch.einsum("te,etd->td", weight, out)
    return y.to(x.dtype)

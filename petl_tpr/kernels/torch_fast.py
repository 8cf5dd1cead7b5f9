"""Fast plain-torch path of the routed mixture-of-adapters op, with a hand-written backward.

Plan (one host synchronisation per call, whatever E is):
1. sort the `N = T*k` (token, pick) assignments by expert id once; `bounds[e]:bounds[e+1]` is the
   contiguous run of expert e. The bounds and the smallest/largest id reach the host in one transfer.
2. forward, per expert on its run: gather its tokens `x_e (n_e, d)`, `h = x_e W_down[e] + b_down[e]`
   into one preallocated `(N, r)` buffer, `a = act(h)`, and `index_add_` `(g a) W_up[e]` into y. The
   gate scales the r-wide `a`, not the d-wide output; the up biases of all picks are added at once
   as `G b_up` with `G (T, E)` the gates scattered at the expert ids.
3. backward, per expert: gather the upstream rows `dy_e (n_e, d)` once; with `P = dy_e W_up[e]^T`
   `(n_e, r)`: dgate = rowsum(a * P), dW_up = (g a)^T dy_e, dH = act'(h) * g * P,
   dW_down = x_e^T dH, db_down = colsum(dH), dx += dH W_down[e]^T (`index_add_`). Dense, once:
   db_up = G^T dy and dgate += (dy b_up^T) at the ids.

Every temporary is `(n_e, d)` or r-wide; nothing `(N, d)` is formed or saved (the forward keeps
the `(N, r)` pre-activations and x; x_e is gathered again in the backward). On the CPU this matters
beyond memory: fresh tens-of-MB buffers are page-faulted in on every call and cost more than the
gathers themselves, while per-expert temporaries reuse the same heap memory.

fp16/bf16 inputs are computed in fp32; y and every gradient come back in their input's dtype.
Under `torch.autocast` the inputs are first rounded to autocast's dtype (as autocast casts a
Linear's operands), then computed the same way with autocast off inside (its hand-written backward
needs one dtype throughout).

The forward and the backward are `torch.library` custom ops (`petl_tpr::moa_torch_fwd`,
`petl_tpr::moa_torch_bwd`) with fake (meta) implementations, linked by `register_autograd`: their
host transfer and per-expert loop happen inside the op, so `torch.compile(fullgraph=True)` keeps
each as one graph node with no graph break, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import autocast_dtype, check_id_range, check_inputs, compute_dtype


def plan(expert_ids: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sort the `(T, k)` assignments by expert.

    Returns `order (N,)` (sorted position -> flat assignment index `t*k + j`), `token (N,)` (sorted
    position -> token t) and `bounds` (E+1 ints on the host: expert e owns sorted positions
    `bounds[e]:bounds[e+1]`). Raises RoutingError for ids outside [0, E). One device-to-host transfer.
    """
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    if flat.numel() == 0:
        return order, order, [0] * (E + 1)
    edges = torch.searchsorted(sorted_ids, torch.arange(E + 1, device=flat.device, dtype=flat.dtype))
    host = torch.cat([edges, sorted_ids[:1], sorted_ids[-1:]]).tolist()
    check_id_range(host[-2], host[-1], E)
    return order, torch.div(order, k, rounding_mode="floor"), host[: E + 1]


def _segments(bounds: list[int]):
    """(expert, start, stop) of every expert that received at least one assignment."""
    return [(e, s, t) for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])) if t > s]


def _gate_matrix(expert_ids: torch.Tensor, gates: torch.Tensor, E: int) -> torch.Tensor:
    """`G (T, E)`: the gates scattered at their expert ids (repeated picks add up)."""
    return torch.zeros(gates.shape[0], E, dtype=gates.dtype, device=gates.device).scatter_add_(1, expert_ids, gates)


@torch.library.custom_op("petl_tpr::moa_torch_fwd", mutates_args=())
def moa_torch_fwd(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                  b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor,
                  activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y `(T, d)`, and for the backward: h `(N, r)` (relu: the activations, written in place; gelu: the
    pre-activations; sorted order), the plan's order `(N,)` and bounds `(E+1,)` int64 on the CPU (the
    host copy the forward already made, so the backward needs no second transfer). Float inputs share
    one dtype and are contiguous. Raises RoutingError for ids outside [0, E)."""
    T, d = x.shape
    E, _, r = w_down.shape
    order, token, bounds = plan(expert_ids, E)
    gs = gates.reshape(-1).index_select(0, order)                       # (N,) gates in sorted order
    h = torch.empty(token.numel(), r, dtype=x.dtype, device=x.device)   # (N, r) pre-activations
    y = _gate_matrix(expert_ids, gates, E) @ b_up                       # the gate-weighted up biases
    for e, s, t in _segments(bounds):
        idx = token[s:t]
        h_e = torch.addmm(b_down[e], x.index_select(0, idx), w_down[e], out=h[s:t])
        a_e = h_e.relu_() if activation == "relu" else F.gelu(h_e)     # relu in place: h then holds a
        y.index_add_(0, idx, (a_e * gs[s:t].unsqueeze(1)) @ w_up[e])
    return y, h, order, torch.tensor(bounds, dtype=torch.int64)


@moa_torch_fwd.register_fake
def _(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation):
    n, E, r = expert_ids.numel(), w_down.shape[0], w_down.shape[2]
    return (x.new_empty(x.shape), x.new_empty(n, r), expert_ids.new_empty(n),
            torch.empty(E + 1, dtype=torch.int64, device="cpu"))


@torch.library.custom_op("petl_tpr::moa_torch_bwd", mutates_args=())
def moa_torch_bwd(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                  w_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, h: torch.Tensor, order: torch.Tensor,
                  bounds: torch.Tensor, activation: str, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor, torch.Tensor]:
    """dx, dgates, dw_down, db_down, dw_up, db_up (step 3 of the module doc); `needs` has six flags in
    that order, and a gradient not needed comes back as an empty `(0,)` tensor, its work skipped."""
    with torch.autocast(dy.device.type, enabled=False):   # one dtype throughout, even if called under autocast
        return _backward(dy, x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds.tolist(), activation, needs)


@moa_torch_bwd.register_fake
def _(dy, x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds, activation, needs):
    E, _, r = w_down.shape
    shapes = (x.shape, gates.shape, w_down.shape, (E, r), w_up.shape, b_up.shape)
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _backward(dy, x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds, activation, needs):
    need_x, need_g, need_wd, need_bd, need_wu, need_bu = needs
    T, d = x.shape
    E, _, r = w_down.shape
    n, k = order.numel(), expert_ids.shape[1]
    token = torch.div(order, k, rounding_mode="floor")
    gs = gates.reshape(-1).index_select(0, order)
    dy = dy.contiguous().to(x.dtype)
    new = dict(dtype=x.dtype, device=x.device)
    need_h = need_x or need_wd or need_bd
    dx = torch.zeros(T, d, **new) if need_x else None
    dgs = torch.empty(n, **new) if need_g else None
    dwd = torch.zeros(E, d, r, **new) if need_wd else None
    dbd = torch.zeros(E, r, **new) if need_bd else None
    dwu = torch.zeros(E, r, d, **new) if need_wu else None
    dbu = _gate_matrix(expert_ids, gates, E).t() @ dy if need_bu else None
    relu = activation == "relu"
    for e, s, t in _segments(bounds):
        idx, g_e = token[s:t], gs[s:t].unsqueeze(1)                 # (n_e,), (n_e, 1)
        a_e = h[s:t] if relu else F.gelu(h[s:t])                    # (n_e, r)
        dys = dy.index_select(0, idx)                               # (n_e, d) upstream rows
        p = dys @ w_up[e].t()                                       # (n_e, r) = dA / gate
        if need_g:   # d gate = <dy, out> = <a, dy W_up^T> (+ <b_up, dy>, added below)
            torch.sum(a_e * p, 1, out=dgs[s:t])
        if need_wu:  # dW_up = (g a)^T dy
            torch.mm((a_e * g_e).t(), dys, out=dwu[e])
        if not need_h:
            continue
        d_h = p.mul_(g_e)
        d_h = torch.ops.aten.threshold_backward(d_h, a_e, 0) if relu else torch.ops.aten.gelu_backward(d_h, h[s:t])
        if need_bd:
            torch.sum(d_h, 0, out=dbd[e])
        if need_wd:
            torch.mm(x.index_select(0, idx).t(), d_h, out=dwd[e])
        if need_x:
            dx.index_add_(0, idx, d_h @ w_down[e].t())
    dgates = None
    if need_g:
        dgates = torch.empty(n, **new).index_copy_(0, order, dgs).view(T, k)
        dgates += (dy @ b_up.t()).gather(1, expert_ids)
    empty = x.new_empty(0)
    return tuple(empty.clone() if g is None else g for g in (dx, dgates, dwd, dbd, dwu, dbu))


_GRAD_INPUTS = (0, 2, 3, 4, 5, 6)   # x, gates, w_down, b_down, w_up, b_up among moa_torch_fwd's inputs


def _setup_context(ctx, inputs, output):
    x, expert_ids, gates, w_down, _b_down, w_up, b_up, activation = inputs
    _, h, order, bounds = output
    ctx.save_for_backward(x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds)
    ctx.activation = activation


def _autograd_backward(ctx, dy, _dh, _dorder, _dbounds):
    needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_INPUTS]
    grads = moa_torch_bwd(dy, *ctx.saved_tensors, ctx.activation, needs)
    dx, dgates, dwd, dbd, dwu, dbu = (g if need else None for g, need in zip(grads, needs))
    return dx, None, dgates, dwd, dbd, dwu, dbu, None


moa_torch_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def routed_adapters_torch(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                          b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, *,
                          activation: str = "relu", check_ids: bool = True) -> torch.Tensor:
    """`y_t = sum_j gates[t,j] * Ad_e(x_t)`, `e = expert_ids[t,j]`, sorted by expert; see the module doc.

    x `(T, d)`, expert_ids `(T, k)` int64, gates `(T, k)`, w_down `(E, d, r)`, b_down `(E, r)`,
    w_up `(E, r, d)`, b_up `(E, d)` -> y `(T, d)` in x's dtype. The ids are checked whatever
    `check_ids` says: the bounds come to the host in the same transfer.
    """
    check_inputs(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation)
    del check_ids
    amp = autocast_dtype(x.device)
    if amp is not None and x.dtype != torch.float64:   # operands rounded to autocast's dtype, fp32 math inside
        floats = [t.to(amp) for t in (x, gates, w_down, b_down, w_up, b_up)]
        with torch.autocast(x.device.type, enabled=False):
            y = routed_adapters_torch(floats[0], expert_ids, *floats[1:], activation=activation)
        return y.to(x.dtype)
    dtype = compute_dtype(x, gates, w_down, b_down, w_up, b_up)
    args = [t.to(dtype).contiguous() for t in (x, gates, w_down, b_down, w_up, b_up)]
    y, *_ = moa_torch_fwd(args[0], expert_ids.contiguous(), *args[1:], activation)
    return y.to(x.dtype)

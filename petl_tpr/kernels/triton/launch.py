"""Launchers, the `torch.library` custom ops and the public `routed_adapters_triton`.

Layering: `routed_adapters_triton` (checks, dtype policy) -> `petl_tpr::moa_routed_fwd` custom op
(plan + forward kernel) with `register_autograd` -> `petl_tpr::moa_routed_bwd` custom op (token
and weight backward kernels). Both ops have fake (meta) implementations, so torch.compile keeps them as single
graph nodes with no graph break.

Plans, on the device. Slot plan: one stable sort of the flat ids keyed by (slot j, expert)
(`order`) and `bounds (k*E+1,)` from a searchsorted. Pair plan (k = 2): tokens sorted by their
expert pair. Tile tables come from one small kernel (`routed_tiles_kernel`), sized by a static
upper bound (`cdiv(T, BM)` + the number of runs; padding tiles are empty), so the grids need no
host synchronisation. The only host transfer is the smallest/largest id, for the `[0, E)` check
(a `RoutingError`, as in the other implementations), skipped with `check_ids=False`.

Saved for the backward: x, the weights, gates, the slot plan and the `(N, r)` fp32 pre-activations
(row t*k+j; r-wide, not d-wide; the activation is recomputed from them). The forward stores them
only when a gradient will be taken (`save_h`). The token backward writes dH `(N, r)` fp32 once
(row t*k+j) and the weight kernel reads it. Nothing `(N, d)` is formed.

Kinds (`forward_kind`), for the forward and, chosen the same way, the token backward: pair tiles
for k = 2 at small E (tokens grouped by their two experts: x / dy read once, y / dx written once)
or slot passes (`_slot_passes`; kernels.py): each token occurs once per pass, so rows are
combined without atomics in a `(T, d)` fp32 running sum (y itself when x is fp32), and the last
pass writes x's dtype. Either way y and dx are deterministic. The weight gradients are
deterministic with `SPLIT = 1` (one program per (expert, d-block, part)) and combine row shares
with atomic adds when SPLIT > 1.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, replace

import torch
import triton
import triton.language as tl

from ..checks import HALF_DTYPES, RoutingError, autocast_dtype, check_id_range, check_inputs, compute_dtype
from ..torch_fast import routed_adapters_torch
from .kernels import (routed_bwd_token_kernel, routed_bwd_token_pairs_kernel, routed_bwd_weight_kernel,
                      routed_fwd_kernel, routed_fwd_pairs_kernel, routed_tiles_kernel)

ACTS = {"relu": 0, "gelu": 1}
_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (TRITON_INTERPRET=1, read when triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Blocks:
    """Launch configuration of one kernel: BM rows (sorted assignments) per tile, BR >= r bottleneck
    columns, BD columns of d per step (compile-time), and the launch options num_warps/num_stages."""

    BM: int
    BR: int
    BD: int
    num_warps: int = 4
    num_stages: int = 3


KERNELS = ("fwd", "fwd_pairs", "bwd_token", "bwd_token_pairs", "bwd_weight")
_OVERRIDES: dict[str, dict[str, int]] = {}


def blocks(kernel: str, d: int, r: int, dtype: torch.dtype = torch.bfloat16) -> Blocks:
    """The configuration `kernel` (one of KERNELS) is launched with at widths d, r for `dtype` operands;
    tl.dot needs every block dim >= 16. Under the interpreter BM = 16 (small tiles, fast tests).
    `block_overrides` replaces fields (block-size sweeps).

    Chosen so that none of the kernels spills registers on sm_90 at DM-Adapter's shapes in fp32,
    fp16 and bf16, relu and gelu, compiled by triton 3.9 and 3.6 (`compile_report`;
    tests/test_kernels_compile.py; the table in docs/methods/moa.md). Each exception to BM 64,
    BD 64 (fp16/bf16) / 32 (fp32), 8 warps is the smallest change that removed a spill:
    - fwd (slot pass): 4 warps in fp16/bf16; BD 16 in fp32 (3.6 spilled 128 B at 32 with gelu);
    - fwd_pairs (two (BM, BR) accumulators): BM 32 in fp32 (16 B at 64); 4 warps spilled
      120-520 B in bf16 at the vision shape;
    - bwd_token (slot pass): BD 16 and 2 stages in fp32 (12-16 B at BD 32; 4 B with 3 stages);
    - bwd_token_pairs: 16 warps and BD 32 in fp16/bf16 (8 warps spilled 16 B, 16 warps at BD 64
      8 B, with gelu at the vision shape; BM 32 would lose wgmma, which needs 64 rows); BM 32
      and 2 stages in fp32;
    - bwd_weight: BM 32 (at 64, 32 B in fp32 at the text shape, 76 B in bf16 at the vision
      shape once h is read by flat index).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    br = max(16, triton.next_power_of_2(r))
    half = dtype in HALF_DTYPES
    if half:
        widest = 64 if br <= 128 and kernel != "bwd_token_pairs" else 32
    else:
        widest = 16 if kernel in ("fwd", "bwd_token") else 32
    bd = max(16, min(widest, triton.next_power_of_2(d)))
    small = br > 128 or kernel == "bwd_weight" or (kernel in ("fwd_pairs", "bwd_token_pairs") and not half)
    bm = 16 if interpreting() else (32 if small else 64)
    warps = 4 if half and kernel == "fwd" else (16 if half and kernel == "bwd_token_pairs" else 8)
    stages = 2 if kernel in ("bwd_token", "bwd_token_pairs") and not half else 3
    cfg = replace(Blocks(BM=bm, BR=br, BD=bd, num_warps=warps, num_stages=stages), **_OVERRIDES.get(kernel, {}))
    sizes = (cfg.BM, cfg.BR, cfg.BD)
    if cfg.BR < r or any(size < 16 or size & (size - 1) for size in sizes):
        raise ValueError(f"{kernel} blocks {cfg}: BM, BR, BD must be powers of 2 >= 16 and BR >= r = {r}")
    return cfg


@contextlib.contextmanager
def block_overrides(**per_kernel: dict[str, int]):
    """Within the block, launch `kernel` with the given Blocks fields, e.g.
    `block_overrides(fwd={"BM": 128, "num_warps": 8})`. BR must stay >= r; BM, BD >= 16, powers of 2."""
    unknown = set(per_kernel) - set(KERNELS)
    fields = set(Blocks.__dataclass_fields__)
    bad = {name: sorted(set(values) - fields) for name, values in per_kernel.items() if set(values) - fields}
    if unknown or bad:
        raise ValueError(f"unknown kernels {sorted(unknown)} or fields {bad}; kernels {KERNELS}, fields {sorted(fields)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(per_kernel)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def _launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """`kernel[grid](*args, **meta)`; the one place a kernel is launched (`compile_report` swaps it for
    a recorder to compile the very same launches ahead of time, with no GPU)."""
    kernel[grid](*args, **meta)


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA `device`; None elsewhere."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _weight_split(n: int, E: int, d_blocks: int, bm: int, sms: int | None) -> int:
    """Row shares per (expert, d-block) program of the weight-gradient kernel: enough programs to give
    the GPU about 4 per SM, never more shares than row tiles; 1 (deterministic) off the GPU."""
    if sms is None:
        return 1
    split = max(1, min(triton.cdiv(4 * sms, E * d_blocks), triton.cdiv(n, E * bm)))
    return triton.next_power_of_2(split)


def _prec(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting() \
        else "ieee"


def _tiles(bounds: torch.Tensor, T: int, k: int, E: int, bm: int) -> torch.Tensor:
    """tile_start/stop/expert as `(3, k, cdiv(T, bm) + E)`: row j holds slot j's pass, expert e's run
    `bounds[j*E+e]:bounds[j*E+e+1]` cut into tiles of at most bm positions, then empty padding tiles
    (a static count per pass: no host sync). One launch of `routed_tiles_kernel`."""
    tiles = triton.cdiv(T, bm) + E
    out = torch.empty(3, k, tiles, dtype=bounds.dtype, device=bounds.device)
    block_e = max(2, triton.next_power_of_2(E))
    _launch(routed_tiles_kernel, (k,), bounds, out, E, tiles, BM=bm, BLOCK_E=block_e,
            BLOCK_T=max(2, min(128, 2048 // block_e)))      # (BLOCK_T, BLOCK_E) int64 one-hots: no spills
    return out


def _check_ids(expert_ids: torch.Tensor, E: int) -> None:
    """RoutingError unless every id lies in [0, E): one small host transfer (the smallest and largest)."""
    lo, hi = torch.stack(torch.aminmax(expert_ids)).tolist()
    check_id_range(lo, hi, E)


def _plan(expert_ids: torch.Tensor, E: int, check_ids: bool = True):
    """order `(N,)` (sorted position -> flat index t*k+j) and bounds `(k*E+1,)`: the assignments sorted
    by (slot j, expert), so slot j's run of expert e is `bounds[j*E+e]:bounds[j*E+e+1]`, inside
    `[j*T, (j+1)*T)`. On the device; checks the id range first with one small host transfer, unless
    `check_ids` is False. Unchecked invalid ids land in another slot's or no run: the kernels' indices
    all stay in bounds (tokens from `order`, experts from the clamped tile tables), the values do not."""
    k = expert_ids.shape[1]
    if check_ids:
        _check_ids(expert_ids, E)
    keys = expert_ids + torch.arange(0, k * E, E, device=expert_ids.device, dtype=expert_ids.dtype)   # (T, k)
    keys, order = torch.sort(keys.reshape(-1), stable=True)
    bounds = torch.searchsorted(keys, torch.arange(k * E + 1, device=keys.device, dtype=keys.dtype))
    return order, bounds


FORWARD_ENV = "PETL_TPR_MOA_FORWARD"
FORWARD_KINDS = ("auto", "pairs", "slots")
_FORWARD: list[str] = []          # forward_override's stack


def _kind_of_call(x: torch.Tensor, expert_ids: torch.Tensor, w_down: torch.Tensor, kernel: str) -> str:
    """`forward_kind` at this call's sizes, with `kernel`'s (fwd_pairs or bwd_token_pairs) BM."""
    return forward_kind(x.shape[0], expert_ids.shape[1], w_down.shape[0],
                        blocks(kernel, x.shape[1], w_down.shape[2], x.dtype).BM)


def forward_kind(T: int, k: int, E: int, bm: int) -> str:
    """"pairs" or "slots": how the forward runs at these sizes. Pair tiles (k = 2 only) read each x
    row once and write y once, but every possible expert pair gets its own run of tiles, so they
    are picked under "auto" only while the E(E+1)/2 pairs add at most a quarter to the
    cdiv(T, BM) tiles. `forward_override` or `$PETL_TPR_MOA_FORWARD` (auto, pairs, slots) force
    one; "pairs" with k != 2 runs slot passes."""
    mode = _FORWARD[-1] if _FORWARD else (os.environ.get(FORWARD_ENV, "").strip().lower() or "auto")
    if mode not in FORWARD_KINDS:
        raise RoutingError(f"${FORWARD_ENV} must be one of {FORWARD_KINDS}, got {mode!r}")
    if k != 2 or mode == "slots":
        return "slots"
    return "pairs" if mode == "pairs" or 4 * (E * (E + 1) // 2) <= triton.cdiv(T, bm) else "slots"


@contextlib.contextmanager
def forward_override(mode: str):
    """Within the block the forward runs as `mode` (one of FORWARD_KINDS), e.g. to time both."""
    if mode not in FORWARD_KINDS:
        raise ValueError(f"mode must be one of {FORWARD_KINDS}, got {mode!r}")
    _FORWARD.append(mode)
    try:
        yield
    finally:
        _FORWARD.pop()


def _pair_plan(expert_ids: torch.Tensor, gates: torch.Tensor, E: int, bm: int, check_ids: bool):
    """k = 2: tokens sorted by their expert pair `key = e0*E + e1` (e0 <= e1): tok `(T,)` (sorted
    position -> token), the gates `(T, 2)` and original slots `perm (T, 2)` in per-token id order,
    and the tile tables `(3, 1, cdiv(T, bm) + E*E)` over the E*E keys (most pairs' runs are empty)."""
    if check_ids:
        _check_ids(expert_ids, E)
    ids, perm = torch.sort(expert_ids, dim=1, stable=True)
    keys, tok = torch.sort(ids[:, 0] * E + ids[:, 1], stable=True)
    bounds = torch.searchsorted(keys, torch.arange(E * E + 1, device=keys.device, dtype=keys.dtype))
    return tok, gates.gather(1, perm), perm, _tiles(bounds, expert_ids.shape[0], 1, E * E, bm)


def _slot_passes(kernel, tables: torch.Tensor, acc: torch.Tensor, out: torch.Tensor, *, before: tuple, after: tuple, **meta) -> None:
    """Launch `kernel` once per slot j (column j of the `(3, k, P)` tile tables), in order: FIRST/LAST mark
    the first and the last pass; `acc` is the fp32 `(T, d)` running sum, `out` the result."""
    _, k, tiles = tables.shape
    for j in range(k):
        _launch(kernel, (tiles,), *before, *tables[:, j], acc, out, *after, FIRST=j == 0, LAST=j == k - 1, **meta)


def _accumulator(out: torch.Tensor, k: int) -> torch.Tensor:
    """The fp32 running sum of the slot passes: `out` itself when it is fp32 or k == 1 (never read)."""
    return out if out.dtype == torch.float32 or k == 1 else torch.empty(out.shape, dtype=torch.float32,
                                                                          device=out.device)


@torch.library.custom_op("petl_tpr::moa_routed_fwd", mutates_args=())
def moa_routed_fwd(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                   b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, activation: str,
                   save_h: bool = True, check_ids: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """y `(T, d)` in x's dtype, and what the backward needs when `save_h` (else empty): h `(N, r)` fp32
    pre-activations (row t*k+j), the slot plan's order `(N,)` and bounds `(k*E+1,)`. All float
    inputs share one dtype (fp32, fp16 or bf16) and are contiguous. `check_ids=False` skips the
    id-range check and its host transfer: no host synchronisation at all. The forward runs as pair
    tiles or slot passes (`forward_kind`)."""
    T, d = x.shape
    E, _, r = w_down.shape
    k = expert_ids.shape[1]
    n = expert_ids.numel()
    cfg = blocks("fwd", d, r, x.dtype)
    h = torch.empty(n if save_h else 0, r, dtype=torch.float32, device=x.device)
    if n == 0:
        return x.new_zeros(T, d), h, expert_ids.new_empty(0), expert_ids.new_zeros(k * E + 1 if save_h else 0)
    y = torch.empty_like(x)
    meta = dict(ACT=ACTS[activation], DOT=_DOT[x.dtype], PREC=_prec(x.dtype), STORE_H=save_h, **asdict(cfg))
    if _kind_of_call(x, expert_ids, w_down, "fwd_pairs") == "pairs":
        pair_cfg = blocks("fwd_pairs", d, r, x.dtype)
        meta.update(asdict(pair_cfg))
        tok, sorted_gates, perm, tables = _pair_plan(expert_ids, gates, E, pair_cfg.BM, check_ids)
        _launch(routed_fwd_pairs_kernel, (tables.shape[2],), x, w_down, b_down, w_up, b_up, sorted_gates, perm, tok,
                *tables[:, 0], y, h if save_h else y, d, r, E, **meta)
        if not save_h:
            return y, h, expert_ids.new_empty(0), expert_ids.new_empty(0)
        order, bounds = _plan(expert_ids, E, check_ids=False)   # the backward's slot plan (ids checked above)
        return y, h, order, bounds
    order, bounds = _plan(expert_ids, E, check_ids)
    _slot_passes(routed_fwd_kernel, _tiles(bounds, T, k, E, cfg.BM), _accumulator(y, k), y,
                 before=(x, w_down, b_down, w_up, b_up, gates, order), after=(h if save_h else y, d, r, k), **meta)
    return (y, h, order, bounds) if save_h else (y, h, expert_ids.new_empty(0), expert_ids.new_empty(0))


@moa_routed_fwd.register_fake
def _(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation, save_h=True, check_ids=True):
    n, r, E, k = expert_ids.numel(), w_down.shape[2], w_down.shape[0], expert_ids.shape[1]
    if not save_h:
        return x.new_empty(x.shape), x.new_empty(0, r, dtype=torch.float32), *(expert_ids.new_empty(0),) * 2
    return (x.new_empty(x.shape), x.new_empty(n, r, dtype=torch.float32), expert_ids.new_empty(n),
            expert_ids.new_empty(k * E + 1))


@torch.library.custom_op("petl_tpr::moa_routed_bwd", mutates_args=())
def moa_routed_bwd(dy: torch.Tensor, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor,
                   w_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, h: torch.Tensor,
                   order: torch.Tensor, bounds: torch.Tensor, activation: str,
                   kind: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    """dx, dgates, dw_down, db_down, dw_up, db_up, each in its input's dtype (all share x's). `kind`
    ("pairs" or "slots") is the token kernel's; the autograd backward passes the forward's, "auto"
    picks one by `forward_kind`."""
    T, d = x.shape
    E, _, r = w_down.shape
    k = expert_ids.shape[1]
    n = expert_ids.numel()
    if h.shape[0] != n:
        raise RuntimeError("moa_routed_bwd needs the pre-activations: run moa_routed_fwd with save_h=True")
    f32 = dict(dtype=torch.float32, device=x.device)
    dwd, dbd = torch.zeros(E, d, r, **f32), torch.zeros(E, r, **f32)   # separate: custom-op outputs may not alias
    dwu, dbu = torch.zeros(E, r, d, **f32), torch.zeros(E, d, **f32)
    dgates = torch.empty(n, **f32)                            # every assignment's gate gradient is stored
    if n:
        dx = torch.empty_like(x)
        dy = dy.contiguous()
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dh = torch.empty(n, r, **f32)
        common = dict(ACT=ACTS[activation], DOT=_DOT[x.dtype], PREC=_prec(x.dtype))
        if kind == "auto":
            kind = _kind_of_call(x, expert_ids, w_down, "bwd_token_pairs")
        if kind == "pairs":
            pair_cfg = blocks("bwd_token_pairs", d, r, x.dtype)
            tok, sorted_gates, perm, tables = _pair_plan(expert_ids, gates, E, pair_cfg.BM, check_ids=False)
            _launch(routed_bwd_token_pairs_kernel, (tables.shape[2],), dy, w_down, w_up, b_up, sorted_gates, perm, tok,
                    h, *tables[:, 0], dx, dgates, dh, d, r, E, **common, **asdict(pair_cfg))
        else:
            cfg = blocks("bwd_token", d, r, x.dtype)
            _slot_passes(routed_bwd_token_kernel, _tiles(bounds, T, k, E, cfg.BM), _accumulator(dx, k), dx,
                         before=(dy, w_down, w_up, b_up, gates, order, h), after=(dgates, dh, d, r, k), **common,
                         **asdict(cfg))
        cfg = blocks("bwd_weight", d, r, x.dtype)
        d_blocks = triton.cdiv(d, cfg.BD)
        split = _weight_split(n, E, d_blocks, cfg.BM, _sm_count(x.device))
        _launch(routed_bwd_weight_kernel, (E, d_blocks, 2 * split), x, dy, gates, order, h, dh, bounds, dwd, dbd, dwu,
                dbu, d, r, E, k, SPLIT=split, **common, **asdict(cfg))
    else:
        dx = torch.zeros_like(x)
    out = x.dtype
    return dx, dgates.view(T, k).to(gates.dtype), dwd.to(out), dbd.to(out), dwu.to(out), dbu.to(out)


@moa_routed_bwd.register_fake
def _(dy, x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds, activation, kind="auto"):
    E, _, r = w_down.shape
    return (x.new_empty(x.shape), gates.new_empty(gates.shape), w_down.new_empty(w_down.shape),
            x.new_empty(E, r), w_up.new_empty(w_up.shape), b_up.new_empty(b_up.shape))


def _setup_context(ctx, inputs, output):
    x, expert_ids, gates, w_down, b_down, w_up, b_up, activation, *_flags = inputs
    _, h, order, bounds = output
    ctx.save_for_backward(x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds)
    ctx.activation = activation
    # the token backward runs as the forward ran (decided now, under any forward_override in force)
    ctx.kind = _kind_of_call(x, expert_ids, w_down, "fwd_pairs")


def _backward(ctx, dy, _dh, _dorder, _dbounds):
    x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds = ctx.saved_tensors
    dx, dgates, dwd, dbd, dwu, dbu = moa_routed_bwd(dy, x, expert_ids, gates, w_down, w_up, b_up, h, order, bounds,
                                                    ctx.activation, ctx.kind)
    return dx, None, dgates, dwd, dbd, dwu, dbu, None, None, None


moa_routed_fwd.register_autograd(_backward, setup_context=_setup_context)


def _op_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype the kernels read: autocast's fp16/bf16 while torch.autocast is on for the device, else
    a shared fp16/bf16; anything else is fp32. bf16 -> fp32 under the interpreter, whose bf16 tl.dot
    is wrong."""
    amp = autocast_dtype(tensors[0].device)
    dtypes = {t.dtype for t in tensors}
    wanted = amp if amp in HALF_DTYPES else (next(iter(dtypes)) if len(dtypes) == 1 else torch.float32)
    if wanted == torch.float16 or (wanted == torch.bfloat16 and not interpreting()):
        return wanted
    return torch.float32


def routed_adapters_triton(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, w_down: torch.Tensor,
                           b_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, *,
                           activation: str = "relu", check_ids: bool = True) -> torch.Tensor:
    """`y_t = sum_j gates[t,j] * Ad_e(x_t)` by the fused Triton kernels; same contract as the torch path.

    Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton was imported (tests).
    fp64 inputs go to the torch path (the kernels accumulate in fp32).
    """
    dims = check_inputs(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation)
    floats = [x, gates, w_down, b_down, w_up, b_up]
    if compute_dtype(*floats) == torch.float64:
        return routed_adapters_torch(x, expert_ids, gates, w_down, b_down, w_up, b_up, activation=activation,
                                     check_ids=check_ids)
    if x.device.type != "cuda" and not interpreting():
        raise RoutingError(f"the Triton routed-adapter kernels need CUDA tensors (or TRITON_INTERPRET=1 for the "
                           f"interpreter); got device {x.device}")
    del dims
    dtype = _op_dtype(floats)
    args = [t.to(dtype).contiguous() for t in floats]
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in floats)   # only the backward reads h
    y, *_ = moa_routed_fwd(args[0], expert_ids.contiguous(), *args[1:], activation, save_h, check_ids)
    return y.to(x.dtype)

"""Triton kernels of the routed mixture-of-adapters op (forward, token-side backward, weight-side backward).

All three work on the `N = T*k` (token, pick) assignments sorted by (slot j, expert): slot j's T
assignments (one per token) fill sorted positions `[j*T, (j+1)*T)`, by expert, tokens ascending
(`launch.py` builds the sort and the tile tables on the device). Every tensor is contiguous; `d`,
`r` are runtime sizes, the block sizes are compile-time. Accumulation is fp32 (`tl.dot` accumulates in fp32); the dot
operands are cast to `DOT` (the inputs' dtype for fp16/bf16, fp32 otherwise) and fp32 dots use
`PREC` ("ieee" or "tf32", following `torch.backends.cuda.matmul.allow_tf32`).

Combine without atomics: the forward and the token-side backward run once per slot j ("slot
passes", k launches in order on one stream). Within a pass every token occurs exactly once, so
each output row belongs to one program: the first pass stores its fp32 rows, later passes load,
add and store them, and the last pass writes the output dtype (`_combine`). y and dx are therefore
deterministic and need no zero-fill and no cast pass. The weight gradients combine row shares with
atomic adds, `sem="relaxed"` (they only accumulate; the default acq_rel compiles to fenced `atom`
instructions).

Tile `i` of a pass of the forward and of the token-side backward covers sorted positions
`[tile_start[i], tile_stop[i])` (at most BM of them) of expert `tile_expert[i]`; padding tiles have
`start == stop` and do nothing but masked work.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(h, ACT: tl.constexpr):
    """relu (ACT=0) or exact gelu (ACT=1) of fp32 `h`."""
    if ACT == 0:
        out = tl.maximum(h, 0.0)
    else:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return out


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d act / d h at fp32 `h` (relu: 1[h > 0], as torch's threshold_backward)."""
    if ACT == 0:
        out = tl.where(h > 0.0, 1.0, 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    return out


@triton.jit
def _tile_rows(tile_start_ptr, tile_stop_ptr, tile_expert_ptr, order_ptr, gates_ptr, n_slots, r,
               BM: tl.constexpr, BR: tl.constexpr):
    """This program's tile: expert e, sorted positions `pos (BM,)` with their mask, flat assignment
    indices `t*k + j` (from `order`), token ids, fp32 gates (from the flat `(T*k,)` gates), and the
    bottleneck offsets `offr (BR,)` with their mask."""
    pid = tl.program_id(0)
    start = tl.load(tile_start_ptr + pid)
    stop = tl.load(tile_stop_ptr + pid)
    e = tl.load(tile_expert_ptr + pid).to(tl.int64)
    pos = start + tl.arange(0, BM).to(tl.int64)
    mrow = pos < stop
    flat = tl.load(order_ptr + pos, mask=mrow, other=0)
    tok = flat // n_slots
    g = tl.load(gates_ptr + flat, mask=mrow, other=0.0).to(tl.float32)
    offr = tl.arange(0, BR)
    mr = offr < r
    return e, pos, mrow, flat, tok, g, offr, mr


@triton.jit
def _combine(acc_ptr, out_ptr, offs, mask, part, FIRST: tl.constexpr, LAST: tl.constexpr):
    """Slot-pass combine of one fp32 block `part` into rows `offs` (each row belongs to this program
    alone within a pass): add what the earlier passes left in the fp32 `acc` (unless FIRST), then
    store to `acc` or, in the LAST pass, to `out` in out's dtype."""
    if not FIRST:
        part = part + tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if LAST:
        tl.store(out_ptr + offs, part.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + offs, part, mask=mask)


@triton.jit
def routed_fwd_kernel(x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, gates_ptr, order_ptr,
                      tile_start_ptr, tile_stop_ptr, tile_expert_ptr, acc_ptr, y_ptr, h_ptr, d, r, n_slots,
                      ACT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                      STORE_H: tl.constexpr):
    """One tile of one expert in one slot pass: gather x rows, down-projection, bias, activation
    (pre-activation stored to row t*k+j of `h (N, r)` fp32 when STORE_H), gate, up-projection + gated up-bias,
    combined into row `tok` of `acc (T, d)` fp32 / `y (T, d)` (`_combine`)."""
    e, pos, mrow, flat, tok, g, offr, mr = _tile_rows(tile_start_ptr, tile_stop_ptr, tile_expert_ptr, order_ptr,
                                                      gates_ptr, n_slots, r, BM, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, d, BD):
        offk = k0 + tl.arange(0, BD)
        mk = offk < d
        xt = tl.load(x_ptr + tok[:, None] * d + offk[None, :], mask=mrow[:, None] & mk[None, :], other=0.0)
        w = tl.load(wd_ptr + e * d * r + offk[:, None] * r + offr[None, :], mask=mk[:, None] & mr[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT), w.to(DOT), acc, input_precision=PREC)
    bd = tl.load(bd_ptr + e * r + offr, mask=mr, other=0.0).to(tl.float32)
    h = acc + bd[None, :]
    if STORE_H:
        tl.store(h_ptr + flat[:, None] * r + offr[None, :], h, mask=mrow[:, None] & mr[None, :])
    a = (_act(h, ACT) * g[:, None]).to(DOT)          # padded r columns are act(0) = 0
    for n0 in range(0, d, BD):
        offn = n0 + tl.arange(0, BD)
        mn = offn < d
        wu = tl.load(wu_ptr + e * r * d + offr[:, None] * d + offn[None, :], mask=mr[:, None] & mn[None, :], other=0.0)
        out = tl.dot(a, wu.to(DOT), input_precision=PREC)
        bu = tl.load(bu_ptr + e * d + offn, mask=mn, other=0.0).to(tl.float32)
        out = out + g[:, None] * bu[None, :]
        _combine(acc_ptr, y_ptr, tok[:, None] * d + offn[None, :], mrow[:, None] & mn[None, :], out, FIRST, LAST)


@triton.jit
def _two_blocks(ptr, e0, e1, stride, offs, mask):
    """The same block (offsets `offs` within one expert's matrix) of experts e0 and e1."""
    return (tl.load(ptr + e0 * stride + offs, mask=mask, other=0.0),
            tl.load(ptr + e1 * stride + offs, mask=mask, other=0.0))


@triton.jit
def _pair_rows(tile_key_ptr, tok_ptr, gates_ptr, perm_ptr, start, stop, E, r, BM: tl.constexpr, BR: tl.constexpr):
    """A pair tile's experts e0 <= e1 (from its key e0*E + e1), row mask, token ids, fp32 gates of
    both picks, their flat indices t*2 + original slot, and the bottleneck offsets with their mask."""
    key = tl.load(tile_key_ptr + tl.program_id(0)).to(tl.int64)
    pos = start + tl.arange(0, BM).to(tl.int64)
    mrow = pos < stop
    tok = tl.load(tok_ptr + pos, mask=mrow, other=0)
    g0 = tl.load(gates_ptr + tok * 2, mask=mrow, other=0.0).to(tl.float32)
    g1 = tl.load(gates_ptr + tok * 2 + 1, mask=mrow, other=0.0).to(tl.float32)
    flat0 = tok * 2 + tl.load(perm_ptr + tok * 2, mask=mrow, other=0)
    flat1 = tok * 2 + tl.load(perm_ptr + tok * 2 + 1, mask=mrow, other=0)
    offr = tl.arange(0, BR)
    return key // E, key % E, mrow, tok, g0, g1, flat0, flat1, offr, offr < r


@triton.jit
def routed_fwd_pairs_kernel(x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, gates_ptr, perm_ptr, tok_ptr,
                            tile_start_ptr, tile_stop_ptr, tile_key_ptr, y_ptr, h_ptr, d, r, E,
                            ACT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                            DOT: tl.constexpr, PREC: tl.constexpr, STORE_H: tl.constexpr):
    """k = 2, one tile of tokens that picked the same pair of experts (e0 <= e1, `key = e0*E + e1`):
    each x row is gathered once and feeds both down-projections; both up-projections and gated
    biases are summed in registers and stored once to `y (T, d)` in y's dtype (no running sum in
    memory, no atomics). `tok (T,)`: token-sorted-by-key position -> token; `gates (T, 2)` and
    `perm (T, 2)` are in sorted-id order per token (perm = the original slot of each); h rows
    t*2 + perm are stored as the slot kernel stores them."""
    start = tl.load(tile_start_ptr + tl.program_id(0))
    stop = tl.load(tile_stop_ptr + tl.program_id(0))
    if start >= stop:             # a padding tile (the grid is sized for every possible pair)
        return
    e0, e1, mrow, tok, g0, g1, flat0, flat1, offr, mr = _pair_rows(tile_key_ptr, tok_ptr, gates_ptr, perm_ptr, start,
                                                                   stop, E, r, BM, BR)
    acc0 = tl.zeros((BM, BR), dtype=tl.float32)
    acc1 = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, d, BD):
        offk = k0 + tl.arange(0, BD)
        mk = offk < d
        xt = tl.load(x_ptr + tok[:, None] * d + offk[None, :], mask=mrow[:, None] & mk[None, :], other=0.0).to(DOT)
        w0, w1 = _two_blocks(wd_ptr, e0, e1, d * r, offk[:, None] * r + offr[None, :], mk[:, None] & mr[None, :])
        acc0 = tl.dot(xt, w0.to(DOT), acc0, input_precision=PREC)
        acc1 = tl.dot(xt, w1.to(DOT), acc1, input_precision=PREC)
    h0 = acc0 + tl.load(bd_ptr + e0 * r + offr, mask=mr, other=0.0).to(tl.float32)[None, :]
    h1 = acc1 + tl.load(bd_ptr + e1 * r + offr, mask=mr, other=0.0).to(tl.float32)[None, :]
    if STORE_H:
        hmask = mrow[:, None] & mr[None, :]
        tl.store(h_ptr + flat0[:, None] * r + offr[None, :], h0, mask=hmask)
        tl.store(h_ptr + flat1[:, None] * r + offr[None, :], h1, mask=hmask)
    a0 = (_act(h0, ACT) * g0[:, None]).to(DOT)
    a1 = (_act(h1, ACT) * g1[:, None]).to(DOT)
    for n0 in range(0, d, BD):
        offn = n0 + tl.arange(0, BD)
        mn = offn < d
        u0, u1 = _two_blocks(wu_ptr, e0, e1, r * d, offr[:, None] * d + offn[None, :], mr[:, None] & mn[None, :])
        out = tl.dot(a1, u1.to(DOT), tl.dot(a0, u0.to(DOT), input_precision=PREC), input_precision=PREC)
        bu0 = tl.load(bu_ptr + e0 * d + offn, mask=mn, other=0.0).to(tl.float32)
        bu1 = tl.load(bu_ptr + e1 * d + offn, mask=mn, other=0.0).to(tl.float32)
        out = out + g0[:, None] * bu0[None, :] + g1[:, None] * bu1[None, :]
        tl.store(y_ptr + tok[:, None] * d + offn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=mrow[:, None] & mn[None, :])


@triton.jit
def routed_bwd_token_kernel(dy_ptr, wd_ptr, wu_ptr, bu_ptr, gates_ptr, order_ptr, h_ptr,
                            tile_start_ptr, tile_stop_ptr, tile_expert_ptr, acc_ptr, dx_ptr, dgates_ptr, dh_ptr,
                            d, r, n_slots, ACT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                            DOT: tl.constexpr, PREC: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr):
    """One tile of one expert in one slot pass: `P = dy_rows W_up^T`, dgate = <act(h), P> +
    <dy_rows, b_up> (stored at the flat assignment index), `dH = act'(h) g P` (stored to `dh (N, r)`
    fp32, row t*k+j, for the weight kernel), `dH W_down^T` combined into row `tok` of `acc (T, d)` fp32 /
    `dx (T, d)` (`_combine`)."""
    e, pos, mrow, flat, tok, g, offr, mr = _tile_rows(tile_start_ptr, tile_stop_ptr, tile_expert_ptr, order_ptr,
                                                      gates_ptr, n_slots, r, BM, BR)
    p = tl.zeros((BM, BR), dtype=tl.float32)
    bias_dot = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, d, BD):
        offn = n0 + tl.arange(0, BD)
        mn = offn < d
        dyt = tl.load(dy_ptr + tok[:, None] * d + offn[None, :], mask=mrow[:, None] & mn[None, :], other=0.0)
        wu = tl.load(wu_ptr + e * r * d + offr[:, None] * d + offn[None, :], mask=mr[:, None] & mn[None, :], other=0.0)
        p = tl.dot(dyt.to(DOT), tl.trans(wu.to(DOT)), p, input_precision=PREC)
        bu = tl.load(bu_ptr + e * d + offn, mask=mn, other=0.0).to(tl.float32)
        bias_dot += tl.sum(dyt.to(tl.float32) * bu[None, :], axis=1)
    hmask = mrow[:, None] & mr[None, :]
    h = tl.load(h_ptr + flat[:, None] * r + offr[None, :], mask=hmask, other=0.0)
    dg = tl.sum(_act(h, ACT) * p, axis=1) + bias_dot
    tl.store(dgates_ptr + flat, dg, mask=mrow)
    dh = _act_grad(h, ACT) * g[:, None] * p
    tl.store(dh_ptr + flat[:, None] * r + offr[None, :], dh, mask=hmask)
    dh_op = dh.to(DOT)
    for k0 in range(0, d, BD):
        offk = k0 + tl.arange(0, BD)
        mk = offk < d
        w = tl.load(wd_ptr + e * d * r + offk[:, None] * r + offr[None, :], mask=mk[:, None] & mr[None, :], other=0.0)
        dxt = tl.dot(dh_op, tl.trans(w.to(DOT)), input_precision=PREC)
        _combine(acc_ptr, dx_ptr, tok[:, None] * d + offk[None, :], mrow[:, None] & mk[None, :], dxt, FIRST, LAST)


@triton.jit
def _pick_grads(h_ptr, dgates_ptr, dh_ptr, flat, hmask, mrow, offr, r, p, g, bias, ACT: tl.constexpr,
                DOT: tl.constexpr):
    """One pick of a pair tile: load h (flat rows), store dgate = <act(h), P> + <dy, b_up> and
    dH = act'(h) g P (fp32, flat rows); return dH as a `DOT` operand. One pick at a time keeps
    one h tile live (two spilled at the vision shape with gelu)."""
    h = tl.load(h_ptr + flat[:, None] * r + offr[None, :], mask=hmask, other=0.0)
    tl.store(dgates_ptr + flat, tl.sum(_act(h, ACT) * p, axis=1) + bias, mask=mrow)
    dh = _act_grad(h, ACT) * g[:, None] * p
    tl.store(dh_ptr + flat[:, None] * r + offr[None, :], dh, mask=hmask)
    return dh.to(DOT)


@triton.jit
def routed_bwd_token_pairs_kernel(dy_ptr, wd_ptr, wu_ptr, bu_ptr, gates_ptr, perm_ptr, tok_ptr, h_ptr,
                                  tile_start_ptr, tile_stop_ptr, tile_key_ptr, dx_ptr, dgates_ptr, dh_ptr, d, r, E,
                                  ACT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                                  DOT: tl.constexpr, PREC: tl.constexpr):
    """k = 2, one tile of tokens with the same expert pair (the forward's pair tiles): each dy row is
    gathered once for `P_j = dy W_up[e_j]^T`; dgate_j and `dH_j = act'(h_j) g_j P_j` go to the flat
    rows t*2 + perm_j of dgates / dh, and `dx = dH_0 W_down[e0]^T + dH_1 W_down[e1]^T` is summed in
    registers and stored once in dx's dtype."""
    start = tl.load(tile_start_ptr + tl.program_id(0))
    stop = tl.load(tile_stop_ptr + tl.program_id(0))
    if start >= stop:             # a padding tile
        return
    e0, e1, mrow, tok, g0, g1, flat0, flat1, offr, mr = _pair_rows(tile_key_ptr, tok_ptr, gates_ptr, perm_ptr, start,
                                                                   stop, E, r, BM, BR)
    p0 = tl.zeros((BM, BR), dtype=tl.float32)
    p1 = tl.zeros((BM, BR), dtype=tl.float32)
    bias0 = tl.zeros((BM,), dtype=tl.float32)
    bias1 = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, d, BD):
        offn = n0 + tl.arange(0, BD)
        mn = offn < d
        dyt = tl.load(dy_ptr + tok[:, None] * d + offn[None, :], mask=mrow[:, None] & mn[None, :], other=0.0)
        u0, u1 = _two_blocks(wu_ptr, e0, e1, r * d, offr[:, None] * d + offn[None, :], mr[:, None] & mn[None, :])
        p0 = tl.dot(dyt.to(DOT), tl.trans(u0.to(DOT)), p0, input_precision=PREC)
        p1 = tl.dot(dyt.to(DOT), tl.trans(u1.to(DOT)), p1, input_precision=PREC)
        dyf = dyt.to(tl.float32)
        bias0 += tl.sum(dyf * tl.load(bu_ptr + e0 * d + offn, mask=mn, other=0.0).to(tl.float32)[None, :], axis=1)
        bias1 += tl.sum(dyf * tl.load(bu_ptr + e1 * d + offn, mask=mn, other=0.0).to(tl.float32)[None, :], axis=1)
    hmask = mrow[:, None] & mr[None, :]
    dh0_op = _pick_grads(h_ptr, dgates_ptr, dh_ptr, flat0, hmask, mrow, offr, r, p0, g0, bias0, ACT, DOT)
    dh1_op = _pick_grads(h_ptr, dgates_ptr, dh_ptr, flat1, hmask, mrow, offr, r, p1, g1, bias1, ACT, DOT)
    for k0 in range(0, d, BD):
        offk = k0 + tl.arange(0, BD)
        mk = offk < d
        w0, w1 = _two_blocks(wd_ptr, e0, e1, d * r, offk[:, None] * r + offr[None, :], mk[:, None] & mr[None, :])
        dxt = tl.dot(dh1_op, tl.trans(w1.to(DOT)), tl.dot(dh0_op, tl.trans(w0.to(DOT)), input_precision=PREC),
                     input_precision=PREC)
        tl.store(dx_ptr + tok[:, None] * d + offk[None, :], dxt.to(dx_ptr.dtype.element_ty),
                 mask=mrow[:, None] & mk[None, :])


@triton.jit
def _share_rows(order_ptr, n_slots, m0, hi, BM: tl.constexpr):
    """Sorted positions `pos (BM,)` from m0, their mask (< hi), flat assignment indices and token ids,
    for the weight kernel."""
    pos = m0 + tl.arange(0, BM).to(tl.int64)
    mrow = pos < hi
    flat = tl.load(order_ptr + pos, mask=mrow, other=0)
    return pos, mrow, flat, flat // n_slots


@triton.jit
def _share(bounds_ptr, j, E, e, sp, SPLIT: tl.constexpr, BM: tl.constexpr):
    """`[lo, hi)`: the sp-th of SPLIT BM-aligned shares of expert e's run in slot j."""
    s = tl.load(bounds_ptr + j * E + e)
    t = tl.load(bounds_ptr + j * E + e + 1)
    share = tl.cdiv(tl.cdiv(t - s, SPLIT), BM) * BM
    lo = s + sp * share
    return lo, tl.minimum(lo + share, t)


@triton.jit
def routed_bwd_weight_kernel(x_ptr, dy_ptr, gates_ptr, order_ptr, h_ptr, dh_ptr, bounds_ptr,
                             dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, d, r, E, n_slots,
                             ACT: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                             BD: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Program (expert e, d-block, 2 x split s + part): loop over the s-th share of expert e's sorted
    rows in each of the `n_slots` slot runs; part 0 accumulates `dW_down[e, dblk, :] = x^T dH` and
    (d-block 0 only) `db_down[e] = sum dH`, part 1 `dW_up[e, :, dblk] = (g act(h))^T dy` and
    `db_up[e, dblk] = sum g dy`. The two parts read disjoint inputs (x, dH / h, gates, dy), so
    splitting them costs no traffic and halves the accumulator registers. One atomic add of each
    result per program into fp32 buffers that start at zero (deterministic when SPLIT == 1)."""
    e = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    sp = tl.program_id(2) // 2
    part = tl.program_id(2) % 2
    offk = kb * BD + tl.arange(0, BD)
    mk = offk < d
    offr = tl.arange(0, BR)
    mr = offr < r
    if part == 0:
        acc_wd = tl.zeros((BD, BR), dtype=tl.float32)
        acc_bd = tl.zeros((BR,), dtype=tl.float32)
        for j in range(0, n_slots):
            lo, hi = _share(bounds_ptr, j, E, e, sp, SPLIT, BM)
            for m0 in range(lo, hi, BM):
                pos, mrow, flat, tok = _share_rows(order_ptr, n_slots, m0, hi, BM)
                xt = tl.load(x_ptr + tok[:, None] * d + offk[None, :], mask=mrow[:, None] & mk[None, :], other=0.0)
                dh = tl.load(dh_ptr + flat[:, None] * r + offr[None, :], mask=mrow[:, None] & mr[None, :], other=0.0)
                acc_wd = tl.dot(tl.trans(xt.to(DOT)), dh.to(DOT), acc_wd, input_precision=PREC)
                acc_bd += tl.sum(dh, axis=0)
        tl.atomic_add(dwd_ptr + e * d * r + offk[:, None] * r + offr[None, :], acc_wd,
                      mask=mk[:, None] & mr[None, :], sem="relaxed")
        r_here = tl.where(kb == 0, r, 0)                     # db_down from d-block 0 only
        tl.atomic_add(dbd_ptr + e * r + offr, acc_bd, mask=offr < r_here, sem="relaxed")
    else:
        acc_wu = tl.zeros((BR, BD), dtype=tl.float32)
        acc_bu = tl.zeros((BD,), dtype=tl.float32)
        for j in range(0, n_slots):
            lo, hi = _share(bounds_ptr, j, E, e, sp, SPLIT, BM)
            for m0 in range(lo, hi, BM):
                pos, mrow, flat, tok = _share_rows(order_ptr, n_slots, m0, hi, BM)
                g = tl.load(gates_ptr + flat, mask=mrow, other=0.0).to(tl.float32)
                dyt = tl.load(dy_ptr + tok[:, None] * d + offk[None, :], mask=mrow[:, None] & mk[None, :], other=0.0)
                h = tl.load(h_ptr + flat[:, None] * r + offr[None, :], mask=mrow[:, None] & mr[None, :], other=0.0)
                ga = _act(h, ACT) * g[:, None]
                acc_wu = tl.dot(tl.trans(ga.to(DOT)), dyt.to(DOT), acc_wu, input_precision=PREC)
                acc_bu += tl.sum(g[:, None] * dyt.to(tl.float32), axis=0)
        tl.atomic_add(dwu_ptr + e * r * d + offr[:, None] * d + offk[None, :], acc_wu,
                      mask=mr[:, None] & mk[None, :], sem="relaxed")
        tl.atomic_add(dbu_ptr + e * d + offk, acc_bu, mask=mk, sem="relaxed")


@triton.jit
def routed_tiles_kernel(bounds_ptr, tiles_ptr, E, P, BM: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    """Program j builds slot j's tile table in `tiles (3, k, P)` (rows start, stop, expert): expert e's
    run `bounds[j*E+e]:bounds[j*E+e+1]` cut into tiles of at most BM sorted positions, experts in
    order, then empty padding tiles (start = stop = 0, expert E-1) up to the static count P."""
    j = tl.program_id(0)
    k = tl.num_programs(0)
    offe = tl.arange(0, BLOCK_E)
    me = offe < E
    lo = tl.load(bounds_ptr + j * E + offe, mask=me, other=0)
    hi = tl.load(bounds_ptr + j * E + offe + 1, mask=me, other=0)
    tiles = (hi - lo + BM - 1) // BM                        # 0 past E
    last = tl.cumsum(tiles, axis=0)                          # tiles of experts <= e
    first = last - tiles
    total = tl.sum(tiles, axis=0)
    for t0 in range(0, P, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        mt = t < P
        # the tile's expert: how many experts' tiles all come before t (past E, last = total: only
        # padding tiles count those, and they clamp to E-1)
        expert = tl.minimum(tl.sum((last[None, :] <= t[:, None]).to(tl.int64), axis=1), E - 1)
        sel = expert[:, None] == offe[None, :]               # one-hot (BLOCK_T, BLOCK_E): per-tile lookups
        lo_t = tl.sum(tl.where(sel, lo[None, :], 0), axis=1)
        start = lo_t + (t - tl.sum(tl.where(sel, first[None, :], 0), axis=1)) * BM
        stop = tl.minimum(tl.sum(tl.where(sel, hi[None, :], 0), axis=1), start + BM)
        valid = t < total
        tl.store(tiles_ptr + j * P + t, tl.where(valid, start, 0), mask=mt)
        tl.store(tiles_ptr + (k + j) * P + t, tl.where(valid, stop, 0), mask=mt)
        tl.store(tiles_ptr + (2 * k + j) * P + t, expert, mask=mt)

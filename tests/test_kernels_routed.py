"""The routed mixture-of-adapters op: fast torch path vs the reference loop vs dense, gradients, errors, dispatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petl_tpr.kernels import (IMPLS, RoutingError, dense_all_experts, routed_adapters, routed_adapters_reference,
                              routed_adapters_torch, select_impl)
from petl_tpr.kernels import ops

IMPLEMENTATIONS = {"reference": routed_adapters_reference, "torch": routed_adapters_torch}


def make_case(T, d, r, E, k, *, dtype=torch.float64, seed=0, distinct=True, experts=None):
    """Random inputs; `experts` restricts the ids to a subset; distinct=False allows repeated picks."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(E))
    if distinct:
        ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.int64)
    else:
        ids = pool[torch.randint(0, len(pool), (T, k), generator=g)]
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, gates = rnd(T, d), torch.rand(T, k, generator=g, dtype=torch.float64).to(dtype)
    weights = [rnd(E, d, r), rnd(E, r) * 0.5, rnd(E, r, d) * 0.5, rnd(E, d) * 0.5]
    return [x, ids.to(torch.int64), gates, *weights]


def grads(fn, case, activation="relu", seed=1):
    """Output and the gradients of every differentiable input for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(case)]
    y = fn(*leaves, activation=activation)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    upstream = upstream.to(y.device, y.dtype)                   # drawn on the CPU: the same on every device
    y.backward(upstream)
    return y.detach(), [t.grad for i, t in enumerate(leaves) if i != 1]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("distinct", [True, False], ids=["topk", "repeats"])
def test_gradcheck(impl, activation, distinct):
    x, ids, *rest = make_case(7, 5, 3, 4, 2, distinct=distinct, experts=[0, 1, 3])   # expert 2 gets nothing
    inputs = [t.requires_grad_() for t in [x, *rest]]
    fn = IMPLEMENTATIONS[impl]
    assert torch.autograd.gradcheck(lambda x, *r: fn(x, ids, *r, activation=activation), inputs)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 24), d=st.integers(1, 9), r=st.integers(1, 5), E=st.integers(1, 6),
       k_frac=st.floats(0, 1), distinct=st.booleans(), activation=st.sampled_from(["relu", "gelu"]),
       seed=st.integers(0, 2**16))
def test_fast_matches_reference(T, d, r, E, k_frac, distinct, activation, seed):
    k = 1 + int(k_frac * (E - 1)) if distinct else 1 + int(k_frac * (E + 1))   # repeats may exceed E
    case = make_case(T, d, r, E, k, seed=seed, distinct=distinct)
    y_ref, g_ref = grads(routed_adapters_reference, case, activation)
    y_fast, g_fast = grads(routed_adapters_torch, case, activation)
    torch.testing.assert_close(y_fast, y_ref)
    for name, a, b in zip(["x", "gates", "w_down", "b_down", "w_up", "b_up"], g_fast, g_ref):
        torch.testing.assert_close(a, b, msg=lambda m: f"grad of {name}: {m}")
    torch.testing.assert_close(dense_all_experts(*case, activation=activation), y_ref)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_empty_expert_and_no_tokens(impl):
    fn = IMPLEMENTATIONS[impl]
    case = make_case(9, 6, 3, 5, 2, experts=[0, 2, 4])
    y, (dx, dg, dwd, dbd, dwu, dbu) = grads(fn, case)
    for unused in (1, 3):
        assert not dwd[unused].any() and not dbd[unused].any() and not dwu[unused].any() and not dbu[unused].any()
    assert dwd[0].abs().sum() > 0 and dbu[2].abs().sum() > 0
    y0, g0 = grads(fn, make_case(0, 6, 3, 5, 2))
    assert y0.shape == (0, 6) and g0[0].shape == (0, 6) and g0[1].shape == (0, 2)
    assert all(not g.any() for g in g0[2:])


def test_single_expert_equals_plain_adapter():
    x, ids, gates, wd, bd, wu, bu = make_case(11, 6, 3, 1, 1)
    expected = gates * (torch.relu(x @ wd[0] + bd[0]) @ wu[0] + bu[0])
    torch.testing.assert_close(routed_adapters_torch(x, ids, gates, wd, bd, wu, bu), expected)


def test_dense_all_experts_matches_reference_on_repeats():
    case = make_case(13, 7, 4, 3, 4, distinct=False)
    torch.testing.assert_close(dense_all_experts(*case, activation="gelu"),
                               routed_adapters_reference(*case, activation="gelu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    case = make_case(20, 16, 4, 4, 2, dtype=dtype)
    y_ref, g_ref = grads(routed_adapters_reference, case)
    y_fast, g_fast = grads(routed_adapters_torch, case)
    assert y_fast.dtype == dtype and all(g.dtype == dtype for g in g_fast)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y_fast, y_ref, atol=tol, rtol=tol)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=tol * 4, rtol=tol * 4)
    exact = routed_adapters_reference(*[t.double() if t.is_floating_point() else t for t in case])
    torch.testing.assert_close(y_fast.double(), exact, atol=tol * 4, rtol=tol * 4)


def test_mixed_dtypes_keep_each_inputs_dtype():
    x, ids, gates, *weights = make_case(10, 8, 2, 3, 2, dtype=torch.float32)
    x, gates = x.bfloat16().requires_grad_(), gates.bfloat16().requires_grad_()
    weights = [w.requires_grad_() for w in weights]
    y = routed_adapters_torch(x, ids, gates, *weights)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == gates.grad.dtype == torch.bfloat16
    assert all(w.grad.dtype == torch.float32 for w in weights)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS) + ["dense"])
def test_bad_inputs(impl):
    fn = dense_all_experts if impl == "dense" else IMPLEMENTATIONS[impl]
    x, ids, gates, wd, bd, wu, bu = make_case(5, 6, 3, 4, 2)

    def call(**changes):
        args = dict(x=x, expert_ids=ids, gates=gates, w_down=wd, b_down=bd, w_up=wu, b_up=bu) | changes
        return fn(*args.values())

    with pytest.raises(RoutingError, match=r"\[0, 4\).*found 4"):
        call(expert_ids=ids.clone().index_fill_(0, torch.tensor([2]), 4))
    with pytest.raises(RoutingError, match=r"found -1"):
        call(expert_ids=ids.clone().index_fill_(0, torch.tensor([0]), -1))
    with pytest.raises(RoutingError, match=r"w_up must have shape \(E, r, d\) = \(4, 3, 6\).*got \(4, 6, 3\)"):
        call(w_up=wu.transpose(1, 2))
    with pytest.raises(RoutingError, match=r"b_down must have shape \(E, r\) = \(4, 3\)"):
        call(b_down=bd[:3])
    with pytest.raises(RoutingError, match=r"w_down .* rank 3"):
        call(w_down=wd[0])
    with pytest.raises(RoutingError, match=r"gates must have shape \(T, k\) = \(5, 2\)"):
        call(gates=gates[:, :1])
    with pytest.raises(RoutingError, match=r"expert_ids has 4 rows"):
        call(expert_ids=ids[:4])
    with pytest.raises(RoutingError, match="int64"):
        call(expert_ids=ids.int())
    with pytest.raises(RoutingError, match="dtype"):
        call(gates=gates.float())
    with pytest.raises(RoutingError, match="x must have rank 2"):
        call(x=x[None])
    with pytest.raises(RoutingError, match="activation"):
        fn(x, ids, gates, wd, bd, wu, bu, activation="tanh")
    with pytest.raises(ValueError):   # RoutingError is a ValueError
        call(b_up=bu[:, :2])


def test_dispatch_env_var(monkeypatch):
    calls = []
    for name in ("reference", "torch"):
        monkeypatch.setitem(IMPLS, name, lambda *a, _n=name, **kw: calls.append(_n) or a[0])
    case = make_case(3, 4, 2, 2, 1)
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    routed_adapters(*case)
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    routed_adapters(*case)
    routed_adapters(*case, impl="torch")                 # an explicit impl wins over the variable
    monkeypatch.setenv(ops.ENV_VAR, "auto")
    routed_adapters(*case)
    assert calls == ["torch", "reference", "torch", "torch"]
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(RoutingError, match="PETL_TPR_MOA_IMPL.*Triton.*not available"):
        routed_adapters(*case)
    monkeypatch.setenv(ops.ENV_VAR, "cuda-magic")
    with pytest.raises(RoutingError, match="must be one of"):
        routed_adapters(*case)
    with pytest.raises(RoutingError, match="impl must be one of"):
        select_impl("fast", torch.device("cpu"))


def test_dispatch_default_is_the_torch_path(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert select_impl(None, torch.device("cpu")) == "torch"
    case = make_case(6, 5, 2, 3, 2)
    torch.testing.assert_close(routed_adapters(*case), routed_adapters_reference(*case))


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_torch_path_under_autocast_rounds_operands_and_trains(amp):
    """Under torch.autocast the torch path takes its operands in autocast's dtype (fp32 weights cast as
    autocast casts a Linear's) and its backward runs: the same numbers as calling it on pre-rounded
    inputs with autocast off, gradients back in each input's dtype. (Its backward used to fail under
    autocast with a dtype mismatch in a matmul.)"""
    case = make_case(40, 12, 4, 5, 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=amp):
        y, got = grads(routed_adapters_torch, case, "gelu")
    rounded = [t.to(amp) if t.is_floating_point() else t for t in case]
    y_rounded, want = grads(routed_adapters_torch, rounded, "gelu")
    assert y.dtype == torch.float32 and torch.equal(y, y_rounded.float())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b.float())
    reference = routed_adapters_reference(*rounded, activation="gelu")     # and still the op it claims to be
    torch.testing.assert_close(y, reference.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_unchecked_ids(impl):
    """check_ids=False (top-k callers) changes nothing for valid ids; these paths check bad ids anyway (they
    bring the expert runs to the host regardless; only the Triton path skips the check)."""
    fn = IMPLEMENTATIONS[impl]
    x, ids, *rest = make_case(9, 6, 3, 4, 2)
    torch.testing.assert_close(fn(x, ids, *rest, check_ids=False), fn(x, ids, *rest), atol=0, rtol=0)
    bad = ids.clone().index_fill_(0, torch.tensor([3]), 4)
    for check in (True, False):
        with pytest.raises(RoutingError, match="found 4"):
            fn(x, bad, *rest, check_ids=check)

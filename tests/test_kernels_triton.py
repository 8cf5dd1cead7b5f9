"""Triton kernels of the routed mixture-of-adapters op against the reference loop.

On the CPU the kernels run under the Triton interpreter. TRITON_INTERPRET must be set before triton
is first imported, and another test module may already have imported it in this pytest process, so
every interpreter check runs in ONE subprocess (this file run as a script with `--worker`) that
writes a JSON report; the tests below read their entry of it. Tests marked `gpu` run the compiled
kernels in-process on CUDA and are skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GRAD_NAMES = ["y", "x", "gates", "w_down", "b_down", "w_up", "b_up"]

# name -> (T, d, r, E, k, dtype, activation, extra make_case kwargs). Under the interpreter BM = 16
# rows per tile and BD = min(64, next_pow2(d)) columns per step; BR = next_pow2(max(r, 16)).
CASES = {
    "empty-expert-relu": (7, 5, 3, 4, 2, "float32", "relu", {"experts": [0, 1, 3]}),
    "empty-expert-gelu": (7, 5, 3, 4, 2, "float32", "gelu", {"experts": [0, 1, 3]}),
    "odd-d-r-multi-tile-relu": (37, 70, 20, 5, 2, "float32", "relu", {}),
    "odd-d-r-multi-tile-gelu": (37, 70, 20, 5, 2, "float32", "gelu", {}),
    "r-over-32-repeats": (29, 130, 33, 3, 3, "float32", "relu", {"distinct": False}),
    "many-tiles-one-expert": (50, 24, 8, 2, 1, "float32", "relu", {"experts": [1]}),
    "e8-k2": (45, 48, 16, 8, 2, "float32", "gelu", {}),
    "single-token": (1, 3, 1, 1, 1, "float32", "relu", {}),
    "no-tokens": (0, 6, 3, 5, 2, "float32", "relu", {}),
    "fp16-relu": (20, 16, 4, 4, 2, "float16", "relu", {}),
    "fp16-gelu-odd": (40, 72, 12, 6, 2, "float16", "gelu", {}),
    "fp16-k3-middle-pass": (30, 40, 8, 5, 3, "float16", "relu", {}),
    "bf16-via-fp32-operands": (20, 16, 4, 4, 2, "bfloat16", "relu", {}),
}
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}
FORWARDS = ["auto", "pairs", "slots"]
PAIR_CASES = [f"{name}@pairs" for name, spec in CASES.items() if spec[4] == 2]


def _worker(report: Path) -> None:
    """Run every check under the interpreter; write {name: {"ok": bool, "msg": str, "s": seconds}}."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_kernels_routed import grads, make_case

    from petl_tpr.kernels import RoutingError, routed_adapters, routed_adapters_reference, select_impl
    from petl_tpr.kernels.triton import routed_adapters_triton

    results = {}

    def check(name, fn):
        start = time.perf_counter()
        try:
            fn()
            results[name] = {"ok": True, "msg": ""}
        except Exception as error:   # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "msg": f"{type(error).__name__}: {error}"}
        results[name]["s"] = round(time.perf_counter() - start, 3)

    def against_reference(T, d, r, E, k, dtype, activation, extra):
        case = make_case(T, d, r, E, k, dtype=getattr(torch, dtype), **extra)
        got = grads(routed_adapters_triton, case, activation)
        want = grads(routed_adapters_reference, case, activation)
        tol = TOL[dtype]
        for name, a, b in zip(GRAD_NAMES, [got[0], *got[1]], [want[0], *want[1]]):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
            scale = max(1.0, float(b.double().abs().max())) if b.numel() else 1.0   # fp16 sums of many terms
            torch.testing.assert_close(a.double(), b.double(), atol=tol * scale, rtol=tol,
                                       msg=lambda m, name=name: f"{name}: {m}")
        if extra.get("experts") is not None:   # unused experts get exactly zero weight gradients
            unused = sorted(set(range(E)) - set(extra["experts"]))
            for g in got[1][2:]:
                assert not g[unused].any()

    from petl_tpr.kernels.triton import launch

    def with_forward(mode, spec):
        with launch.forward_override(mode):
            T, d, r, E, k = spec[:5]
            assert launch.forward_kind(T, k, E, launch.blocks("fwd", d, r).BM) == ("pairs" if k == 2 else "slots")
            against_reference(*spec)

    for name, spec in CASES.items():
        check(name, lambda spec=spec: against_reference(*spec))
        if spec[4] == 2:      # k = 2 cases again with the pair-tile forward forced
            check(f"{name}@pairs", lambda spec=spec: with_forward("pairs", spec))

    def random_sweep():   # hypothesis-chosen sizes; seeded and without a database, so CI sees the same draws
        from hypothesis import HealthCheck, given, seed, settings
        from hypothesis import strategies as st

        @st.composite
        def specs(draw):
            E, distinct = draw(st.integers(1, 9)), draw(st.booleans())
            k = draw(st.integers(1, E if distinct else E + 1))       # repeated picks may exceed E
            return (draw(st.integers(0, 40)), draw(st.integers(1, 80)), draw(st.integers(1, 40)), E, k,
                    draw(st.sampled_from(["float32", "float16"])), draw(st.sampled_from(["relu", "gelu"])),
                    {"distinct": distinct, "seed": draw(st.integers(0, 2**16))}), draw(st.sampled_from(FORWARDS))

        @seed(1234)
        @settings(max_examples=24, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(drawn=specs())
        def sweep(drawn):
            spec, forward = drawn
            try:
                with launch.forward_override(forward):
                    against_reference(*spec)
            except AssertionError as error:
                raise AssertionError(f"{spec} {forward}: {error}") from error

        sweep()

    def mixed_dtypes():
        x, ids, gates, *weights = make_case(10, 8, 2, 3, 2, dtype=torch.float32)
        x, gates = x.bfloat16().requires_grad_(), gates.bfloat16().requires_grad_()
        weights = [w.requires_grad_() for w in weights]
        y = routed_adapters_triton(x, ids, gates, *weights)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert x.grad.dtype == gates.grad.dtype == torch.bfloat16
        assert all(w.grad.dtype == torch.float32 for w in weights)
        torch.testing.assert_close(y, routed_adapters_reference(x, ids, gates, *weights), atol=2e-2, rtol=2e-2)

    def dispatch():
        case = make_case(6, 5, 2, 3, 2, dtype=torch.float32)
        assert select_impl("auto", torch.device("cpu")) == "torch"        # auto stays torch on the CPU
        assert select_impl("triton", torch.device("cpu")) == "triton"     # forced: runs under the interpreter
        torch.testing.assert_close(routed_adapters(*case, impl="triton"), routed_adapters_reference(*case))
        os.environ["PETL_TPR_MOA_IMPL"] = "triton"
        try:
            torch.testing.assert_close(routed_adapters(*case), routed_adapters_reference(*case))
        finally:
            del os.environ["PETL_TPR_MOA_IMPL"]

    def bad_ids():
        x, ids, *rest = make_case(5, 6, 3, 4, 2, dtype=torch.float32)
        for bad, found in ((4, "found 4"), (-1, "found -1")):
            try:
                routed_adapters_triton(x, ids.clone().index_fill_(0, torch.tensor([2]), bad), *rest)
            except RoutingError as error:
                assert found in str(error), error
            else:
                raise AssertionError(f"id {bad} was accepted")
        assert torch.equal(routed_adapters_triton(x, ids, *rest, check_ids=False), routed_adapters_triton(x, ids, *rest))
        routed_adapters_triton(x, ids.clone().index_fill_(0, torch.tensor([2]), 4), *rest, check_ids=False)  # no raise
        try:
            routed_adapters_triton(x, ids, *rest, activation="tanh")
        except RoutingError:
            pass
        else:
            raise AssertionError("activation tanh was accepted")

    def float64_goes_to_torch():
        case = make_case(9, 7, 3, 3, 2)
        torch.testing.assert_close(routed_adapters_triton(*case), routed_adapters_reference(*case))

    def opcheck():
        from petl_tpr.kernels.triton import moa_routed_fwd
        x, ids, gates, *weights = make_case(9, 20, 5, 3, 2, dtype=torch.float32)
        args = [x.requires_grad_(), ids, gates.requires_grad_(), *[w.requires_grad_() for w in weights], "gelu"]
        for forward in ("slots", "pairs"):        # the fake shapes hold for both forward kinds
            with launch.forward_override(forward):
                torch.library.opcheck(moa_routed_fwd, args,
                                      test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        # (save_h=False is left out: its empty outputs all have data pointer 0, which opcheck's
        # aliasing comparison reads as outputs aliasing each other)

    def compile_fullgraph():   # aot_eager: traces forward and backward through the fake impls, no C++ compile
        case = make_case(30, 20, 5, 4, 2, dtype=torch.float32)
        compiled = torch.compile(lambda *a, activation: routed_adapters(*a, impl="triton", activation=activation) * 2,
                                 fullgraph=True, backend="aot_eager")
        got = grads(compiled, case, "gelu", seed=3)
        want = grads(lambda *a, activation: routed_adapters_reference(*a, activation=activation) * 2, case, "gelu",
                     seed=3)
        for a, b in zip([got[0], *got[1]], [want[0], *want[1]]):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)

    def moa_layer_compile_fullgraph():   # the whole MoA layer on the Triton path: router, op, load balancing
        from petl_tpr.methods.moa import MixtureOfAdapters
        torch.manual_seed(0)
        layer = MixtureOfAdapters(d=20, width=5, experts=4, top_k=2, activation="gelu")
        with torch.no_grad():
            for param in layer.parameters():
                param.add_(torch.randn(param.shape) * 0.1)
        x = torch.randn(3, 7, 20)
        results = []
        for impl, fn in (("reference", layer), ("triton", torch.compile(layer, fullgraph=True, backend="aot_eager"))):
            layer.impl = impl
            layer.zero_grad(set_to_none=True)
            y = fn(x)
            (y.square().sum() + layer.aux_loss()).backward()
            results.append([y.detach(), *[p.grad.clone() for p in layer.parameters()]])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)

    def deterministic_weight_grads():
        case = make_case(40, 33, 6, 3, 2, dtype=torch.float32)
        first, second = grads(routed_adapters_triton, case)[1], grads(routed_adapters_triton, case)[1]
        for a, b in zip(first[2:], second[2:]):
            assert torch.equal(a, b)

    def h_saved_only_for_backward():
        from petl_tpr.kernels.triton import moa_routed_bwd, moa_routed_fwd
        x, ids, gates, *weights = make_case(33, 20, 5, 4, 2, dtype=torch.float16)
        y, h, order, bounds = moa_routed_fwd(x, ids, gates, *weights, "gelu", True)
        y_inference, h_none, _, _ = moa_routed_fwd(x, ids, gates, *weights, "gelu", False)
        assert h.shape == (66, 5) and h_none.shape == (0, 5)
        assert torch.equal(y, y_inference)                      # same kernel math, minus the store
        with torch.no_grad():                                   # the public entry point asks for no h
            assert torch.equal(routed_adapters_triton(x, ids, gates, *weights, activation="gelu"), y)
        try:
            moa_routed_bwd(torch.ones_like(y), x, ids, gates, weights[0], weights[2], weights[3], h_none, order,
                           bounds, "gelu")
        except RuntimeError as error:
            assert "save_h=True" in str(error), error
        else:
            raise AssertionError("the backward ran without the pre-activations")

    def tile_tables_match_torch():   # the plan kernel against a plain-torch construction of the same tables
        from petl_tpr.kernels.triton import launch

        def torch_tiles(bounds, T, k, E, bm):
            lo, hi = bounds[:-1].view(k, E), bounds[1:].view(k, E)
            tiles = (hi - lo + bm - 1) // bm
            last = torch.cumsum(tiles, 1)
            t = torch.arange(-(-T // bm) + E).expand(k, -1).contiguous()
            expert = torch.searchsorted(last, t, right=True).clamp_(max=E - 1)
            start = lo.gather(1, expert) + (t - (last - tiles).gather(1, expert)) * bm
            valid = t < last[:, -1:]
            stop = torch.minimum(hi.gather(1, expert), start + bm)
            return torch.stack([torch.where(valid, start, 0), torch.where(valid, stop, 0), expert])

        rng = torch.Generator().manual_seed(7)
        for T, k, E, bm in ((5000, 2, 6, 16), (3000, 3, 64, 16), (700, 1, 1, 64), (1, 2, 5, 16), (9000, 2, 200, 32)):
            skew = torch.rand(E, generator=rng) ** 4 + 1e-3          # uneven loads, some experts near empty
            ids = torch.multinomial(skew.expand(T, -1), k, generator=rng)
            _, bounds = launch._plan(ids, E)
            got, want = launch._tiles(bounds, T, k, E, bm), torch_tiles(bounds, T, k, E, bm)
            assert torch.equal(got, want), (T, k, E, bm, (got != want).nonzero()[:5].tolist())

    def autocast_operands():   # under autocast the kernels read autocast's dtype (bf16 -> fp32 here)
        from petl_tpr.kernels.triton import launch
        case = make_case(30, 20, 5, 4, 2, dtype=torch.float32)
        seen, real = [], launch.moa_routed_fwd
        launch.moa_routed_fwd = lambda x, *rest: (seen.append(x.dtype), real(x, *rest))[1]
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                y, got = grads(routed_adapters_triton, case, "gelu")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                routed_adapters_triton(*case, activation="gelu")
        finally:
            launch.moa_routed_fwd = real
        assert seen == [torch.float16, torch.float32], seen
        rounded = [t.half() if t.is_floating_point() else t for t in case]
        y_rounded, want = grads(routed_adapters_triton, rounded, "gelu")
        assert y.dtype == torch.float32 and torch.equal(y, y_rounded.float())
        assert all(a.dtype == torch.float32 and torch.equal(a, b.float()) for a, b in zip(got, want))

    def backward_follows_forward_kind():   # an override around the forward alone still sets the backward's kind
        case = make_case(400, 24, 6, 2, 2, dtype=torch.float32)           # auto picks pair tiles here
        assert launch.forward_kind(400, 2, 2, launch.blocks("fwd_pairs", 24, 6).BM) == "pairs"
        real, seen = launch._launch, []
        launch._launch = lambda kernel, *a, **m: (seen.append(kernel.fn.__name__), real(kernel, *a, **m))[1]
        try:
            for forced, token_kernel in (("slots", "routed_bwd_token_kernel"), ("pairs", "routed_bwd_token_pairs_kernel")):
                leaves = [t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(case)]
                with launch.forward_override(forced):
                    y = routed_adapters_triton(*leaves)
                seen.clear()
                upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                y.backward(upstream.to(y.dtype))                          # outside the override; grads()' upstream
                assert token_kernel in seen, (forced, seen)
                want = grads(routed_adapters_reference, case)[1]
                for a, b in zip([t.grad for i, t in enumerate(leaves) if i != 1], want):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        finally:
            launch._launch = real

    for name, fn in (("random-sweep", random_sweep), ("h-saved-only-for-backward", h_saved_only_for_backward),
                     ("backward-follows-forward-kind", backward_follows_forward_kind),
                     ("autocast-operands", autocast_operands),
                     ("tile-tables-match-torch", tile_tables_match_torch), ("mixed-dtypes", mixed_dtypes), ("dispatch", dispatch), ("bad-ids", bad_ids),
                     ("float64-goes-to-torch", float64_goes_to_torch), ("opcheck", opcheck), ("compile-fullgraph", compile_fullgraph),
                     ("moa-layer-compile-fullgraph", moa_layer_compile_fullgraph),
                     ("deterministic-weight-grads", deterministic_weight_grads)):
        check(name, fn)
    report.write_text(json.dumps(results, indent=1))


EXTRA = ["random-sweep", "h-saved-only-for-backward", "backward-follows-forward-kind", "autocast-operands", "tile-tables-match-torch", "mixed-dtypes", "dispatch", "bad-ids", "float64-goes-to-torch", "opcheck", "compile-fullgraph",
         "moa-layer-compile-fullgraph", "deterministic-weight-grads"]


@pytest.fixture(scope="module")
def interpreter_report(tmp_path_factory):
    pytest.importorskip("triton")
    report = tmp_path_factory.mktemp("triton") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PETL_TPR_MOA_IMPL", None)
    done = subprocess.run([sys.executable, __file__, "--worker", str(report)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and report.exists(), f"worker failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("name", list(CASES) + PAIR_CASES + EXTRA)
def test_interpreter(interpreter_report, name):
    entry = interpreter_report[name]
    assert entry["ok"], entry["msg"]


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    from petl_tpr.kernels import RoutingError, select_impl
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_impl("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RoutingError, match="Triton.*not available.*TRITON_INTERPRET"):
        select_impl("triton", torch.device("cpu"))


# ---- compiled kernels on a GPU --------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(37, 70, 20, 5, 2), (4000, 768, 96, 6, 2), (2000, 512, 64, 64, 2)])
@pytest.mark.parametrize("activation, forward", [("relu", "auto"), ("gelu", "auto"), ("gelu", "pairs")])
def test_cuda_matches_reference(dtype, shape, activation, forward):
    from test_kernels_routed import grads, make_case

    from petl_tpr.kernels import routed_adapters_reference
    from petl_tpr.kernels.triton import launch, routed_adapters_triton
    case = [t.cuda() for t in make_case(*shape, dtype=getattr(torch, dtype))]
    with launch.forward_override(forward):
        got = grads(routed_adapters_triton, case, activation)
    want = grads(routed_adapters_reference, case, activation)
    tol = 10 * TOL[dtype] if dtype == "float32" and torch.backends.cuda.matmul.allow_tf32 else TOL[dtype]
    for name, a, b in zip(GRAD_NAMES, [got[0], *got[1]], [want[0], *want[1]]):
        scale = max(1.0, float(b.double().abs().max()))
        torch.testing.assert_close(a.double(), b.double(), atol=4 * tol * scale, rtol=4 * tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("forward", ["pairs", "slots"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_y_and_dx_are_deterministic(dtype, forward):
    """y (one store per token, or ordered slot passes) and dx (ordered slot passes) use no atomics, so
    two runs agree bit for bit; the weight gradients combine row shares atomically on the GPU and
    are only compared to the reference."""
    from test_kernels_routed import grads, make_case

    from petl_tpr.kernels.triton import launch, routed_adapters_triton
    case = [t.cuda() for t in make_case(4000, 768, 96, 6, 2, dtype=getattr(torch, dtype))]
    with launch.forward_override(forward):
        first, second = grads(routed_adapters_triton, case, "gelu"), grads(routed_adapters_triton, case, "gelu")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][0], second[1][0])


@pytest.mark.gpu
@needs_cuda
def test_cuda_auto_picks_triton_and_compiles_without_graph_break():
    from test_kernels_routed import make_case

    import petl_tpr.kernels.triton  # noqa: F401 - imported before tracing
    from petl_tpr.kernels import routed_adapters, routed_adapters_reference, select_impl
    assert select_impl("auto", torch.device("cuda")) == "triton"
    case = [t.cuda() for t in make_case(300, 64, 16, 4, 2, dtype=torch.float32)]
    compiled = torch.compile(lambda *a: routed_adapters(*a, impl="triton") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*case), 2 * routed_adapters_reference(*case), atol=1e-3, rtol=1e-3)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))

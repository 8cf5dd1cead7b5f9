"""Every preset on every family compiles to one graph (`fullgraph=True`) and matches eager.

Each family's tiny example model gets a preset injected and its adapters perturbed; its `run` is then
fed a stand-in (`Compiled`) that sends the model call, and every method `run` calls on it
(open_clip's `encode_image` / `encode_text`), through `torch.compile(fullgraph=True,
backend="aot_eager")`: AOTAutograd traces forward and backward through the fake implementations of
the custom ops, with no C++ compile. Outputs and the gradients of every adapter parameter are
compared with the eager model, and `torch._dynamo.explain` must count zero graph breaks.

The default run compiles `dm-adapter` (the routed custom op; it used to break the graph) on every
family, and `up-person` (S-Prefix, LoRA, L-Adapter) and `unipt` (side network) on transformers CLIP;
the rest of the 7 x 11 matrix is marked slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import petl_tpr as pt
from petl_tpr.kernels import RoutingError
from petl_tpr.kernels.torch_fast import moa_torch_fwd
from petl_tpr.presets import PRESETS
from petl_tpr.registry import FAMILIES

from conftest import family_example, perturb
from test_kernels_routed import grads, make_case

QUICK = {(f, "dm-adapter") for f in FAMILIES} | {("hf_clip", "up-person"), ("hf_clip", "unipt")}
MATRIX = [pytest.param(f, p, marks=() if (f, p) in QUICK else pytest.mark.slow, id=f"{f}-{p}")
          for f in FAMILIES for p in PRESETS
          if not {e["method"] for e in PRESETS[p]} & set(FAMILIES[f].refuses)]   # refusals: test_contract


class Compiled:
    """What `run(model)` is given instead of the model: calls go through `wrap(fn)` (compile or explain),
    one wrapped function per name; other attributes are the model's own."""

    def __init__(self, model: torch.nn.Module, wrap) -> None:
        self._model, self._wrap, self._fns = model, wrap, {}

    def _fn(self, name: str):
        if name not in self._fns:
            self._fns[name] = self._wrap(self._model if name == "__call__" else getattr(self._model, name))
        return self._fns[name]

    def __call__(self, *args, **kwargs):
        return self._fn("__call__")(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._model, name)
        return self._fn(name) if callable(value) and not isinstance(value, torch.nn.Module) else value


def _outputs_and_grads(model: torch.nn.Module, run, target) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = pt.api.adapter_parameters(model)
    for p in params.values():
        p.grad = None
    out = run(target)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    ((out * upstream).sum() + pt.aux_loss(model)).backward()   # the router's load balancing too (dm-adapter)
    return out.detach(), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def _injected(family: str, preset: str):
    model, run = family_example(family)
    pt.inject(model, pt.Spec.preset(preset))
    perturb(model)
    return model, run


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()   # every test compiles new models: no stale guards, no recompile limit
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family,preset", MATRIX)
def test_preset_compiles_fullgraph_and_matches_eager(family, preset):
    model, run = _injected(family, preset)
    want_out, want_grads = _outputs_and_grads(model, run, model)
    assert want_grads, "no adapter parameter got a gradient"
    compile_ = lambda fn: torch.compile(fn, fullgraph=True, backend="aot_eager")  # noqa: E731
    got_out, got_grads = _outputs_and_grads(model, run, Compiled(model, compile_))
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {key}: {m}")
    reports = []

    def explain(fn):
        def call(*args, **kwargs):
            reports.append(torch._dynamo.explain(fn)(*args, **kwargs))
            return fn(*args, **kwargs)
        return call

    with torch.no_grad():
        run(Compiled(model, explain))
    assert reports and all(r.graph_count == 1 and r.graph_break_count == 0 for r in reports), \
        [(r.graph_count, r.graph_break_count, [b.reason for b in r.break_reasons]) for r in reports]


def test_torch_path_op_passes_opcheck():
    x, ids, gates, *weights = make_case(9, 20, 5, 3, 2, dtype=torch.float32)
    for activation in ("relu", "gelu"):
        args = [x.requires_grad_(), ids, gates.requires_grad_(), *[w.requires_grad_() for w in weights], activation]
        torch.library.opcheck(moa_torch_fwd, args)


def test_torch_path_compiles_fullgraph_forward_and_backward():
    from petl_tpr.kernels import routed_adapters, routed_adapters_reference
    case = make_case(30, 20, 5, 4, 2, dtype=torch.float32)
    compiled = torch.compile(lambda *a, activation: routed_adapters(*a, impl="torch", activation=activation) * 2,
                             fullgraph=True, backend="aot_eager")
    y, got = grads(compiled, case, "gelu", seed=3)
    y_ref, want = grads(lambda *a, activation: routed_adapters_reference(*a, activation=activation) * 2, case,
                        "gelu", seed=3)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_bad_ids_still_raise_routing_error_when_compiled():
    from petl_tpr.kernels import routed_adapters
    x, ids, *rest = make_case(6, 4, 2, 3, 2, dtype=torch.float32)
    ids[2, 0] = 3
    compiled = torch.compile(lambda *a: routed_adapters(*a, impl="torch"), fullgraph=True, backend="aot_eager")
    with pytest.raises(RoutingError, match=r"\[0, 3\).*found 3"):
        compiled(x, ids, *rest)


def test_router_check_is_eager_only():
    """Eager: RoutingError naming the layer. Compiled: no check (no host read in the graph); the NaN
    flows to the output and the top-k ids stay in [0, E)."""
    from petl_tpr.methods.moa import MixtureOfAdapters
    layer = MixtureOfAdapters(d=8, width=2, experts=3, top_k=2)
    layer.site_name = "blocks.1.mlp"
    x = torch.randn(2, 5, 8)
    x[1, 2, 3] = float("nan")
    with pytest.raises(RoutingError, match=r"^blocks\.1\.mlp: moa router input .* 1 of 10 tokens \(8 NaN"):
        layer(x)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert out[1, 2].isnan().all() and out[0].isfinite().all()


@pytest.mark.slow
def test_compile_benchmark_quick(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import compile as bench   # benchmarks/compile.py

    bench.main(["--quick", "--backend", "aot_eager", "--presets", "bare", "dm-adapter", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "compile_cpu_quick.json").read_text())
    assert list(data["variants"]) == ["bare", "dm-adapter"] and (tmp_path / "compile_cpu_quick.png").is_file()
    for row in data["variants"].values():
        assert set(row["times"]) == {"eager forward", "compiled forward", "eager train", "compiled train"}
        assert row["forward_max_abs_diff"] < 1e-4 and row["train_max_abs_diff"] < 1e-4
        assert row["forward_first_call_s"] > 0 and row["train_speedup"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["hf_clip", "timm_vit"])
def test_dm_adapter_compiles_fullgraph_with_inductor_on_cuda(family):
    """The Triton path (auto on CUDA) inside the whole model, compiled by inductor, against eager."""
    pytest.importorskip("triton")
    from torch.utils._pytree import tree_map

    from petl_tpr.kernels import select_impl
    assert select_impl(None, torch.device("cuda")) == "triton"
    model, run = _injected(family, "dm-adapter")
    model.cuda()

    def on_cuda(fn):   # run() builds its inputs on the CPU
        move = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
        return lambda *args, **kwargs: fn(*tree_map(move, args), **tree_map(move, kwargs))

    want_out, want_grads = _outputs_and_grads(model, run, Compiled(model, on_cuda))
    got_out, got_grads = _outputs_and_grads(model, run, Compiled(model, lambda fn: on_cuda(torch.compile(fn, fullgraph=True))))
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"grad of {key}: {m}")


def test_a_graph_compiled_without_adapters_is_not_reused_for_an_injected_model():
    """dynamo skips hook guards by default: without `guard_hooks` (compiled.py) the second model of a
    class, injected after the first was compiled bare, reused the hook-free graph and skipped its LoRA."""
    from petl_tpr.registry import FAMILIES as families

    torch._dynamo.reset()
    first, run = families["hf_clip"].build_example()
    bare, _ = families["hf_clip"].build_example()
    pt.inject(first, "lora")
    compiled_first = torch.compile(first, backend="eager")
    with torch.no_grad():
        run(compiled_first)
        pt.merge(first)              # its LoRA hooks go: dynamo recompiles it hook-free
        run(compiled_first)
    model, _ = families["hf_clip"].build_example()
    pt.inject(model, "lora")
    perturb(model)
    with torch.no_grad():
        eager = run(model)
        compiled = run(torch.compile(model, backend="eager"))
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
        assert (eager - run(bare)).abs().max() > 1e-4, "the perturbed LoRA must change the outputs"
    torch._dynamo.reset()

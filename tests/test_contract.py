"""The contract suite: every registered method on every registered family, same checks for all.

Methods and families come from the registries, so a new one is picked up without editing this file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import petl_tpr as pt
from petl_tpr.backbones import discover
from petl_tpr.registry import FAMILIES, METHODS

from conftest import (assert_no_petl_traces, assert_state_equal, family_example, method_cases, perturb,
                      state_snapshot)

CASES = method_cases()
PAIRS = [(f, c) for f in FAMILIES for c in CASES
         if not {e["method"] for e in CASES[c]} & set(FAMILIES[f].refuses)]   # refusals: test_refusals below
REFUSED = [(f, m) for f in FAMILIES for m in FAMILIES[f].refuses]


def _spec(case: str) -> pt.Spec:
    return pt.Spec.from_dict({"entries": CASES[case]})


def _all_identity(case: str) -> bool:
    return all(METHODS[e["method"]].identity_at_init for e in CASES[case])


@pytest.mark.parametrize("family,case", PAIRS)
def test_identity_at_init_and_trainable_set(family, case):
    model, run = family_example(family)
    fingerprint = discover(model).fingerprint()
    with torch.no_grad():
        reference = run(model)
    pt.inject(model, _spec(case))
    assert discover(model).fingerprint() == fingerprint, "an injected model must still be recognised"
    if _all_identity(case):
        with torch.no_grad():
            # A taken-over attention recomputes through SDPA, not the module's own kernel: equal up to
            # float32 rounding (a few ulp of the output), which depends on the CPU's kernels.
            torch.testing.assert_close(run(model), reference, atol=1e-6, rtol=1e-6)
    adapters = {id(p) for p in pt.api.adapter_parameters(model).values()}
    assert adapters, "no adapter parameter was created"
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) in adapters), name


@pytest.mark.parametrize("family,case", PAIRS)
def test_gradients_reach_only_adapters(family, case):
    model, run = family_example(family)
    pt.inject(model, _spec(case))
    perturb(model)
    run(model).square().sum().backward()
    adapter_params = pt.api.adapter_parameters(model)
    for key, param in adapter_params.items():
        assert param.grad is not None, f"{key} got no gradient"
    assert any(p.grad.abs().sum() > 0 for p in adapter_params.values())
    adapters = {id(p) for p in adapter_params.values()}
    for name, param in model.named_parameters():
        if id(param) not in adapters:
            assert param.grad is None, f"base parameter {name} got a gradient"


@pytest.mark.parametrize("family,case", PAIRS)
def test_merge_equals_unmerged(family, case):
    if not any(METHODS[e["method"]].mergeable for e in CASES[case]):
        pytest.skip("no mergeable method in this case")
    model, run = family_example(family)
    with torch.no_grad():
        bare = run(model)
    pt.inject(model, _spec(case))
    perturb(model)
    with torch.no_grad():
        unmerged = run(model)
        merged_keys = pt.merge(model)
        merged = run(model)
    assert merged_keys
    assert (unmerged - bare).abs().max() > 1e-4, "adapters had no effect: the test could not fail"
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    left = {a.method for a in pt.api.get_injection(model).attachments}
    assert not any(METHODS[m].mergeable for m in left)


@pytest.mark.parametrize("family,case", PAIRS)
def test_eject_restores_everything(family, case):
    model, run = family_example(family)
    before = state_snapshot(model)
    classes = {name: type(m) for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        reference = run(model)
    pt.inject(model, _spec(case))
    perturb(model)
    with torch.no_grad():
        assert (run(model) - reference).abs().max() > 1e-4
    pt.eject(model)
    assert_state_equal(before, model)
    assert_no_petl_traces(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(run(model), reference)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    from petl_tpr.compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    import petl_tpr as pt
    from petl_tpr.registry import FAMILIES
    results = {}
    for name, family, path, expected in json.load(open(sys.argv[1])):
        model, run = FAMILIES[family].build_example()
        pt.load_adapters(model, path)
        with torch.no_grad():
            diff = (run(model) - torch.load(expected)).abs().max().item()
        results[name] = diff
    print(json.dumps(results))
""")


def test_save_load_equal_in_fresh_process(tmp_path):
    jobs = []
    for family, case in PAIRS:
        model, run = family_example(family)
        pt.inject(model, _spec(case))
        perturb(model, seed=len(jobs))
        path = pt.save_adapters(model, tmp_path / f"{family}-{case}.safetensors")
        with torch.no_grad():
            torch.save(run(model), tmp_path / f"{family}-{case}.pt")
        jobs.append((f"{family}/{case}", family, str(path), str(tmp_path / f"{family}-{case}.pt")))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == {job[0] for job in jobs}
    bad = {name: diff for name, diff in results.items() if not diff <= 1e-6}
    assert not bad, f"outputs differ after reload in a fresh process: {bad}"


@pytest.mark.parametrize("family,method", REFUSED)
def test_refusals_are_clear_errors_at_inject(family, method):
    """What a family refuses by design is a PetlError at inject that names the method, and touches nothing."""
    model, _ = family_example(family)
    before = state_snapshot(model)
    entry = next(e for case in CASES.values() for e in case if e["method"] == method)
    with pytest.raises(pt.PetlError, match=method.replace("-", "[-_]")):
        pt.inject(model, pt.Spec.from_dict({"entries": [entry]}))
    assert_state_equal(before, model)
    assert_no_petl_traces(model)

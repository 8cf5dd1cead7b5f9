"""Several adapter sets on one backbone: naming, switching, disabling, per-sample mixing, save/load, merge, eject.

The per-sample parity runs every method case on every family: row i of a mixed batch must equal
what the model gives for that row under `activate(names[i])`, and gradients must reach only the
sets present in the batch. Which output elements belong to which batch row is found from the bare
model itself (a perturbation of row 0's hidden states at the first block of every branch), so the
check does not depend on how a family's example flattens its outputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import petl_tpr as pt
from petl_tpr.backbones import discover
from petl_tpr.registry import FAMILIES, METHODS
from petl_tpr.runcheck import pending_keys

from conftest import (assert_no_petl_traces, assert_state_equal, family_example, method_cases, perturb,
                      state_snapshot)

CASES = method_cases()
PAIRS = [(f, c) for f in FAMILIES for c in CASES
         if not {e["method"] for e in CASES[c]} & set(FAMILIES[f].refuses)]


def _spec(case: str) -> pt.Spec:
    return pt.Spec.from_dict({"entries": CASES[case]})


def _row0_elements(model: torch.nn.Module, run) -> torch.Tensor:
    """Bool mask over `run`'s output: the elements that belong to batch row 0 (the examples use 2 rows)."""
    with torch.no_grad():
        plain = run(model)
    handles = []

    def shift_row0(dim):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            index = [slice(None)] * x.dim()
            index[dim] = 0
            x = x.clone()      # random, not constant: a norm would cancel a constant shift
            x[tuple(index)] += torch.randn(x[tuple(index)].shape, generator=torch.Generator().manual_seed(2))
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return hook

    for branch in discover(model).branches.values():
        first = branch.blocks[0]
        module = model.get_submodule(first.path)
        dim = 0 if first.layout.batch_first(module) else 1
        handles.append(module.register_forward_pre_hook(shift_row0(dim), with_kwargs=True))
    with torch.no_grad():
        try:
            shifted = run(model)
        finally:
            for handle in handles:
                handle.remove()
        again = run(model)
    assert torch.equal(plain, again)
    mask = plain != shifted
    assert mask.any() and not mask.all(), "the row map needs elements of both rows"
    return mask


def _two_sets(family: str, case: str):
    model, run = family_example(family)
    row0 = _row0_elements(model, run)
    with torch.no_grad():
        bare = run(model)
    pt.inject(model, _spec(case), name="a")
    pt.inject(model, _spec(case), name="b")
    perturb(model)
    return model, run, row0, bare


def _outputs(model, run) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for name in ("a", "b"):
            pt.activate(model, name)
            out[name] = run(model)
        with pt.disabled(model):
            out["off"] = run(model)
        with pt.per_sample(model, ["a", "b"]):
            out["ab"] = run(model)
        with pt.per_sample(model, ["b", None]):
            out["b-"] = run(model)
    return out


@pytest.mark.parametrize("family,case", PAIRS)
def test_per_sample_rows_equal_each_rows_own_set(family, case):
    model, run, row0, bare = _two_sets(family, case)
    out = _outputs(model, run)
    differ = (out["a"] - out["b"]).abs()
    assert differ[row0].max() > 1e-4 and differ[~row0].max() > 1e-4, "the two sets must give different outputs"
    torch.testing.assert_close(out["ab"], torch.where(row0, out["a"], out["b"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b-"], torch.where(row0, out["b"], bare), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["off"], bare, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family,case", PAIRS)
def test_per_sample_gradients_reach_only_the_sets_in_the_batch(family, case):
    model, run, row0, _ = _two_sets(family, case)
    pt.set_trainable(model, ["a", "b"])       # both trainable (two side networks could not act together)
    weight = torch.randn(row0.shape, generator=torch.Generator().manual_seed(1))
    with pt.per_sample(model, ["a", "a"]):
        (run(model) * weight).sum().backward()
    a_params, b_params = pt.api.adapter_parameters(model, "a"), pt.api.adapter_parameters(model, "b")
    assert all(p.grad is None for p in b_params.values()), "a set absent from the batch got a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a_params.values())
    model.zero_grad(set_to_none=True)
    with pt.per_sample(model, ["a", "b"]):
        (run(model) * weight).sum().backward()
    mixed = {k: None if p.grad is None else p.grad.clone() for k, p in a_params.items()}
    model.zero_grad(set_to_none=True)
    pt.activate(model, "a")                    # set a alone, loss on row 0 only: the same gradient for a
    (run(model) * weight * row0).sum().backward()
    for key, param in a_params.items():
        if param.grad is None:
            assert mixed[key] is None or not mixed[key].any(), key
        else:
            torch.testing.assert_close(mixed[key], param.grad, atol=1e-5, rtol=1e-4, msg=key)
    for name, param in model.named_parameters():
        if not name.count("__") and id(param) not in {id(p) for p in a_params.values()}:
            if param.requires_grad:
                continue
            assert param.grad is None, f"base parameter {name} got a gradient"


def _lora_clip():
    model, run = family_example("hf_clip")
    bare = run(model)
    return model, run, bare


def test_inject_names_sets_and_the_newest_is_the_one_active():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora")
    assert pt.adapter_sets(model) == ["default"] and pt.active_sets(model) == ["default"]
    pt.inject(model, "up-person", name="icfg")
    assert pt.adapter_sets(model) == ["default", "icfg"] and pt.active_sets(model) == ["icfg"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in pt.api.adapter_parameters(model, "icfg").values()}
    names = [n for n, _ in model.named_parameters() if "icfg" in n]
    assert names and all("__icfg." in n for n in names), "other sets' adapters are named <entry>__<set>"
    with pytest.raises(pt.PetlError, match="set name"):
        pt.inject(model, "lora", name="bad name")


def test_activate_switches_without_copying_and_sets_requires_grad():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="cuhk")
    pt.inject(model, "lora", name="icfg")
    perturb(model)
    pointers = {k: p.data_ptr() for k, p in pt.api.adapter_parameters(model).items()}
    pt.activate(model, "cuhk")
    with torch.no_grad():
        cuhk = run(model)
    pt.activate(model, "icfg")
    with torch.no_grad():
        icfg = run(model)
    assert not torch.allclose(cuhk, icfg)
    assert all(p.requires_grad for p in pt.api.adapter_parameters(model, "icfg").values())
    assert not any(p.requires_grad for p in pt.api.adapter_parameters(model, "cuhk").values())
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    run(model).square().sum().backward()
    before = {k: p.detach().clone() for k, p in pt.api.adapter_parameters(model).items()}
    optimiser.step()
    after = pt.api.adapter_parameters(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("__cuhk") or "__cuhk." in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "__icfg." in k)
    assert {k: p.data_ptr() for k, p in pt.api.adapter_parameters(model).items()} == pointers
    with pytest.raises(pt.InjectionError, match="no adapter set named 'nope'"):
        pt.activate(model, "nope")


def test_activate_several_sets_adds_their_deltas():
    model, run, bare = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "lora", name="b")
    perturb(model)
    outs = {}
    with torch.no_grad():
        for names in (["a"], ["b"], ["a", "b"]):
            pt.activate(model, names)
            outs["+".join(names)] = run(model)
    # LoRA on q/v only is not linear in the output, so compare the first layer's projection directly
    q = model.vision_model.encoder.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        results = {}
        for names in (["a"], ["b"], ["a", "b"]):
            pt.activate(model, names)
            results["+".join(names)] = q(x)
        with pt.disabled(model):
            base = q(x)
    torch.testing.assert_close(results["a+b"] - base, (results["a"] - base) + (results["b"] - base), atol=1e-6,
                               rtol=1e-5)
    assert not torch.allclose(outs["a+b"], outs["a"]) and not torch.allclose(outs["a+b"], bare)


def test_disabled_gives_the_bare_backbone_and_restores_on_error():
    model, run, bare = _lora_clip()
    pt.inject(model, "up-person", name="a")
    perturb(model)
    with torch.no_grad():
        injected = run(model)
        with pt.disabled(model):
            torch.testing.assert_close(run(model), bare, atol=1e-6, rtol=1e-6)
        with pytest.raises(RuntimeError, match="boom"):
            with pt.disabled(model):
                raise RuntimeError("boom")
        assert torch.equal(run(model), injected)


def test_two_side_networks_cannot_act_together_but_mix_per_sample():
    model, run, _ = _lora_clip()
    pt.inject(model, "unipt", name="a")
    pt.inject(model, "unipt", name="b")
    with pytest.raises(pt.InjectionError, match="side network"):
        pt.activate(model, ["a", "b"])
    assert pt.active_sets(model) == ["b"], "a refused activate changes nothing"
    with torch.no_grad(), pt.per_sample(model, ["a", "b"]):
        run(model)


def test_per_sample_refuses_bad_names_wrong_batch_and_nesting():
    model, run, _ = _lora_clip()
    pt.inject(model, "up-person", name="a")
    pt.inject(model, "lora", name="b")
    with pytest.raises(pt.InjectionError, match="no adapter set named 'c'"):
        with pt.per_sample(model, ["a", "c"]):
            pass
    with pytest.raises(pt.InputError, match="one name per row"):
        with pt.per_sample(model, ["a", "b", "a"]):
            run(model)
    with pytest.raises(pt.InputError):
        with pt.per_sample(model, "ab"):
            pass
    with pt.per_sample(model, ["a", "b"]):
        with pytest.raises(pt.InjectionError, match="nest"):
            with pt.per_sample(model, ["a", "b"]):
                pass
    with torch.no_grad():
        run(model)          # the gate is back to normal after the errors


def test_run_check_waits_for_an_inert_set_to_act():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "lora", name="b")
    with torch.no_grad():
        run(model)
    pending = pending_keys(model)
    assert pending and all(k.endswith("__a") for k in pending), "only set b acted, so only it is verified"
    pt.activate(model, "a")
    with torch.no_grad():
        run(model)
    assert not pending_keys(model)


def test_merge_needs_a_name_with_several_sets_and_leaves_the_others():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "up-person", name="b")
    perturb(model)
    with pytest.raises(pt.InjectionError, match="merge"):
        pt.merge(model)
    pt.activate(model, "a")
    with torch.no_grad():
        with_a = run(model)
    b_before = {k: p.detach().clone() for k, p in pt.api.adapter_parameters(model, "b").items()}
    pt.merge(model, name="a")
    with torch.no_grad(), pt.disabled(model):
        torch.testing.assert_close(run(model), with_a, atol=1e-5, rtol=1e-5)
    for key, value in pt.api.adapter_parameters(model, "b").items():
        assert torch.equal(value, b_before[key])
    pt.activate(model, "b")
    with torch.no_grad():
        run(model)


def test_eject_one_set_keeps_the_other_exact_and_eject_all_leaves_no_trace():
    model, run, _ = _lora_clip()
    snapshot = state_snapshot(model)
    pt.inject(model, "up-person", name="a")
    pt.inject(model, "prefix", name="b")
    perturb(model)
    pt.activate(model, "a")
    with torch.no_grad():
        with_a = run(model)
    pt.eject(model, name="b")
    assert pt.adapter_sets(model) == ["a"] and not [n for n, _ in model.named_parameters() if "__b" in n]
    with torch.no_grad():
        assert torch.equal(run(model), with_a)
    pt.inject(model, "lora", name="c")
    pt.eject(model)
    assert_no_petl_traces(model)
    assert_state_equal(snapshot, model)
    assert all(p.requires_grad for p in model.parameters())


def test_save_load_keeps_sets_apart(tmp_path):
    model, run, _ = _lora_clip()
    pt.inject(model, "up-person", name="cuhk")
    pt.inject(model, "dm-adapter", name="icfg")
    perturb(model)
    pt.activate(model, ["cuhk"])
    expected = {}
    with torch.no_grad():
        for name in ("cuhk", "icfg"):
            pt.activate(model, name)
            expected[name] = run(model)
    pt.activate(model, "cuhk")
    both, one = tmp_path / "both.safetensors", tmp_path / "icfg.safetensors"
    pt.save_adapters(model, both)
    pt.save_adapters(model, one, name="icfg")
    with safe_open(str(both), "pt") as f:
        meta = f.metadata()
        assert all(k.startswith(("cuhk::", "icfg::")) for k in f.keys())
    assert [s["name"] for s in json.loads(meta["sets"])] == ["cuhk", "icfg"] and json.loads(meta["active"]) == ["cuhk"]
    with safe_open(str(one), "pt") as f:
        assert f.metadata()["set"] == "icfg" and not any("::" in k for k in f.keys())

    fresh, _ = family_example("hf_clip")
    pt.load_adapters(fresh, both)
    assert pt.adapter_sets(fresh) == ["cuhk", "icfg"] and pt.active_sets(fresh) == ["cuhk"]
    with torch.no_grad():
        for name in ("cuhk", "icfg"):
            pt.activate(fresh, name)
            assert torch.equal(run(fresh), expected[name]), name
    snapshot = state_snapshot(fresh)
    with pytest.raises(pt.CheckpointError, match="already has adapter set"):
        pt.load_adapters(fresh, one)
    assert_state_equal(snapshot, fresh)
    with pytest.raises(pt.CheckpointError, match="load it without name"):
        pt.load_adapters(fresh, both, name="x")
    pt.load_adapters(fresh, one, name="icfg2")       # the same set under another name
    pt.activate(fresh, "icfg2")
    with torch.no_grad():
        assert torch.equal(run(fresh), expected["icfg"])


def test_files_that_never_named_a_set_load_as_default(tmp_path):
    model, run, _ = _lora_clip()
    pt.inject(model, "up-person")
    perturb(model)
    with torch.no_grad():
        expected = run(model)
    path = pt.save_adapters(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["set"] == "default"
    fresh, _ = family_example("hf_clip")
    pt.load_adapters(fresh, path)
    assert pt.adapter_sets(fresh) == ["default"]
    with torch.no_grad():
        assert torch.equal(run(fresh), expected)
    again, _ = family_example("hf_clip")      # into a model injected by hand: copied into its default set
    pt.inject(again, "up-person")
    pt.load_adapters(again, path)
    with torch.no_grad():
        assert torch.equal(run(again), expected)


def test_summary_and_aux_loss_per_set():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "dm-adapter", name="b")
    table = pt.summary(model)
    sets = {name: (active, params, trainable) for name, active, params, trainable in table.sets}
    assert sets["a"][0] is False and sets["b"][0] is True and sets["a"][2] == 0 and sets["b"][2] == sets["b"][1] > 0
    assert "set" in table.table() and any(entry.startswith("b/") for _, entry, _ in table.rows)
    pt.activate(model, "a")
    run(model)
    assert float(pt.aux_loss(model)) == 0.0, "an inert set's router loss is not counted"
    pt.activate(model, "b")
    run(model)
    assert float(pt.aux_loss(model).detach()) > 0.0


def test_deepcopy_gives_the_copy_its_own_switch():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "lora", name="b")
    perturb(model)
    twin = copy.deepcopy(model)
    pt.activate(twin, "a")
    assert pt.active_sets(model) == ["b"] and pt.active_sets(twin) == ["a"]
    with torch.no_grad():
        pt.activate(model, "a")
        assert torch.equal(run(model), run(twin))


def test_a_compiled_model_follows_every_switch():
    """torch.compile guards on the set gate: a graph compiled under one set is never reused for another."""
    model, _ = family_example("hf_vit")
    pt.inject(model, "up-person", name="a")
    pt.inject(model, "up-person", name="b")
    perturb(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def states():
        yield "a", lambda: pt.activate(model, "a")
        yield "b", lambda: pt.activate(model, "b")
        yield "off", lambda: pt.disabled(model)
        yield "ab", lambda: pt.per_sample(model, ["a", "b"])
        yield "a", lambda: pt.activate(model, "a")

    def outputs(fn):
        out = []
        with torch.no_grad():
            for _, switch in states():
                context = switch()
                if context is None:
                    out.append(fn(pixel_values=x).last_hidden_state)
                else:
                    with context:
                        out.append(fn(pixel_values=x).last_hidden_state)
        return out

    eager = outputs(model)
    assert not torch.allclose(eager[0], eager[1]) and not torch.allclose(eager[3], eager[0])
    torch._dynamo.reset()
    compiled = outputs(torch.compile(model, backend="aot_eager"))
    for (name, _), want, got in zip(states(), eager, compiled):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)


def test_overwrite_fills_existing_sets_and_a_checkpoint_folder_resumes_named_sets(tmp_path):
    from petl_tpr.integrations.checkpoint import load_adapter_folder, save_adapter_folder

    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="cuhk")
    pt.inject(model, "up-person", name="icfg")
    perturb(model)
    saved = {k: p.detach().clone() for k, p in pt.api.adapter_parameters(model).items()}
    path = pt.save_adapters(model, tmp_path / "both.safetensors")
    save_adapter_folder(model, tmp_path / "ckpt")
    perturb(model, seed=5)                       # training went on
    pt.load_adapters(model, path, overwrite=True)
    assert all(torch.equal(p, saved[k]) for k, p in pt.api.adapter_parameters(model).items())
    perturb(model, seed=6)
    load_adapter_folder(model, tmp_path / "ckpt")
    assert all(torch.equal(p, saved[k]) for k, p in pt.api.adapter_parameters(model).items())
    assert pt.adapter_sets(model) == ["cuhk", "icfg"]


def test_aux_loss_is_the_last_forwards_own():
    model, run, _ = _lora_clip()
    pt.inject(model, "dm-adapter", name="a")
    pt.inject(model, "dm-adapter", name="b")
    perturb(model)
    pt.activate(model, "a")
    run(model)
    with pt.per_sample(model, ["b", "b"]):
        run(model)
    only_b = pt.aux_loss(model)
    pt.activate(model, "b")
    run(model)
    torch.testing.assert_close(only_b, pt.aux_loss(model))      # a's loss from two forwards ago is not in it
    with pt.disabled(model):
        run(model)
    assert float(pt.aux_loss(model).detach()) == 0.0


def test_a_convention_that_hides_its_batch_from_the_prefixes_is_an_error_under_per_sample():
    from petl_tpr.attention import state_of

    model, run, _ = _lora_clip()
    pt.inject(model, "prefix", name="a")
    pt.inject(model, "prefix", name="b")
    state = state_of(model.vision_model.encoder.layers[0].self_attn)
    assert len(state.prefix_tensors()) == 1          # outside per_sample: the active set's prefix
    with pt.per_sample(model, ["a", "b"]), pytest.raises(pt.InjectionError, match="prefix_tensors"):
        state.prefix_tensors()


def test_a_file_saved_with_no_active_set_loads_with_none_active(tmp_path):
    model, run, bare = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "lora", name="b")
    pt.activate(model, [])
    path = pt.save_adapters(model, tmp_path / "ab.safetensors")
    fresh, _ = family_example("hf_clip")
    pt.load_adapters(fresh, path)
    assert pt.active_sets(fresh) == [] and not any(p.requires_grad for p in fresh.parameters())


def test_switching_follows_sets_injected_or_ejected_after_a_switch():
    model, run, _ = _lora_clip()
    pt.inject(model, "lora", name="a")
    pt.inject(model, "lora", name="b")
    pt.activate(model, "a")                       # fills the per-set parameter cache
    pt.eject(model, name="b")
    pt.inject(model, "up-person", name="b")       # new modules under the old name
    pt.activate(model, "a")
    pt.activate(model, "b")
    assert all(p.requires_grad for p in pt.api.adapter_parameters(model, "b").values())
    assert not any(p.requires_grad for p in pt.api.adapter_parameters(model, "a").values())

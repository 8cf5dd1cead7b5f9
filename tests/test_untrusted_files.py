"""Adapter files from anyone, and specs as data: every bad input a clear error, checked before allocation.

Each refused load is checked for its error class, a message naming the offending thing, a model
left exactly as it was (tensor hashes, module classes, hooks, requires_grad: `untouched.Untouched`)
and the good checkpoint file beside it byte for byte intact.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import petl_tpr as pt
import petl_tpr.io as pio
import petl_tpr.sizes as sizes
from petl_tpr.methods.lora import LoRA, LoRAConfig

from conftest import family_example, perturb
from untouched import Untouched

SPEC = {"entries": [{"method": "lora", "config": {"rank": 4, "roles": ["q", "k", "v", "o", "fc1", "fc2"]}},
                    {"method": "l-adapter"}]}
LORA_A = "vision_model.encoder.layers.0.self_attn.q_proj.lora.lora_a"
FIRST = "text_model.encoder.layers.0.self_attn.q_proj.lora.lora_a"   # the first site the spec plans


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    model, _ = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict(SPEC))
    perturb(model)
    return pt.save_adapters(model, tmp_path_factory.mktemp("good") / "good.safetensors")


def _tampered(good, out, *, spec=None, backbone=None, tensors=None, metadata=None):
    """A copy of the good file with its spec dict / backbone / tensors / metadata edited by callables."""
    data, meta = pio.read_adapters(good)
    if spec is not None:
        meta["spec"] = spec(json.loads(meta["spec"])) if callable(spec) else spec
    if backbone is not None:
        meta["backbone"] = backbone
    if tensors is not None:
        data = tensors(dict(data))
    if metadata is not None:
        meta = metadata(dict(meta))
    save_file(data, str(out), metadata=meta)
    return out


def _rank(n):
    def edit(spec):
        spec["entries"][0]["config"]["rank"] = n
        return json.dumps(spec)
    return edit


def _refused(path, good, *fragments, with_adapters=False, **kwargs):
    """Load `path` into a fresh model (and optionally one with adapters): CheckpointError, nothing touched."""
    model, _ = family_example("hf_clip")
    if with_adapters:
        pt.inject(model, pt.Spec.from_dict(SPEC))
    with Untouched(model, good, path):
        with pytest.raises(pt.CheckpointError) as info:
            pt.load_adapters(model, path, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("rank", [20_000, 10**7, 10**12])
def test_tampered_rank_is_refused_from_the_header_before_building(good, tmp_path, rank, monkeypatch):
    path = _tampered(good, tmp_path / "big.safetensors", spec=_rank(rank))
    built = []
    monkeypatch.setattr(LoRA, "build", classmethod(lambda cls, *a, **k: built.append(1)))
    message = _refused(path, good, f"tensor '{FIRST}' has shape (4, 32) in the file but ({rank}, 32) "
                                   f"as the stored spec implies for this model", "elements; in all, the file holds")
    assert f"{rank * 32:,}" in message
    assert built == []


def test_header_claiming_more_data_than_the_file_has(good, tmp_path):
    """A header edited to a bigger shape, data unchanged: safetensors' own open-time validation refuses it."""
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[LORA_A]["shape"] = [10**7, 32]
    text = json.dumps(header).encode()
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    _refused(tmp_path / "h.safetensors", good, "not a readable safetensors file")


def _with(key, tensor):
    return lambda d: {**d, key: tensor}


@pytest.mark.parametrize("edit,fragments", [
    (dict(spec=_rank(2.5)), ["unreadable spec", "LoRAConfig.rank must be an int, got 2.5"]),
    (dict(spec=_rank(True)), ["LoRAConfig.rank must be an int, got True"]),
    (dict(spec=lambda s: json.dumps({**s, "entries": [{**s["entries"][0], "config": {"roles": "qv"}}]})),
     ["LoRAConfig.roles must be a list of strings, got 'qv'"]),
    (dict(spec=lambda s: json.dumps({**s, "entries": [{"method": "prefix", "config": {"length": 10**6}}]})),
     ["PrefixConfig.length must be an int in 1..", "1000000"]),
    (dict(spec=lambda s: json.dumps({**s, "entries": [{"method": "dora"}]})), ["unknown method 'dora'"]),
    (dict(spec="[" * 100_000), ["unreadable spec", "not valid JSON"]),
    (dict(spec=lambda s: json.dumps({**s, "entries": [{**s["entries"][0], "where": {"branches": ["audio"]}}]})),
     ["does not apply to this model", "unknown branch(es) ['audio']"]),
    (dict(backbone="[1, 2]"), ["backbone metadata must map branch names"]),
    (dict(metadata=lambda m: {k: v for k, v in m.items() if k != "spec"}), ["unreadable spec", "'spec'"]),
    (dict(tensors=_with(LORA_A, torch.ones(4, 32, dtype=torch.int64))), [f"tensor '{LORA_A}' has dtype I64"]),
    (dict(tensors=_with("vision_model.extra.lora.lora_a", torch.zeros(2))),
     ["tensor 'vision_model.extra.lora.lora_a' has no matching adapter parameter"]),
    (dict(tensors=lambda d: {k: v for k, v in d.items() if k != LORA_A}),
     [f"adapter parameter '{LORA_A}' (4, 32) is missing from the file"]),
    (dict(tensors=_with(LORA_A, torch.zeros(4, 33))), [f"tensor '{LORA_A}' has shape (4, 33) in the file but (4, 32)"]),
], ids=["float-rank", "bool-rank", "roles-string", "prefix-length", "unknown-method", "deep-json", "unknown-branch",
        "backbone-list", "no-spec", "int-dtype", "extra-key", "missing-key", "wrong-shape"])
def test_bad_file_catalogue(good, tmp_path, edit, fragments):
    path = _tampered(good, tmp_path / "bad.safetensors", **edit)
    _refused(path, good, *fragments)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_refused_unless_allowed(good, tmp_path, bad):
    values = torch.zeros(4, 32)
    values[1, 2] = bad
    path = _tampered(good, tmp_path / "nan.safetensors", tensors=_with(LORA_A, values))
    for with_adapters in (False, True):
        message = _refused(path, good, f"tensor '{LORA_A}' holds 1 non-finite value(s)", "allow_non_finite=True",
                           with_adapters=with_adapters)
        assert ("1 NaN" if bad != bad else "0 NaN") in message
    model, _ = family_example("hf_clip")
    pt.load_adapters(model, path, allow_non_finite=True)
    loaded = pt.api.adapter_parameters(model)[LORA_A]
    assert torch.equal(loaded.isfinite(), values.isfinite()) and not bool(loaded.isfinite().all())


def test_first_non_finite_key_in_key_order(good, tmp_path):
    second = "vision_model.encoder.layers.1.self_attn.q_proj.lora.lora_a"
    path = _tampered(good, tmp_path / "nan.safetensors",
                     tensors=lambda d: {**d, second: torch.full((4, 32), float("nan")),
                                        LORA_A: torch.full((4, 32), float("nan"))})
    _refused(path, good, f"tensor '{LORA_A}' holds 128 non-finite value(s) (128 NaN")


def test_refused_into_a_model_that_already_has_adapters(good, tmp_path):
    path = _tampered(good, tmp_path / "r.safetensors", tensors=_with(LORA_A, torch.zeros(9, 32)))
    _refused(path, good, f"tensor '{LORA_A}' has shape (9, 32) in the file but (4, 32) in the model",
             with_adapters=True)


def test_directory_given_as_the_file(good, tmp_path):
    _refused(tmp_path, good, "is a directory, not an adapter file")


def test_save_to_a_directory_or_under_a_file(good, tmp_path):
    model, _ = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict(SPEC))
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with Untouched(model, good, folder / "keep.txt"):
        with pytest.raises(pt.CheckpointError, match="is a directory; save_adapters writes one file: give a file "
                                                      "path such as .*adapters.safetensors"):
            pt.save_adapters(model, folder)
        with pytest.raises(pt.CheckpointError, match="keep.txt is a file, not a directory"):
            pt.save_adapters(model, folder / "keep.txt" / "a.safetensors")
        with pytest.raises(pt.CheckpointError, match="strings to strings"):
            pt.save_adapters(model, folder / "a.safetensors", extra={"epoch": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_loading_a_good_file_still_works(good):
    model, run = family_example("hf_clip")
    pt.load_adapters(model, good)
    reference, _ = family_example("hf_clip")
    pt.inject(reference, pt.Spec.from_dict(SPEC))
    perturb(reference)
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(reference), atol=0, rtol=0)


# --- specs are data: validation at spec time, sizes at plan time, before any allocation ---------------------------

@pytest.mark.parametrize("config,fragment", [
    ({"rank": 2.5}, "LoRAConfig.rank must be an int, got 2.5"),
    ({"rank": True}, "LoRAConfig.rank must be an int, got True"),
    ({"rank": "8"}, "LoRAConfig.rank must be an int, got '8'"),
    ({"roles": "qv"}, "LoRAConfig.roles must be a list of strings, got 'qv'"),
    ({"roles": 5}, "LoRAConfig.roles must be a list of strings, got 5"),
    ({"roles": [1]}, "LoRAConfig.roles must be a list of strings, got [1]"),
    ({"alpha": float("nan")}, "LoRAConfig.alpha must be a finite number or null, got nan"),
    ({"dropout": 10**400}, "LoRAConfig.dropout must be a finite number"),
])
def test_config_types_are_spec_errors(config, fragment):
    with pytest.raises(pt.SpecError) as info:
        pt.Spec.from_dict({"entries": [{"method": "lora", "config": config}]})
    assert fragment in str(info.value)
    with pytest.raises(pt.SpecError, match="must be"):   # the same from Python, not only from JSON
        LoRAConfig(**config)


@pytest.mark.parametrize("entry,fragment", [
    ({"method": ["lora"]}, "unknown method ['lora']"),
    ({"method": "lora", "where": 5}, "where must be an object"),
    ({"method": "lora", "where": {"roles": 5}}, "where.roles must be null, a name or a list of names, got 5"),
    ({"method": "lora", "where": {"branches": [None]}}, "where.branches must be"),
    ({"method": "lora", "where": {"layers": 1.5}}, "layers must be null"),
    ({"method": "lora", "where": {"layers": [True]}}, "layers must be null"),
    ({"method": "lora", "name": 3}, "entry name must be a string"),
    ({"method": "lora", "compose": ["add"]}, "compose must be"),
    ({"method": "adapter", "config": [1]}, "must be a AdapterConfig or a dict"),
    ({"method": "moa", "config": {"branch_scale": {"text": "x"}}}, "MoAConfig.branch_scale entries must be"),
    ({"method": "adapter", "config": {"bias": 1}}, "AdapterConfig.bias must be true or false, got 1"),
])
def test_malformed_entries_are_spec_errors(entry, fragment):
    with pytest.raises(pt.SpecError) as info:
        pt.Spec.from_dict({"entries": [entry]})
    assert fragment in str(info.value)


@pytest.mark.parametrize("entry,site", [
    ({"method": "lora", "config": {"rank": 10**6}}, "(in_dim 32, out_dim 32) alone needs 64,000,000"),
    ({"method": "adapter", "config": {"width": 10**7}}, "alone needs 650,000,032"),
    ({"method": "moa", "config": {"experts": 10**5, "top_k": 1, "width": 10**3}}, "alone needs 6,509,600,097"),
    ({"method": "unipt", "config": {"width": 10**7}}, "alone needs 1,650,000,033"),
    ({"method": "prefix", "config": {"length": 1, "reparam": True, "reparam_hidden": 10**8}}, "alone needs 9,700,000,096"),
])
def test_sizes_that_cannot_fit_are_refused_at_inject_time(entry, site, monkeypatch):
    monkeypatch.setattr(sizes, "available_bytes", lambda device: 2**30)   # 1 GB free, whatever this machine has
    model, _ = family_example("hf_clip")
    built = []
    monkeypatch.setattr(LoRA, "build", classmethod(lambda cls, *a, **k: built.append(1)))
    with Untouched(model):
        with pytest.raises(pt.SpecError) as info:
            pt.inject(model, pt.Spec.from_dict({"entries": [entry]}))
    message = str(info.value)
    assert "cannot fit" in message and "on cpu, which has 1.0 GB free" in message and site in message, message
    assert f"Entry '{entry['method'].replace('-', '_')}'" in message
    assert built == []


def test_rank_of_a_billion_is_refused_on_this_machine():
    model, _ = family_example("hf_clip")
    with Untouched(model):
        with pytest.raises(pt.SpecError, match="cannot fit.*rank=1000000000.*in_dim 32, out_dim 32"):
            pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"rank": 10**9}}]}))


def test_a_spec_that_fits_is_not_refused(monkeypatch):
    monkeypatch.setattr(sizes, "available_bytes", lambda device: 2**30)
    model, _ = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"rank": 1000}}]}))   # 8 x 256 KB
    monkeypatch.setattr(sizes, "available_bytes", lambda device: None)   # unknown: no refusal
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "adapter"}]}))


def test_a_spec_is_data_whatever_its_sizes():
    """Parsing never allocates for the sizes a spec names (only injecting would, and refuses first)."""
    import tracemalloc

    text = json.dumps({"entries": [{"method": "lora", "config": {"rank": 10**12}},
                                   {"method": "moa", "config": {"experts": 10**12, "width": 10**12}},
                                   {"method": "unipt", "config": {"width": 10**12}}]})
    tracemalloc.start()
    spec = pt.Spec.from_json(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert spec.entries[0].config.rank == 10**12 and peak < 2**20


_KEYS = st.sampled_from(["method", "config", "where", "name", "compose", "entries", "version", "branches", "layers",
                         "roles", "rank", "alpha", "width", "reduction", "length", "experts", "top_k", "scale",
                         "branch_scale", "reparam", "bias", "mode", "activation", "scaling", "router", "x"])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), st.text(max_size=6),
                     st.sampled_from(["lora", "adapter", "l-adapter", "prefix", "s-prefix", "moa", "unipt", "q", "k",
                                      "mlp", "attn", "norm1", "text", "1:2", "add", "relu", "learnable", "parallel"]))
_DATA = st.recursive(_SCALARS, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(_KEYS, c, max_size=5)),
                     max_leaves=16)
_ENTRY = st.fixed_dictionaries(
    {"method": st.sampled_from(["lora", "adapter", "l-adapter", "prefix", "s-prefix", "moa", "unipt"])},
    optional={"config": st.dictionaries(_KEYS, _DATA, max_size=4), "where": _DATA, "name": _DATA, "compose": _DATA})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(_DATA, st.fixed_dictionaries({"entries": st.lists(_ENTRY, max_size=3)}, optional={"version": _DATA})))
def test_any_json_gives_a_spec_or_a_spec_error(data):
    try:
        spec = pt.Spec.from_json(json.dumps(data))
    except pt.SpecError:
        return
    assert pt.Spec.from_json(spec.to_json()) == spec


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_string_gives_a_spec_or_a_spec_error(text):
    try:
        pt.Spec.from_json(text)
    except pt.SpecError:
        pass

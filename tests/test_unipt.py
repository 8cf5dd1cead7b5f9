"""UniPT: the side network against REFERENCE.md's formulas, its taps, and its memory property."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import petl_tpr as pt
from petl_tpr.methods.unipt import UniPTSide

from conftest import family_example, perturb


def _direct(side: UniPTSide, a, hidden, index, valid):
    """REFERENCE.md sec. 3, one sample and one layer at a time (every token a key unless `valid` says otherwise)."""
    keys = valid if valid is not None else torch.ones(hidden[0].shape[:2], dtype=torch.bool)
    return _direct_visible(side, a, hidden, index, keys)


@pytest.mark.parametrize("masked", [False, True])
def test_side_network_matches_the_formula(masked):
    torch.manual_seed(0)
    side = UniPTSide(12, 8, taps=3)
    torch.nn.init.normal_(side.unipt_out.weight)
    a = torch.randn(3, 12)
    hidden = [torch.randn(3, 7, 12) for _ in range(3)]
    index = torch.tensor([2, 6, 0]) if masked else torch.zeros(3, dtype=torch.long)
    valid = torch.arange(7)[None] <= index[:, None] if masked else None
    torch.testing.assert_close(side(a, hidden, index, valid), _direct(side, a, hidden, index, valid),
                               atol=1e-5, rtol=1e-5)


def test_every_position_mode_is_the_pooled_network_at_each_position():
    """`a (B, N, D)`: position q's correction is the pooled formula with a = a[:, q], index q, keys visible[:, q]."""
    torch.manual_seed(0)
    side = UniPTSide(12, 8, taps=2)
    torch.nn.init.normal_(side.unipt_out.weight)
    a, hidden = torch.randn(2, 5, 12), [torch.randn(2, 5, 12) for _ in range(2)]
    visible = torch.ones(5, 5, dtype=torch.bool).tril()[None].expand(2, 5, 5).clone()
    visible[1, :, 3:] = False                   # row 1 pads its last two positions
    every = side(a, hidden, None, visible)
    for q in range(5):
        index = torch.full((2,), q)
        torch.testing.assert_close(every[:, q], _direct_visible(side, a[:, q], hidden, index, visible[:, q]),
                                   atol=1e-5, rtol=1e-5)


def _direct_visible(side: UniPTSide, a, hidden, index, keys):
    """REFERENCE.md sec. 3 for one anchor per row, reading only the keys marked in `keys (B, N)`."""
    out = []
    for b in range(a.shape[0]):
        anchor = side.unipt_anchor(F.relu(a[b]))
        ms, cs = [], []
        for phi, h in zip(side.unipt_layers, hidden):
            t = phi(F.relu(h[b]))
            seen = t[keys[b]]
            w = F.relu(seen @ anchor)
            ms.append(w / w.sum().clamp_min(1e-6) @ seen + t[index[b]])
            cs.append(side.unipt_gate(anchor * seen.mean(0)))
        beta = torch.cat(cs).softmax(0)
        out.append(side.unipt_out(F.relu(sum(beta[i] * ms[i] for i in range(len(ms))))))
    return torch.stack(out)


def _side_inputs(model, name):
    module = pt.api.adapter_module(model, next(a for a in pt.api.get_injection(model).attachments if a.branch == name))
    seen = {}
    module.register_forward_pre_hook(lambda m, args: seen.update(args=args))
    return seen


def test_taps_hand_over_the_hidden_states_and_the_eot_feature():
    model, _ = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "unipt", "config": {"width": 8},
                                                      "where": {"branches": ["text"]}}]}))
    seen = _side_inputs(model, "text")
    ids = torch.tensor([[98, 5, 7, 99, 0, 0], [98, 3, 4, 5, 6, 99]])
    mask = (torch.arange(6)[None] <= ids.argmax(-1)[:, None]).long()
    with torch.no_grad():
        out = model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    a, hidden, index, valid = seen["args"]
    assert index.tolist() == [3, 5]
    assert valid.sum(-1).tolist() == [4, 6]
    assert len(hidden) == len(out.hidden_states) == 3
    for got, expected in zip(hidden, out.hidden_states):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(a, out.pooler_output)          # zero correction at init


def test_correction_lands_on_the_pooled_token_only():
    model, _ = family_example("hf_clip")
    ids = torch.tensor([[98, 5, 7, 99, 0, 0]])
    with torch.no_grad():
        before = model.text_model(input_ids=ids).last_hidden_state
    pt.inject(model, "unipt")
    perturb(model)
    with torch.no_grad():
        after = model.text_model(input_ids=ids).last_hidden_state
    changed = (after - before).abs().amax(-1)[0]
    assert changed[3] > 1e-4 and torch.all(changed[[0, 1, 2, 4, 5]] == 0)


def _saved_bytes(model, run) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model).square().sum().backward()
    return total[0]


def test_backbone_keeps_no_activations_for_backward():
    """Only the side network saves tensors: far less than LoRA, whose gradient runs through the backbone."""
    sizes = {}
    specs = {"unipt": {"method": "unipt", "config": {"width": 8}}, "lora": {"method": "lora", "config": {"rank": 4}}}
    for name, entry in specs.items():
        model, run = family_example("open_clip")
        pt.inject(model, pt.Spec.from_dict({"entries": [entry]}))
        perturb(model)
        model.train()
        sizes[name] = _saved_bytes(model, run)
    assert sizes["unipt"] < 0.5 * sizes["lora"], sizes
    model, run = family_example("open_clip")
    pt.inject(model, "unipt")
    perturb(model)
    run(model).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "unipt" not in n)

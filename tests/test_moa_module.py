"""The `moa` method (DM-Adapter's mixture of adapters): counts, identity, routing, load balancing, errors."""

from __future__ import annotations

import json

import pytest
import torch

from petl_tpr.errors import SpecError
from petl_tpr.kernels import RoutingError
from petl_tpr.methods.base import config_from_dict, config_to_dict
from petl_tpr.methods.moa import MixtureOfAdapters, MoA, MoAConfig
from petl_tpr.registry import METHODS


def build(d=16, branch="vision", **config):
    return MoA.build(MoAConfig(**config), in_dim=d, out_dim=d, branch=branch)


def perturbed(module: MixtureOfAdapters, seed=0) -> MixtureOfAdapters:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("moa_up_weight", "moa_up_bias", "moa_down_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


@pytest.mark.parametrize("d, expected", [(768, 901_441), (512, 404_353)])
def test_parameter_counts_match_the_paper(d, expected):
    module = build(d)
    assert module.width == d // 8 and module.experts == 6 and module.top_k == 2
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == expected
    assert all(name.startswith("moa") for name, _ in module.named_parameters())


def test_init_values_and_identity():
    module = build(32)
    assert torch.equal(module.moa_norm_weight, torch.ones(32)) and not module.moa_norm_bias.any()
    assert not module.moa_up_weight.any() and not module.moa_up_bias.any() and not module.moa_down_bias.any()
    assert module.moa_alpha.item() == 0.5
    bound = 1 / 32 ** 0.5          # kaiming_uniform(a=sqrt(5)) on a (r, d) weight: U(-1/sqrt(d), 1/sqrt(d))
    assert module.moa_down_weight.abs().max() <= bound and module.moa_down_weight.std() > bound / 3
    assert 0.01 < module.moa_router_weight.std() < 0.03 and 0.5 < module.moa_prompt.std() < 1.5
    x = torch.randn(3, 7, 32)
    out = module(x)
    assert out.shape == x.shape and not out.any()


def test_branch_scale_and_linear_router():
    config = MoAConfig(scale=0.1, branch_scale={"text": 4})
    assert config.scale_for("vision") == 0.1 and config.scale_for("text") == 4.0
    assert MoA.build(config, in_dim=16, out_dim=16, branch="text").scale == 4.0
    linear = build(16, router="linear")
    assert {n for n, _ in linear.named_parameters()} == {
        "moa_norm_weight", "moa_norm_bias", "moa_down_weight", "moa_down_bias", "moa_up_weight", "moa_up_bias",
        "moa_router_weight"}
    z = torch.randn(5, 16)
    torch.testing.assert_close(linear.router_logits(z), z @ linear.moa_router_weight.t())


def test_config_json_round_trip_and_hashable():
    config = MoAConfig(experts=4, top_k=1, width=8, branch_scale={"vision": 0.1, "text": 4})
    data = json.loads(json.dumps(config_to_dict(config)))
    again = config_from_dict(MoAConfig, data)
    assert again == config and hash(again) == hash(config)
    assert again.branch_scale == (("text", 4.0), ("vision", 0.1))


def test_domain_router_logits_and_gates():
    module = build(16, experts=5, top_k=3)
    z = torch.randn(11, 16)
    alpha = module.moa_alpha
    expected = (1 - alpha) * z @ module.moa_router_weight.t() + alpha * (module.moa_domain_weight @ module.moa_prompt)
    logits = module.router_logits(z)
    torch.testing.assert_close(logits, expected)
    ids, gates = module.route(logits)
    torch.testing.assert_close(gates.sum(-1), torch.ones(11))
    for t in range(11):
        order = sorted(range(5), key=lambda e: -logits[t, e].item())[:3]
        assert set(ids[t].tolist()) == set(order)
        top = logits[t, order]
        direct = torch.exp(top - top.max()) / torch.exp(top - top.max()).sum()
        torch.testing.assert_close(gates[t], direct)


def test_forward_matches_a_direct_computation():
    module = perturbed(build(12, experts=4, top_k=2, width=3, scale=0.7))
    x = torch.randn(2, 5, 12)
    z = torch.nn.functional.layer_norm(x, (12,), module.moa_norm_weight, module.moa_norm_bias).reshape(-1, 12)
    logits = module.router_logits(z)
    expected = torch.zeros_like(z)
    for t in range(z.shape[0]):
        top, ids = logits[t].topk(2)
        for gate, e in zip(top.softmax(-1), ids):
            h = torch.relu(z[t] @ module.moa_down_weight[e] + module.moa_down_bias[e])
            expected[t] += gate * (h @ module.moa_up_weight[e] + module.moa_up_bias[e])
    torch.testing.assert_close(module(x), 0.7 * expected.reshape(2, 5, 12))


def test_load_balancing_hand_checked():
    module = build(8, experts=4, top_k=2, lb_weight=0.5)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1],
                                     [0.1, 0.2, 0.3, 0.4]]))
    ids = module.route(logits)[0]
    assert sorted(ids[0].tolist()) == [0, 1] and sorted(ids[1].tolist()) == [2, 3]
    # P = [0.25]*4, f = [0.5]*4 -> L = 4 * mean(0.125) = 0.5
    torch.testing.assert_close(module.load_balancing(logits, ids), torch.tensor(0.5))
    skewed = torch.log(torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.6, 0.3, 0.05, 0.05]]))
    ids = module.route(skewed)[0]
    # P = [0.65, 0.25, 0.05, 0.05], f = [1, 1, 0, 0] -> L = 4 * (0.65 + 0.25) / 4 = 0.9
    torch.testing.assert_close(module.load_balancing(skewed, ids), torch.tensor(0.9))


def test_load_balancing_random_and_aux_loss():
    module = build(16, experts=6, top_k=2, lb_weight=0.5)
    assert module.aux_loss().item() == 0.0 and module.aux_loss().dim() == 0
    x = torch.randn(4, 9, 16)
    module(x)
    z = torch.nn.functional.layer_norm(x, (16,), module.moa_norm_weight, module.moa_norm_bias).reshape(-1, 16)
    g = module.router_logits(z)
    P = g.softmax(-1).mean(0)
    top = g.topk(2, -1).indices
    f = torch.stack([(top == e).any(-1).float().mean() for e in range(6)])
    assert f.sum().item() == pytest.approx(2.0)
    expected = 6 * (P * f).mean()
    torch.testing.assert_close(module.aux_loss(), 0.5 * expected)
    module.aux_loss().backward()
    assert module.moa_router_weight.grad.abs().sum() > 0 and module.moa_alpha.grad is not None


@pytest.mark.parametrize("router", ["domain", "linear"])
def test_every_impl_gives_the_same_output_and_grads(router):
    results = {}
    for impl in ("reference", "torch"):
        torch.manual_seed(0)
        module = perturbed(build(16, experts=5, top_k=2, width=4, router=router).double())
        module.impl = impl
        x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
        out = module(x)
        (out.square().sum() + module.aux_loss()).backward()
        results[impl] = [out.detach(), x.grad] + [p.grad for _, p in sorted(module.named_parameters())]
    for a, b in zip(results["torch"], results["reference"]):
        torch.testing.assert_close(a, b)


def test_half_precision_input_and_empty_batch():
    module = perturbed(build(16))
    out = module(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    x = torch.randn(0, 4, 16, requires_grad=True)
    out = module(x)
    (out.sum() + module.aux_loss()).backward()
    assert out.shape == (0, 4, 16) and module.aux_loss().item() == 0.0


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_trains_under_autocast(impl):
    """A training step of the layer under torch.autocast (the trainer's AMP): forward and backward run,
    every parameter gets a finite gradient, and the output stays close to the fp32 one."""
    module = perturbed(build(16, experts=4, top_k=2, width=4))
    module.impl = impl
    x = torch.randn(2, 6, 16)
    want = module(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        (out.float().square().sum() + module.aux_loss()).backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=5e-2, rtol=5e-2)
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_non_finite_router_input_is_named():
    module = build(16)
    x = torch.randn(2, 4, 16)
    x[1, 2, 3] = float("nan")
    with pytest.raises(RoutingError, match=r"router input .* not finite in 1 of 8 tokens") as info:
        module(x)
    assert isinstance(info.value, ValueError)
    module.site_name = "vision.layers.3.mlp"
    x[1, 2, 3] = float("inf")
    with pytest.raises(RoutingError, match=r"^vision\.layers\.3\.mlp: moa router input"):
        module(x)


@pytest.mark.parametrize("config, message", [
    ({"experts": 0}, "experts must be > 0"),
    ({"experts": 2, "top_k": 3}, r"top_k must be in \[1, experts=2\]"),
    ({"top_k": 0}, "top_k must be in"),
    ({"experts": 2.5}, "experts must be an int"),
    ({"width": 8, "reduction": 4}, "width or reduction"),
    ({"width": 0}, "width must be > 0"),
    ({"activation": "tanh"}, "activation must be one of"),
    ({"router": "hash"}, "router must be one of"),
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"lb_weight": -1}, "lb_weight must be >= 0"),
    ({"branch_scale": {"text": "big"}}, "branch_scale entries"),
    ({"branch_scale": [["text", 1], ["text", 2]]}, "twice"),
    ({"roles": ["attn"]}, "unknown role"),
    ({"roles": []}, "roles is empty"),
])
def test_config_validation(config, message):
    with pytest.raises(SpecError, match=message):
        MoAConfig(**config)


def test_method_declaration():
    assert METHODS["moa"] is MoA
    assert (MoA.mechanism, MoA.roles, MoA.reads, MoA.identity_at_init, MoA.mergeable) == \
        ("parallel", ("mlp",), "stream", True, False)
    for entry in MoA.examples():
        config = MoAConfig(**entry["config"])
        module = MoA.build(config, in_dim=8, out_dim=8, branch="text")
        assert module(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    with pytest.raises(SpecError, match="in_dim=8, out_dim=4"):
        MoA.build(MoAConfig(), in_dim=8, out_dim=4, branch="vision")

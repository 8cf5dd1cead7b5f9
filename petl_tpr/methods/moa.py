"""Mixture of adapters (DM-Adapter): sparse routed bottleneck experts in parallel with the MLP.

Per block: `out = x' + MLP(LN2(x')) + s * SMA(LN3(x'))`, with x' the residual stream entering the
MLP branch (before norm2 on pre-norm blocks; `reads = "stream"`) and LN3 a new LayerNorm.
SMA(z) = sum over the top-k experts e of softmax(top-k logits)_e * Ad_e(z), with
Ad_e(z) = W_up[e] act(W_down[e] z + b_down[e]) + b_up[e] (W_up = b_up = 0 at init: identity).
Router logits: domain-aware `g = (1 - alpha) W_in z + alpha W_dom p` (p a learnable per-layer prompt)
or linear `g = W_in z`. The experts run through `petl_tpr.kernels.routed_adapters`.

Load balancing, per layer and forward: P_e = mean_t softmax(g_t)_e, f_e = mean_t 1[e in top-k(g_t)],
L_aux = E * mean_e(P_e f_e); `aux_loss()` returns `lb_weight * L_aux` of the last forward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..kernels import RoutingError, routed_adapters
from ..kernels.checks import ACTIVATIONS
from ..registry import register_method
from .base import Method, check_choice, check_fields, check_positive, check_roles

ROLES = ("mlp",)
ROUTERS = ("domain", "linear")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MoAConfig:
    """Config of `moa`. `branch_scale` overrides `scale` per branch name, e.g. `{"text": 4.0}`;
    it is stored as sorted `(branch, scale)` pairs so the config stays hashable and JSON-friendly."""

    experts: int = 6
    top_k: int = 2
    width: int | None = None
    reduction: int | None = None
    activation: str = "relu"
    scale: float = 0.1
    branch_scale: tuple[tuple[str, float], ...] = ()
    router: str = "domain"
    alpha_init: float = 0.5
    lb_weight: float = 0.5
    roles: tuple[str, ...] = ROLES
    _own_checks = ("branch_scale",)   # not a field: `_pairs` checks and normalises branch_scale itself

    def __post_init__(self) -> None:
        check_fields(self)
        name = type(self).__name__
        for field in ("experts", "top_k"):
            if not _is_int(getattr(self, field)):
                raise SpecError(f"{name}.{field} must be an int, got {getattr(self, field)!r}")
        for field in ("width", "reduction"):
            if getattr(self, field) is not None and not _is_int(getattr(self, field)):
                raise SpecError(f"{name}.{field} must be an int or None, got {getattr(self, field)!r}")
        check_positive(self, "experts", "width", "reduction")
        if not 1 <= self.top_k <= self.experts:
            raise SpecError(f"{name}.top_k must be in [1, experts={self.experts}], got {self.top_k}")
        if self.width is not None and self.reduction is not None:
            raise SpecError(f"{name}: give width or reduction, not both")
        check_choice(self, "activation", ACTIVATIONS)
        check_choice(self, "router", ROUTERS)
        for field in ("scale", "alpha_init", "lb_weight"):
            if not _is_number(getattr(self, field)):
                raise SpecError(f"{name}.{field} must be a finite number, got {getattr(self, field)!r}")
            object.__setattr__(self, field, float(getattr(self, field)))
        if self.lb_weight < 0:
            raise SpecError(f"{name}.lb_weight must be >= 0, got {self.lb_weight}")
        object.__setattr__(self, "branch_scale", self._pairs(self.branch_scale))
        object.__setattr__(self, "roles", tuple(self.roles))
        check_roles(self, ROLES)

    @staticmethod
    def _pairs(value) -> tuple[tuple[str, float], ...]:
        """Normalise a mapping or a sequence of (branch, scale) pairs to sorted pairs."""
        items = value.items() if isinstance(value, Mapping) else value
        try:
            pairs = [tuple(item) for item in items]
        except TypeError:
            raise SpecError(f"MoAConfig.branch_scale must map branch names to scales, got {value!r}") from None
        seen = set()
        for pair in pairs:
            if len(pair) != 2 or not isinstance(pair[0], str) or not _is_number(pair[1]):
                raise SpecError(f"MoAConfig.branch_scale entries must be (branch name, finite number), got {pair!r}")
            if pair[0] in seen:
                raise SpecError(f"MoAConfig.branch_scale names branch {pair[0]!r} twice")
            seen.add(pair[0])
        return tuple(sorted((b, float(s)) for b, s in pairs))

    def width_for(self, d: int) -> int:
        """Expert bottleneck width at model width d: `width`, or d // reduction (default reduction 8)."""
        return self.width if self.width is not None else max(1, d // (self.reduction or 8))

    def scale_for(self, branch: str) -> float:
        """The fixed output scale s on `branch`: its `branch_scale` entry, else `scale`."""
        return dict(self.branch_scale).get(branch, self.scale)


class MixtureOfAdapters(nn.Module):
    """`x' (..., d) -> s * SMA(LN3(x')) (..., d)`; parameters named `moa_*`.

    Parameters: moa_norm_weight/bias `(d,)`; experts moa_down_weight `(E, d, r)`, moa_down_bias
    `(E, r)`, moa_up_weight `(E, r, d)`, moa_up_bias `(E, d)`; router moa_router_weight `(E, d)`
    (W_in) and, for the domain router, moa_domain_weight `(E, d)` (W_dom), moa_prompt `(d,)` (p)
    and moa_alpha `()`. `impl` (None: `$PETL_TPR_MOA_IMPL`/auto) picks the routed-op implementation;
    `site_name` is put in error messages when set.
    """

    def __init__(self, *, d: int, width: int, experts: int, top_k: int, activation: str = "relu",
                 scale: float = 0.1, router: str = "domain", alpha_init: float = 0.5, lb_weight: float = 0.5,
                 eps: float = 1e-5) -> None:
        super().__init__()
        E, r = experts, width
        self.d, self.width, self.experts, self.top_k = d, width, experts, top_k
        self.activation, self.scale, self.router, self.lb_weight, self.eps = activation, scale, router, lb_weight, eps
        self.impl: str | None = None
        self.site_name = ""
        self._aux: torch.Tensor | None = None
        self.moa_norm_weight = nn.Parameter(torch.ones(d))
        self.moa_norm_bias = nn.Parameter(torch.zeros(d))
        down = torch.empty(E, d, r)
        for e in range(E):   # as nn.Linear(d, r) initialises its (r, d) weight, stored transposed
            weight = torch.empty(r, d)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            down[e] = weight.t()
        self.moa_down_weight = nn.Parameter(down)
        self.moa_down_bias = nn.Parameter(torch.zeros(E, r))
        self.moa_up_weight = nn.Parameter(torch.zeros(E, r, d))
        self.moa_up_bias = nn.Parameter(torch.zeros(E, d))
        self.moa_router_weight = nn.Parameter(torch.randn(E, d) * 0.02)
        if router == "domain":
            self.moa_domain_weight = nn.Parameter(torch.randn(E, d) * 0.02)
            self.moa_prompt = nn.Parameter(torch.randn(d))
            self.moa_alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def router_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Router logits `(T, E)` for normed tokens z `(T, d)`."""
        logits = F.linear(z, self.moa_router_weight)
        if self.router == "domain":
            alpha = self.moa_alpha
            logits = (1 - alpha) * logits + alpha * F.linear(self.moa_prompt, self.moa_domain_weight)
        return logits

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids `(T, k)` and their gates `(T, k)` (softmax over the k selected logits)."""
        top, ids = logits.topk(self.top_k, dim=-1)
        return ids, top.softmax(dim=-1)

    def load_balancing(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """L_aux = E * mean_e(P_e f_e) (0-dim, fp32); P_e = mean_t softmax(g_t)_e, f_e = mean_t 1[e picked]."""
        if logits.shape[0] == 0:
            return logits.new_zeros((), dtype=torch.float32)
        probs = logits.float().softmax(dim=-1).mean(0)                                    # (E,)
        picked = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, ids, 1.0).mean(0)   # (E,), sums to k
        return self.experts * (probs * picked).mean()

    def _check_router_input(self, z: torch.Tensor) -> None:
        """RoutingError naming the layer unless z is finite. Eager only: under torch.compile it is skipped,
        since reading the flag on the host would break the graph (docs/compile.md says why not an assert)."""
        if torch.compiler.is_compiling() or bool(torch.isfinite(z).all()):
            return
        bad = int((~torch.isfinite(z)).any(-1).sum())
        nan, inf = int(torch.isnan(z).sum()), int(torch.isinf(z).sum())
        where = f"{self.site_name}: " if self.site_name else ""
        raise RoutingError(f"{where}moa router input (the LN3-normed stream) is not finite in {bad} of {z.shape[0]} "
                           f"tokens ({nan} NaN, {inf} inf values); the input or the moa_norm parameters hold NaN/inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.moa_norm_weight
        z = F.layer_norm(x.to(weight.dtype), (self.d,), weight, self.moa_norm_bias, self.eps).reshape(-1, self.d)
        self._check_router_input(z)
        logits = self.router_logits(z)
        ids, gates = self.route(logits)
        self._aux = self.load_balancing(logits, ids)
        y = routed_adapters(z, ids, gates.to(z.dtype), self.moa_down_weight, self.moa_down_bias, self.moa_up_weight,
                            self.moa_up_bias, activation=self.activation, impl=self.impl,
                            check_ids=False)   # top-k ids lie in [0, E): no id check, no host transfer for it
        return (y * self.scale).reshape(x.shape).to(x.dtype)

    def skipped(self) -> None:
        """Its set did not act in this forward (attach.SiteHook): no router loss from it."""
        self._aux = None

    def aux_loss(self) -> torch.Tensor:
        """`lb_weight * L_aux` of the last forward (0-dim); zero before any forward."""
        if self._aux is None:
            return torch.zeros((), device=self.moa_router_weight.device)
        return self.lb_weight * self._aux

    def extra_repr(self) -> str:
        return (f"d={self.d}, experts={self.experts}, top_k={self.top_k}, width={self.width}, "
                f"activation={self.activation}, router={self.router}, scale={self.scale}")


@register_method
class MoA(Method):
    """Registered as `moa`: DM-Adapter's sparse mixture of adapters beside the MLP branch."""

    name = "moa"
    config_cls = MoAConfig
    mechanism = "parallel"
    roles = ROLES
    identity_at_init = True
    mergeable = False
    reads = "stream"   # the residual stream entering the branch (before norm2 on pre-norm blocks)

    @classmethod
    def build(cls, config: MoAConfig, *, in_dim: int, out_dim: int, branch: str) -> nn.Module:
        if in_dim != out_dim:
            raise SpecError(f"moa maps (..., d) to (..., d); site has in_dim={in_dim}, out_dim={out_dim}")
        return MixtureOfAdapters(d=in_dim, width=config.width_for(in_dim), experts=config.experts,
                                 top_k=config.top_k, activation=config.activation, scale=config.scale_for(branch),
                                 router=config.router, alpha_init=config.alpha_init, lb_weight=config.lb_weight)

    @classmethod
    def param_shapes(cls, config: MoAConfig, *, in_dim: int, out_dim: int, branch: str) -> dict[str, tuple]:
        if in_dim != out_dim:
            raise SpecError(f"moa maps (..., d) to (..., d); site has in_dim={in_dim}, out_dim={out_dim}")
        d, E, r = in_dim, config.experts, config.width_for(in_dim)
        shapes = {"moa_norm_weight": (d,), "moa_norm_bias": (d,), "moa_down_weight": (E, d, r), "moa_down_bias": (E, r),
                  "moa_up_weight": (E, r, d), "moa_up_bias": (E, d), "moa_router_weight": (E, d)}
        if config.router == "domain":
            shapes |= {"moa_domain_weight": (E, d), "moa_prompt": (d,), "moa_alpha": ()}
        return shapes

    @classmethod
    def examples(cls):
        return [
            {"method": "moa", "config": {"experts": 3, "top_k": 2, "width": 4}},
            {"method": "moa", "config": {"experts": 2, "top_k": 1, "reduction": 4, "router": "linear",
                                         "scale": 0.5, "branch_scale": {"text": 2.0}}},
        ]

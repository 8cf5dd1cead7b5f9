"""UniPT (Universal Parallel Tuning, CVPR 2024): a side network beside a frozen branch (REFERENCE sec. 3).

Inputs, detached: the hidden states H_0..H_n of one branch (embedding output and the selected
blocks' outputs), `(B, N, D)` each, and the branch's global feature a `(B, D)` (after the final
norm, at CLS or EOT). With m the side width:
- T_i = phi_i(H_i) = Linear_i(ReLU(H_i))                     `(B, N, m)`, one Linear per tap;
- a_hat = Linear_a(ReLU(a))                                    `(B, m)`;
- parallel interaction: w_i = L1-normalise over tokens of ReLU(a_hat . T_i) (padding after EOT
  masked), M_i = w_i T_i + T_i[global]                         `(B, m)`;
- confidence aggregation: c_i = gate(a_hat * mean_tokens(T_i)), beta = softmax_i(c), M = sum beta_i M_i;
- correction = Linear_o(ReLU(M))                                `(B, D)`, added to a.
Linear_o starts at zero (our choice, so the model is unchanged at injection; the paper does not
say). The frozen backbone keeps no activations for backward: nothing in it requires grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_method
from .base import Method, check_fields, check_positive, check_roles


@dataclass(frozen=True)
class UniPTConfig:
    width: int = 512
    roles: tuple[str, ...] = ("branch",)

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "width")
        check_roles(self, ("branch",))


class UniPTSide(nn.Module):
    """`forward(a (B, D), hidden [(B, N, D)] * taps, index (B,), valid (B, N) | None) -> (B, D)`."""

    def __init__(self, d: int, width: int, taps: int) -> None:
        super().__init__()
        self.unipt_layers = nn.ModuleList(nn.Linear(d, width) for _ in range(taps))
        self.unipt_anchor = nn.Linear(d, width)
        self.unipt_gate = nn.Linear(width, 1)
        self.unipt_out = nn.Linear(width, d)
        nn.init.zeros_(self.unipt_out.weight)
        nn.init.zeros_(self.unipt_out.bias)

    def forward(self, a: torch.Tensor, hidden: list[torch.Tensor], index: torch.Tensor,
                valid: torch.Tensor | None) -> torch.Tensor:
        dtype = self.unipt_anchor.weight.dtype
        anchor = self.unipt_anchor(F.relu(a.to(dtype)))                          # (B, m)
        rows = torch.arange(a.shape[0], device=a.device)
        keep = None if valid is None else valid.to(dtype)
        merged, confidence = [], []
        for phi, h in zip(self.unipt_layers, hidden):
            t = phi(F.relu(h.to(dtype)))                                          # (B, N, m)
            score = F.relu(torch.einsum("bm,bnm->bn", anchor, t))
            if keep is not None:
                score = score * keep
            weights = score / score.sum(dim=-1, keepdim=True).clamp_min(1e-6)      # L1 normalisation
            merged.append(torch.einsum("bn,bnm->bm", weights, t) + t[rows, index])
            mean = t.mean(dim=1) if keep is None else (t * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
            confidence.append(self.unipt_gate(anchor * mean))                     # (B, 1)
        beta = torch.cat(confidence, dim=-1).softmax(dim=-1)                      # (B, taps)
        m = (torch.stack(merged, dim=1) * beta[..., None]).sum(dim=1)              # (B, m)
        return self.unipt_out(F.relu(m))


@register_method
class UniPT(Method):
    name = "unipt"
    config_cls = UniPTConfig
    mechanism = "side"
    roles = ("branch",)

    @classmethod
    def build(cls, config: UniPTConfig, *, in_dim: int, out_dim: int, branch: str, taps: int = 1) -> nn.Module:
        return UniPTSide(in_dim, config.width, taps)

    @classmethod
    def param_shapes(cls, config: UniPTConfig, *, in_dim: int, out_dim: int, branch: str,
                     taps: int = 1) -> dict[str, tuple]:
        d, m = in_dim, config.width
        shapes = {}
        for name, (rows, cols) in [*((f"unipt_layers.{i}", (m, d)) for i in range(taps)),
                                   ("unipt_anchor", (m, d)), ("unipt_gate", (1, m)), ("unipt_out", (d, m))]:
            shapes |= {f"{name}.weight": (rows, cols), f"{name}.bias": (rows,)}
        return shapes

    @classmethod
    def examples(cls):
        return [{"method": "unipt", "config": {"width": 8}}]

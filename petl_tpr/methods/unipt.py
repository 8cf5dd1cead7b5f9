"""UniPT (Universal Parallel Tuning, CVPR 2024): a side network beside a frozen branch (REFERENCE sec. 3).

Inputs, detached: the hidden states H_0..H_n of one branch (embedding output and the selected
blocks' outputs), `(B, N, D)` each, and the branch's global feature a `(B, D)` (after the final
norm, at CLS or EOT). With m the side width:
- T_i = phi_i(H_i) = Linear_i(ReLU(H_i))                     `(B, N, m)`, one Linear per tap (from
  that tap's width: a stage-wise tower such as Swin widens from stage to stage);
- a_hat = Linear_a(ReLU(a))                                    `(B, m)`;
- parallel interaction: w_i = L1-normalise over tokens of ReLU(a_hat . T_i) (padding after EOT
  masked), M_i = w_i T_i + T_i[global]                         `(B, m)`;
- confidence aggregation: c_i = gate(a_hat * mean_tokens(T_i)), beta = softmax_i(c), M = sum beta_i M_i;
- correction = Linear_o(ReLU(M))                                `(B, D)`, added to a.
A branch whose model does not pool (T5, GPT-2, Llama, DeBERTa, ModernBERT encoders return every
position) gets the same network at every position: each position's own output is its anchor and its
global term, it reads the keys the model lets it see (the padding mask given to the model; earlier
positions only in a causal model), and its correction `(B, N, D)` is added there.
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
    """`forward(a, hidden [(B, N, D)] * taps, index, valid) -> correction`, the shape of `a`.

    Pooled: `a (B, D)` is the pooled feature, `index (B,)` its position, `valid (B, N) | None` the
    keys it may read (tokens after EOT masked). Every position (a model that does not pool): `a
    (B, N, D)`, each position the anchor of its own interaction and its own global term, `index`
    None, `valid (B, N, N) | None` the keys each position may read (padding, a causal order).
    """

    def __init__(self, d: int, width: int, taps: int, tap_dims: tuple[int, ...] | None = None) -> None:
        super().__init__()
        dims = tuple(tap_dims) if tap_dims is not None else (d,) * taps     # a stage-wise tower's taps differ
        self.unipt_layers = nn.ModuleList(nn.Linear(dim, width) for dim in dims)
        self.unipt_anchor = nn.Linear(d, width)
        self.unipt_gate = nn.Linear(width, 1)
        self.unipt_out = nn.Linear(width, d)
        nn.init.zeros_(self.unipt_out.weight)
        nn.init.zeros_(self.unipt_out.bias)

    def forward(self, a: torch.Tensor, hidden: list[torch.Tensor], index: torch.Tensor | None,
                valid: torch.Tensor | None) -> torch.Tensor:
        dtype = self.unipt_anchor.weight.dtype
        tokens = a.dim() == 3
        anchor = self.unipt_anchor(F.relu(a.to(dtype)))                          # (B, Q, m) or (B, m)
        if not tokens:
            anchor, valid = anchor[:, None], None if valid is None else valid[:, None]    # Q = 1
        rows = torch.arange(a.shape[0], device=a.device)
        keep = None if valid is None else valid.to(dtype)                         # (B, Q, N)
        merged, confidence = [], []
        for phi, h in zip(self.unipt_layers, hidden):
            t = phi(F.relu(h.to(dtype)))                                          # (B, N, m)
            score = F.relu(anchor @ t.transpose(1, 2))                            # (B, Q, N)
            if keep is not None:
                score = score * keep
            weights = score / score.sum(dim=-1, keepdim=True).clamp_min(1e-6)      # L1 normalisation
            own = t if tokens else t[rows, index][:, None]                        # the anchor's own token
            merged.append(weights @ t + own)                                      # (B, Q, m)
            mean = t.mean(dim=1, keepdim=True) if keep is None else (keep @ t) / keep.sum(-1, keepdim=True).clamp_min(1)
            confidence.append(self.unipt_gate(anchor * mean))                     # (B, Q, 1)
        beta = torch.cat(confidence, dim=-1).softmax(dim=-1)                      # (B, Q, taps)
        m = (torch.stack(merged, dim=-2) * beta[..., None]).sum(dim=-2)            # (B, Q, m)
        out = self.unipt_out(F.relu(m))
        return out if tokens else out[:, 0]


@register_method
class UniPT(Method):
    name = "unipt"
    config_cls = UniPTConfig
    mechanism = "side"
    roles = ("branch",)

    @classmethod
    def build(cls, config: UniPTConfig, *, in_dim: int, out_dim: int, branch: str, taps: int = 1,
              tap_dims: tuple[int, ...] | None = None) -> nn.Module:
        return UniPTSide(in_dim, config.width, taps, tap_dims)

    @classmethod
    def param_shapes(cls, config: UniPTConfig, *, in_dim: int, out_dim: int, branch: str,
                     taps: int = 1, tap_dims: tuple[int, ...] | None = None) -> dict[str, tuple]:
        d, m = in_dim, config.width
        dims = tuple(tap_dims) if tap_dims is not None else (d,) * taps
        shapes = {}
        for name, (rows, cols) in [*((f"unipt_layers.{i}", (m, dim)) for i, dim in enumerate(dims)),
                                   ("unipt_anchor", (m, d)), ("unipt_gate", (1, m)), ("unipt_out", (d, m))]:
            shapes |= {f"{name}.weight": (rows, cols), f"{name}.bias": (rows,)}
        return shapes

    @classmethod
    def examples(cls):
        return [{"method": "unipt", "config": {"width": 8}}]

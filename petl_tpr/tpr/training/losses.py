"""Training losses of the retrieval task: SDM, ID and masked-token (MLM) cross-entropy.

SDM (similarity distribution matching), for a batch of B (caption i, image i) pairs with pids:

    p_ij = softmax_j(cos(t_i, v_j) / tau)          y_ij = 1[pid_i == pid_j]
    q_ij = y_ij / sum_k y_ik
    L_t2i = (1/B) sum_i sum_j p_ij (log p_ij - log(q_ij + eps))
    L_i2t = the same with images as rows (cos(v_i, t_j))
    L_sdm = L_t2i + L_i2t

tau = 0.02 is fixed in the reference (no learnable temperature), eps = 1e-8. Each row of the
sum is KL(p_i || q_i) up to the eps, hence >= 0 up to that eps and 0 exactly when p_i equals q_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TaskInputError, check_int

SDM_TEMPERATURE = 0.02
SDM_EPSILON = 1e-8
IGNORE_INDEX = -100


def _check_pair(image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise TaskInputError(f"image and text features must both be (B, D) with equal shapes, got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if pids.shape != (image_features.shape[0],) or pids.is_floating_point():
        raise TaskInputError(f"pids must be an integer tensor of shape ({image_features.shape[0]},), "
                             f"got {pids.dtype} {tuple(pids.shape)}")


def sdm_loss(image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor, *,
             tau: float = SDM_TEMPERATURE, epsilon: float = SDM_EPSILON) -> torch.Tensor:
    """SDM loss, a scalar. image_features `(B, D)`, text_features `(B, D)` (row i of each is one
    pair; both are L2-normalised here), pids `(B,)` integer identity labels.

    Computed in float32 or wider whatever the feature dtype (logits reach 1/tau = 50).
    """
    _check_pair(image_features, text_features, pids)
    if not tau > 0 or not epsilon > 0:
        raise TaskInputError(f"tau and epsilon must be positive, got tau={tau!r}, epsilon={epsilon!r}")
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    image = F.normalize(image_features.to(dtype), dim=1)
    text = F.normalize(text_features.to(dtype), dim=1)
    same = (pids[:, None] == pids[None, :]).to(dtype)
    # The match matrix is symmetric, so its rows serve both directions.
    log_target = torch.log(same / same.sum(dim=1, keepdim=True) + epsilon)
    t2i_logits = text @ image.T / tau
    loss = t2i_logits.new_zeros(())
    for logits in (t2i_logits, t2i_logits.T):
        log_p = F.log_softmax(logits, dim=1)
        loss = loss + (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()
    return loss


class IdentityLoss(nn.Module):
    """ID loss: one Linear(feature_dim, num_ids) shared by both modalities.

    forward(image_features `(B, D)`, text_features `(B, D)`, pids `(B,)` in 0..num_ids-1) ->
    (CE(classifier(image), pids) + CE(classifier(text), pids)) / 2, a scalar. Features are used
    as they are (not normalised), as in the reference. Weight ~ N(0, std=0.001), bias 0.
    The classifier is a trainable task head, not an adapter: the trainer must hand its
    parameters to the optimiser beside the adapter parameters.
    """

    def __init__(self, *, num_ids: int, feature_dim: int = 512, init_std: float = 0.001) -> None:
        super().__init__()
        for name, value in (("num_ids", num_ids), ("feature_dim", feature_dim)):
            check_int(f"IdentityLoss.{name}", value)
        if not init_std > 0:
            raise TaskInputError(f"IdentityLoss.init_std must be positive, got {init_std!r}")
        self.num_ids = num_ids
        self.classifier = nn.Linear(feature_dim, num_ids)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.classifier.bias)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features `(B, D)` -> class logits `(B, num_ids)` in the classifier's dtype."""
        return self.classifier(features.to(self.classifier.weight.dtype))

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        _check_pair(image_features, text_features, pids)
        if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= self.num_ids):
            raise TaskInputError(f"pids must lie in 0..{self.num_ids - 1} (remapped training ids), "
                                 f"got range {int(pids.min())}..{int(pids.max())}")
        image_ce = F.cross_entropy(self.logits(image_features).float(), pids)
        text_ce = F.cross_entropy(self.logits(text_features).float(), pids)
        return (image_ce + text_ce) / 2

    def extra_repr(self) -> str:
        return f"num_ids={self.num_ids}"


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over masked caption positions (the MLM objective), a scalar.

    logits `(N, L, V)` from an MLM head; labels `(N, L)` holding the original token id at masked
    positions and `ignore_index` (-100, see `petl_tpr.tpr.data.masking`) elsewhere. Mean over the
    labelled positions; 0 (with a graph) when no position is labelled.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise TaskInputError(f"logits must be (N, L, V) and labels (N, L), got {tuple(logits.shape)} "
                             f"and {tuple(labels.shape)}")
    flat_labels = labels.reshape(-1)
    if not bool((flat_labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels, ignore_index=ignore_index)

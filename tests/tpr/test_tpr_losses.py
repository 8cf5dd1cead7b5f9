"""SDM, ID and masked-token losses against plain formulas, plus their properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from petl_tpr.tpr.errors import TaskInputError
from petl_tpr.tpr.training.losses import IdentityLoss, masked_token_loss, sdm_loss


def direct_sdm(image: list[list[float]], text: list[list[float]], pids: list[int], tau=0.02, eps=1e-8) -> float:
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    image, text = [unit(v) for v in image], [unit(v) for v in text]
    b = len(pids)

    def one_direction(rows, cols):
        total = 0.0
        for i in range(b):
            logits = [sum(a * c for a, c in zip(rows[i], cols[j])) / tau for j in range(b)]
            top = max(logits)
            z = sum(math.exp(x - top) for x in logits)
            n_same = sum(1 for k in range(b) if pids[k] == pids[i])
            for j in range(b):
                p = math.exp(logits[j] - top) / z
                q = (1.0 if pids[j] == pids[i] else 0.0) / n_same
                total += p * (math.log(p) - math.log(q + eps))
        return total / b

    return one_direction(text, image) + one_direction(image, text)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sdm_matches_direct_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    text = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    image, text = image * 0.2 + text, text  # correlated pairs keep probabilities away from underflow
    pids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0])
    expected = direct_sdm(image.tolist(), text.tolist(), pids.tolist())
    assert float(sdm_loss(image, text, pids)) == pytest.approx(expected, rel=1e-9)


def test_sdm_properties():
    gen = torch.Generator().manual_seed(3)
    pids = torch.tensor([0, 0, 1, 2, 3])
    for _ in range(5):
        loss = sdm_loss(torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen), pids)
        assert float(loss) >= 0
    # Matched: one direction per pid, text == image -> p equals q (up to e^-50 leaks and eps).
    directions = torch.eye(8)[[0, 0, 1, 2, 3]]
    matched = sdm_loss(directions * 3.0, directions, pids)  # scale is irrelevant: normalised inside
    assert abs(float(matched)) < 1e-6
    shuffled = sdm_loss(directions, directions[[1, 2, 3, 4, 0]], pids)
    assert float(shuffled) > 1.0


def test_sdm_gradients_and_half_inputs():
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(4, 8, generator=gen, requires_grad=True)
    text = torch.randn(4, 8, generator=gen).half().requires_grad_()
    loss = sdm_loss(image, text, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert image.grad is not None and text.grad is not None and text.grad.dtype == torch.float16


def test_sdm_rejects_bad_shapes():
    with pytest.raises(TaskInputError, match="equal shapes"):
        sdm_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.arange(3))
    with pytest.raises(TaskInputError, match="pids"):
        sdm_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.arange(2))


def test_identity_loss_init_and_formula():
    torch.manual_seed(0)
    head = IdentityLoss(num_ids=50, feature_dim=512)
    assert head.classifier.weight.shape == (50, 512)
    assert torch.count_nonzero(head.classifier.bias) == 0
    assert 0.0008 < float(head.classifier.weight.detach().std()) < 0.0012
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(6, 512, generator=gen), torch.randn(6, 512, generator=gen)
    pids = torch.tensor([0, 3, 3, 49, 7, 0])
    w, b = head.classifier.weight, head.classifier.bias
    expected = (F.cross_entropy(image @ w.T + b, pids) + F.cross_entropy(text @ w.T + b, pids)) / 2
    assert head(image, text, pids).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(TaskInputError, match="0..49"):
        head(image, text, torch.tensor([0, 1, 2, 3, 4, 50]))
    with pytest.raises(TaskInputError, match="num_ids"):
        IdentityLoss(num_ids=0)


def test_masked_token_loss():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    labels = torch.full((2, 5), -100)
    assert masked_token_loss(logits, labels).item() == 0.0
    labels[0, 1], labels[1, 4] = 3, 10
    expected = (F.cross_entropy(logits[0, 1], torch.tensor(3)) + F.cross_entropy(logits[1, 4], torch.tensor(10))) / 2
    loss = masked_token_loss(logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    with pytest.raises(TaskInputError):
        masked_token_loss(logits, labels[:, :3])

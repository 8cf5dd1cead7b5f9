"""Retrieval metrics against a plain per-query formula and hand-checked cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petl_tpr.errors import PetlError
from petl_tpr.tpr.errors import TaskInputError
from petl_tpr.tpr.training.metrics import metrics_from_similarity, retrieval_metrics


def direct_metrics(sim: list[list[float]], qpids: list[int], gpids: list[int]) -> dict[str, float]:
    """Plain loops: rank by descending similarity, ties by lower gallery index."""
    totals = {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "mAP": 0.0, "mINP": 0.0}
    for row, qpid in zip(sim, qpids):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rel = [1 if gpids[j] == qpid else 0 for j in order]
        n_rel = sum(rel)
        for k in (1, 5, 10):
            totals[f"R@{k}"] += 1.0 if any(rel[:k]) else 0.0
        hits, ap, last = 0, 0.0, 0
        for rank, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / rank
                last = rank
        totals["mAP"] += ap / n_rel
        totals["mINP"] += n_rel / last
    return {key: 100.0 * value / len(qpids) for key, value in totals.items()}


def random_case(seed: int, q: int, g: int, ids: int):
    gen = torch.Generator().manual_seed(seed)
    # Few distinct values -> many ties.
    sim = torch.randint(0, 5, (q, g), generator=gen).to(torch.float32) / 4
    gpids = torch.randint(0, ids, (g,), generator=gen)
    gpids[:ids] = torch.arange(ids)  # every pid has at least one image
    qpids = torch.randint(0, ids, (q,), generator=gen)
    return sim, qpids, gpids


@pytest.mark.parametrize("seed,q,g,ids", [(0, 30, 40, 6), (1, 17, 9, 3), (2, 25, 60, 20), (3, 5, 3, 2)])
def test_matches_direct_formula_with_ties(seed, q, g, ids):
    sim, qpids, gpids = random_case(seed, q, g, ids)
    expected = direct_metrics(sim.tolist(), qpids.tolist(), gpids.tolist())
    got = metrics_from_similarity(sim, qpids, gpids, chunk_size=7).as_dict()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_chunked_equals_unchunked_and_features_path():
    gen = torch.Generator().manual_seed(5)
    text, image = torch.randn(53, 16, generator=gen), torch.randn(31, 16, generator=gen)
    gpids = torch.arange(31) % 8
    qpids = torch.randint(0, 8, (53,), generator=gen)
    whole = retrieval_metrics(text, image, qpids, gpids, chunk_size=1000)
    sim = F.normalize(text, dim=1) @ F.normalize(image, dim=1).T
    for chunk in (1, 4, 52, 53):
        # Bit-equal on a given similarity matrix; from features only up to matmul rounding.
        exact = metrics_from_similarity(sim, qpids, gpids)
        assert metrics_from_similarity(sim, qpids, gpids, chunk_size=chunk) == exact
        chunked = retrieval_metrics(text, image, qpids, gpids, chunk_size=chunk)
        assert chunked.as_dict() == pytest.approx(whole.as_dict(), abs=1e-9)
    assert metrics_from_similarity(sim, qpids, gpids).as_dict() == pytest.approx(whole.as_dict())
    expected = direct_metrics(sim.tolist(), qpids.tolist(), gpids.tolist())
    assert whole.as_dict() == pytest.approx(expected)


def test_hand_checked_single_query():
    # Gallery pids [1, 0, 1, 0, 1]; scores rank the gallery as 1, 0, 3, 2, 4 (0-based indices).
    sim = torch.tensor([[0.9, 0.8, 0.3, 0.5, 0.1]])
    m = metrics_from_similarity(sim, torch.tensor([0]), torch.tensor([1, 0, 1, 0, 1]))
    # Relevant (pid 0) are indices 1 and 3, at ranks 2 and 3.
    assert (m.r1, m.r5, m.r10) == (0.0, 100.0, 100.0)
    assert m.mAP == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert m.mINP == pytest.approx(100 * 2 / 3)


def test_hand_checked_ties_go_to_lower_gallery_index():
    sim = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    m = metrics_from_similarity(sim, torch.tensor([7, 8]), torch.tensor([7, 9, 8]))
    # Query 0: its image is index 0 -> rank 1. Query 1: its image is index 2 -> rank 3.
    assert m.r1 == pytest.approx(50.0)
    assert m.mAP == pytest.approx(100 * (1 + 1 / 3) / 2)
    assert m.mINP == pytest.approx(100 * (1 + 1 / 3) / 2)


def test_perfect_retrieval_scores_100():
    feats = torch.eye(4)
    m = retrieval_metrics(feats, feats, torch.arange(4), torch.arange(4))
    assert m.as_dict() == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "mAP": 100.0, "mINP": 100.0}
    assert (m.num_queries, m.num_gallery) == (4, 4)


def test_bad_inputs_raise_clear_errors():
    sim = torch.zeros(2, 3)
    with pytest.raises(TaskInputError, match="no image with their pid"):
        metrics_from_similarity(sim, torch.tensor([0, 5]), torch.tensor([0, 1, 2]))
    with pytest.raises(TaskInputError, match="gallery_pids"):
        metrics_from_similarity(sim, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(TaskInputError, match="integer"):
        metrics_from_similarity(sim, torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2]))
    with pytest.raises(TaskInputError, match="NaN"):
        metrics_from_similarity(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(TaskInputError, match="feature widths"):
        retrieval_metrics(torch.zeros(2, 4), torch.zeros(3, 5), torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    with pytest.raises(PetlError, match="chunk_size"):
        metrics_from_similarity(sim, torch.tensor([0, 1]), torch.tensor([0, 1, 2]), chunk_size=0)

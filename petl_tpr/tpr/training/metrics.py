"""Text -> image retrieval metrics: R@1/5/10 (CMC), mAP and mINP, all times 100.

Every query (caption) ranks the whole gallery (all images) by similarity. Ranking rule: a stable
sort by descending similarity, so gallery items with equal similarity keep their gallery order
(lower gallery index ranks first). With ranks r = 1..G and `rel_r` = 1 when the item at rank r
shares the query's pid:

- R@K   = 1 if any relevant item has rank <= K (K larger than G counts the whole gallery);
- AP    = (1 / n_rel) * sum_r rel_r * (sum_{s<=r} rel_s) / r;
- INP   = n_rel / (rank of the last relevant item);

each averaged over queries and multiplied by 100. A query without any relevant gallery item has no
defined AP or INP, so it is refused (the error names how many there are).

Queries are processed in chunks: memory is O(chunk_size * G) whatever the number of queries, so a
6,156 x 3,074 evaluation needs a few MB per chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import TaskInputError, check_int

RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalMetrics:
    """Retrieval scores in percent (0..100) over `num_queries` queries."""

    r1: float
    r5: float
    r10: float
    mAP: float
    mINP: float
    num_queries: int
    num_gallery: int

    def as_dict(self) -> dict[str, float]:
        """`{"R@1", "R@5", "R@10", "mAP", "mINP"}` -> value; the keys used in logs and tables."""
        return {"R@1": self.r1, "R@5": self.r5, "R@10": self.r10, "mAP": self.mAP, "mINP": self.mINP}

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def _check_pids(query_pids: torch.Tensor, gallery_pids: torch.Tensor, num_queries: int, num_gallery: int) -> None:
    for name, pids, expected in (("query_pids", query_pids, num_queries), ("gallery_pids", gallery_pids, num_gallery)):
        if not isinstance(pids, torch.Tensor) or pids.dim() != 1 or pids.numel() != expected:
            shape = tuple(pids.shape) if isinstance(pids, torch.Tensor) else type(pids).__name__
            raise TaskInputError(f"{name} must be a 1-d tensor of length {expected}, got {shape}")
        if pids.is_floating_point() or pids.is_complex():
            raise TaskInputError(f"{name} must hold integer ids, got dtype {pids.dtype}")


def _check_chunk_size(chunk_size: int) -> None:
    check_int("chunk_size", chunk_size)


def rank_scores(similarity: torch.Tensor, query_pids: torch.Tensor,
                gallery_pids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query scores in [0, 1] for one block of queries.

    similarity `(q, G)` finite; query_pids `(q,)`; gallery_pids `(G,)`. Returns float64 tensors of
    shape `(q,)` under keys "R@1", "R@5", "R@10", "AP", "INP". Raises when a query has no
    relevant gallery item.
    """
    if not torch.isfinite(similarity).all():
        raise TaskInputError("similarity holds NaN or infinite values; check the features")
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    relevant = gallery_pids.to(similarity.device)[order] == query_pids.to(similarity.device)[:, None]
    num_relevant = relevant.sum(dim=1)
    if bool((num_relevant == 0).any()):
        count = int((num_relevant == 0).sum())
        raise TaskInputError(f"{count} of {len(num_relevant)} queries have no image with their pid in the gallery; "
                             "AP and INP are undefined for them (remove those queries or add their images)")
    relevant_f = relevant.to(torch.float64)
    hits_so_far = relevant_f.cumsum(dim=1)
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64, device=similarity.device)
    scores = {}
    for k in RECALL_KS:
        scores[f"R@{k}"] = (hits_so_far[:, min(k, relevant.shape[1]) - 1] > 0).to(torch.float64)
    scores["AP"] = (relevant_f * hits_so_far / ranks).sum(dim=1) / num_relevant
    last_rank = (relevant_f * ranks).amax(dim=1)
    scores["INP"] = num_relevant.to(torch.float64) / last_rank
    return scores


def _aggregate(score_block: Callable[[int, int], dict[str, torch.Tensor]], num_queries: int,
               chunk_size: int, num_gallery: int) -> RetrievalMetrics:
    # Per-query scores are kept (5 float64 per query) and summed once, so the result does not
    # depend on chunk_size through the order of floating-point additions.
    blocks = [score_block(start, min(start + chunk_size, num_queries)) for start in range(0, num_queries, chunk_size)]
    mean = {key: 100.0 * float(torch.cat([b[key].cpu() for b in blocks]).sum()) / num_queries
            for key in ("R@1", "R@5", "R@10", "AP", "INP")}
    return RetrievalMetrics(r1=mean["R@1"], r5=mean["R@5"], r10=mean["R@10"], mAP=mean["AP"], mINP=mean["INP"],
                            num_queries=num_queries, num_gallery=num_gallery)


@torch.no_grad()
def metrics_from_similarity(similarity: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor, *,
                            chunk_size: int = 512) -> RetrievalMetrics:
    """Metrics from a precomputed similarity matrix `(Q, G)` (higher = more similar).

    query_pids `(Q,)` and gallery_pids `(G,)` are integer identity labels.
    """
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2 or 0 in similarity.shape:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise TaskInputError(f"similarity must be a non-empty 2-d tensor (queries, gallery), got {shape}")
    num_queries, num_gallery = similarity.shape
    _check_pids(query_pids, gallery_pids, num_queries, num_gallery)
    _check_chunk_size(chunk_size)

    def block(start: int, stop: int) -> dict[str, torch.Tensor]:
        return rank_scores(similarity[start:stop], query_pids[start:stop], gallery_pids)

    return _aggregate(block, num_queries, chunk_size, num_gallery)


@torch.no_grad()
def retrieval_metrics(query_features: torch.Tensor, gallery_features: torch.Tensor, query_pids: torch.Tensor,
                      gallery_pids: torch.Tensor, *, chunk_size: int = 512) -> RetrievalMetrics:
    """Text -> image metrics from features.

    query_features `(Q, D)` (text), gallery_features `(G, D)` (images); both are L2-normalised here
    (a no-op for normalised inputs), so the score is the cosine similarity, computed in float32 or
    wider, `chunk_size` queries at a time. query_pids `(Q,)`, gallery_pids `(G,)`.
    """
    for name, feats in (("query_features", query_features), ("gallery_features", gallery_features)):
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or 0 in feats.shape:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise TaskInputError(f"{name} must be a non-empty 2-d tensor (items, dim), got {shape}")
    if query_features.shape[1] != gallery_features.shape[1]:
        raise TaskInputError(f"feature widths differ: queries {query_features.shape[1]}, "
                             f"gallery {gallery_features.shape[1]}")
    num_queries, num_gallery = query_features.shape[0], gallery_features.shape[0]
    _check_pids(query_pids, gallery_pids, num_queries, num_gallery)
    _check_chunk_size(chunk_size)
    dtype = torch.promote_types(query_features.dtype, torch.float32)
    gallery = F.normalize(gallery_features.to(dtype), dim=1)

    def block(start: int, stop: int) -> dict[str, torch.Tensor]:
        queries = F.normalize(query_features[start:stop].to(device=gallery.device, dtype=dtype), dim=1)
        return rank_scores(queries @ gallery.T, query_pids[start:stop], gallery_pids)

    return _aggregate(block, num_queries, chunk_size, num_gallery)

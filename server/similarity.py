"""Similarity scores over vector matrices, vectorised (no per-pair loop).

Same definitions as sentence-transformers' SimilarityFunction: higher is
more similar, so the distances come back negated.
"""

from __future__ import annotations

import numpy as np

from embedq.v1 import embedq_pb2 as pb


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def pairwise(metric: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Score row i of a against row i of b."""
    if metric in (pb.METRIC_UNSPECIFIED, pb.METRIC_COSINE):
        return np.einsum("ij,ij->i", _unit(a), _unit(b))
    if metric == pb.METRIC_DOT:
        return np.einsum("ij,ij->i", a, b)
    if metric == pb.METRIC_EUCLIDEAN:
        return -np.linalg.norm(a - b, axis=-1)
    if metric == pb.METRIC_MANHATTAN:
        return -np.abs(a - b).sum(axis=-1)
    raise ValueError(f"unknown metric {metric}")


def against_query(metric: int, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Score every candidate row against one query vector."""
    return pairwise(metric, np.broadcast_to(query, candidates.shape), candidates)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best, best first (k <= 0: all)."""
    n = len(scores)
    k = n if k <= 0 or k > n else k
    if k < n:
        part = np.argpartition(-scores, k - 1)[:k]
        order = part[np.argsort(-scores[part], kind="stable")]
    else:
        order = np.argsort(-scores, kind="stable")
    return order, scores[order]

"""Retrieval recall at k, as the contrastive and BLIP-2 evaluations report it."""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)


def recall_at(scores: np.ndarray, correct: np.ndarray, ks=RECALL_AT) -> dict[int, float]:
  """scores [Q, C] and correct bool [Q, C] -> {k: fraction of queries with a correct item
  ranked within k}; an item's rank counts every wrong item scored at least as high (ties
  count against the query)."""
  best_correct = np.where(correct, scores, -np.inf).max(axis=1)  # [Q]
  rank = np.sum((scores >= best_correct[:, None]) & ~correct, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}

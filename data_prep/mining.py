"""Hard-negative mining: candidates from exact search, filtered for false negatives.

For each question: rank the corpus with an embedding model, keep candidates at ranks
[range_min, range_max), drop positives and duplicates of positives (same text), drop candidates
scoring above ``max_score_ratio`` x the positive's score (NV-Retriever's TopK-PercPos) or within
``margin`` of it, then take ``num_negatives`` from the top (or at random) of what remains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from finetune.search import chunked_topk
from finetune.data import text_key


@dataclass
class MiningSettings:
    num_negatives: int = 5
    range_min: int = 0  # candidates ranked below this (0 = best) are skipped
    range_max: int = 50  # candidates from rank range_max on are not considered
    max_score_ratio: float | None = 0.95  # drop candidates scoring > ratio * positive score
    margin: float | None = None  # drop candidates scoring > positive score - margin
    sampling: str = "top"  # "top" or "random" among the candidates that pass
    seed: int = 0


@dataclass
class MinedQuery:
    """What mining decided for one question: kept negatives and dropped candidates with the reason."""

    positive_score: float
    kept: list[tuple[int, float]] = field(default_factory=list)  # (corpus index, score)
    dropped: list[tuple[int, float, str]] = field(default_factory=list)  # (corpus index, score, reason)


def select_negatives(candidates: list[tuple[int, float]], positive_keys: set[int], corpus_keys: list[int],
                     positive_score: float, settings: MiningSettings, rng: np.random.Generator) -> MinedQuery:
    """Filter one question's ranked candidates (best first) into kept negatives and dropped ones."""
    result = MinedQuery(positive_score=positive_score)
    threshold = float("inf")
    if settings.max_score_ratio is not None:
        threshold = min(threshold, settings.max_score_ratio * positive_score)
    if settings.margin is not None:
        threshold = min(threshold, positive_score - settings.margin)
    passing = []
    for rank, (index, score) in enumerate(candidates):
        if rank < settings.range_min or rank >= settings.range_max:
            continue
        if corpus_keys[index] in positive_keys:
            result.dropped.append((index, score, "positive"))
        elif score > threshold:
            result.dropped.append((index, score, "above_threshold"))
        else:
            passing.append((index, score))
    if settings.sampling == "random" and len(passing) > settings.num_negatives:
        chosen = sorted(rng.choice(len(passing), settings.num_negatives, replace=False).tolist())
        result.kept = [passing[i] for i in chosen]
    else:
        result.kept = passing[:settings.num_negatives]
    return result


def mine_negatives(query_emb: torch.Tensor, corpus_emb: torch.Tensor, positive_indices: list[list[int]],
                   corpus_texts: list[str], settings: MiningSettings, *, corpus_chunk: int = 65536) -> list[MinedQuery]:
    """Mine every query. Shapes: query_emb (Q, D), corpus_emb (N, D) normalised; positive_indices[q] into the corpus.

    The positive's score is the lowest score among the query's positives (the strictest threshold).
    """
    corpus_keys = [text_key(text) for text in corpus_texts]
    scores, indices = chunked_topk(query_emb, corpus_emb, settings.range_max, corpus_chunk=corpus_chunk)
    rng = np.random.default_rng(settings.seed)
    results = []
    for q, positives in enumerate(positive_indices):
        positive_score = min(float(query_emb[q].float() @ corpus_emb[p].float()) for p in positives)
        candidates = list(zip(indices[q].tolist(), scores[q].tolist()))
        results.append(select_negatives(candidates, {corpus_keys[p] for p in positives}, corpus_keys,
                                        positive_score, settings, rng))
    return results

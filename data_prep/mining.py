"""Hard-negative mining: candidates from exact search, filtered for false negatives.

For each question: rank the corpus with an embedding model, consider the candidates at ranks
[range_min, range_max) of that ranking (0 = best; positives count as ranks), drop positives and
duplicates of positives (same text up to case, spacing and Unicode form), drop candidates scoring
above the threshold, then take ``num_negatives`` from the top (or at random) of what remains.

The threshold follows NV-Retriever's TopK-PercPos: with ``max_score_ratio`` r, a candidate is dropped
when it scores above ``positive - |positive| * (1 - r)`` (= r x positive for the usual positive
score; the absolute value keeps the threshold below the positive when the positive scores below 0,
as sentence-transformers' ``relative_margin`` does); with ``margin`` m, above ``positive - m``. The
positive score is the lowest among the question's positives (the strictest threshold).

Memory of ``mine_negatives``: the corpus embeddings plus one (query_chunk, corpus_chunk) block of scores;
mine queries block by block (``query_offset``) to bound the rest. ``data_prep.mine`` keeps the corpus on
disk instead (``finetune.retrieval.search``) and selects with ``select_for_queries``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from data_prep.records import normalized_key
from finetune.retrieval.topk import chunked_topk

# Why a candidate was not kept: it is a positive; a false-negative filter; already a negative of the record;
# the same text (up to case and spacing) as a better-ranked candidate that passed.
REASONS = ("positive", "max_score_ratio", "margin", "existing", "duplicate")
FILTER_REASONS = ("max_score_ratio", "margin")  # the false-negative filters
SAMPLING = ("top", "random")


@dataclass
class MiningSettings:
    num_negatives: int = 5
    range_min: int = 0  # candidates ranked below this (0 = best) are skipped
    range_max: int = 50  # candidates from rank range_max on are not considered
    max_score_ratio: float | None = 0.95  # drop candidates scoring > positive - |positive| * (1 - ratio)
    margin: float | None = None  # drop candidates scoring > positive score - margin
    sampling: str = "top"  # "top" or "random" among the candidates that pass
    seed: int = 0

    def __post_init__(self):
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}.")
        if not 0 <= self.range_min < self.range_max:
            raise ValueError(f"Need 0 <= range_min < range_max, got range_min={self.range_min}, range_max={self.range_max}.")
        if self.max_score_ratio is not None and self.max_score_ratio <= 0:
            raise ValueError(f"max_score_ratio must be > 0 (or None to disable), got {self.max_score_ratio}.")
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}.")

    def thresholds(self, positive_score: float) -> dict[str, float]:
        """Per filter, the score above which a candidate is dropped."""
        result = {}
        if self.max_score_ratio is not None:
            result["max_score_ratio"] = positive_score - abs(positive_score) * (1.0 - self.max_score_ratio)
        if self.margin is not None:
            result["margin"] = positive_score - self.margin
        return result


@dataclass
class MinedQuery:
    """What mining decided for one question: kept negatives and dropped candidates with the reason."""

    positive_score: float
    positive_index: int = -1  # corpus index of the positive that gave positive_score
    kept: list[tuple[int, float]] = field(default_factory=list)  # (corpus index, score)
    dropped: list[tuple[int, float, str]] = field(default_factory=list)  # (corpus index, score, reason)
    passed: int = 0  # candidates that passed every filter (kept or not needed)


def select_negatives(candidates: list[tuple[int, float]], positive_keys: set[int], corpus_keys, positive_score: float,
                     settings: MiningSettings, rng: np.random.Generator, existing_keys: set[int] = frozenset()) -> MinedQuery:
    """Filter one question's ranked candidates (best first) into kept negatives and dropped ones.

    ``corpus_keys[i]`` is the duplicate key of corpus text i (``normalized_key``); a candidate whose key
    is in ``positive_keys`` is a positive, one in ``existing_keys`` is already a negative of the record.
    """
    result = MinedQuery(positive_score=positive_score)
    thresholds = settings.thresholds(positive_score)
    passing, passing_keys = [], set()
    for rank, (index, score) in enumerate(candidates):
        if rank < settings.range_min or rank >= settings.range_max or index < 0:
            continue
        key = corpus_keys[index]
        reason = "positive" if key in positive_keys else next(
            (name for name, threshold in thresholds.items() if score > threshold), None)
        if reason is None and key in existing_keys:
            reason = "existing"
        elif reason is None and key in passing_keys:
            reason = "duplicate"
        if reason:
            result.dropped.append((index, score, reason))
        else:
            passing.append((index, score))
            passing_keys.add(key)
    result.passed = len(passing)
    if settings.sampling == "random" and len(passing) > settings.num_negatives:
        chosen = sorted(rng.choice(len(passing), settings.num_negatives, replace=False).tolist())
        result.kept = [passing[i] for i in chosen]
    else:
        result.kept = passing[:settings.num_negatives]
    return result


def mine_negatives(query_emb: torch.Tensor, corpus_emb: torch.Tensor, positive_indices: list[list[int]],
                   corpus_texts: list[str] | None, settings: MiningSettings, *, corpus_chunk: int = 16384,
                   query_chunk: int = 256, corpus_keys=None, existing_indices: list[list[int]] | None = None,
                   search: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                   query_offset: int = 0) -> list[MinedQuery]:
    """Mine every query over an in-memory corpus. Shapes: query_emb (Q, D), corpus_emb (N, D) normalised (fp16 or
    fp32); positive_indices[q] and existing_indices[q] (the record's current negatives) index the corpus.

    ``corpus_keys`` (precomputed ``normalized_key`` of every corpus text) saves hashing the corpus on
    each call when mining block by block; ``search(query_emb, k)`` replaces the chunked torch search.
    ``data_prep.mine`` searches corpus shards on disk instead and calls :func:`select_for_queries`.
    """
    if corpus_keys is None:
        corpus_keys = [normalized_key(text) for text in corpus_texts]
    if search is None:
        scores, indices = chunked_topk(query_emb, corpus_emb, settings.range_max, query_chunk=query_chunk,
                                       corpus_chunk=corpus_chunk)
    else:
        scores, indices = search(query_emb, settings.range_max)
    # Scored as the search scores candidates (fp32 query . fp32 copy of the stored row).
    positive_scores = [(corpus_emb[positives].float() @ query_emb[q].float().to(corpus_emb.device)).tolist()
                       for q, positives in enumerate(positive_indices)]
    return select_for_queries(scores.cpu(), indices.cpu(), positive_scores, positive_indices, corpus_keys, settings,
                              existing_indices=existing_indices, query_offset=query_offset)


def select_for_queries(scores, indices, positive_scores: list[list[float]], positive_indices: list[list[int]],
                       corpus_keys, settings: MiningSettings, *, existing_indices: list[list[int]] | None = None,
                       query_offset: int = 0) -> list[MinedQuery]:
    """Mine queries whose candidates are searched already. Shapes: scores, indices (Q, k) best first (tensors or
    arrays); positive_scores[q] the scores of positive_indices[q].

    Random sampling is seeded per query by (seed, query_offset + q), so the result does not depend on
    how the queries are split into blocks.
    """
    scores, indices = np.asarray(scores), np.asarray(indices)
    results = []
    for q, positives in enumerate(positive_indices):
        hardest = int(np.argmin(positive_scores[q]))
        # Equal scores (e.g. texts equal after the tokenizer's lower-casing) in corpus order: deterministic
        # whatever order the search returned them in.
        candidates = sorted(zip(indices[q].tolist(), scores[q].tolist()), key=lambda item: (-item[1], item[0]))
        existing = {corpus_keys[i] for i in existing_indices[q]} if existing_indices is not None else frozenset()
        rng = np.random.default_rng((settings.seed, query_offset + q))
        result = select_negatives(candidates, {corpus_keys[p] for p in positives}, corpus_keys,
                                  float(positive_scores[q][hardest]), settings, rng, existing)
        result.positive_index = positives[hardest]
        results.append(result)
    return results

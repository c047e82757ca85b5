"""Reranking: score each query's candidate documents with a cross-encoder and rank them by that score.

``rerank_run`` turns candidate lists into a run (query id -> {doc id: score}); the metrics are the retrieval
evaluation's own (``finetune.retrieval.evaluation.compute_metrics``). During cross-encoder training
:class:`RerankEvaluator` reranks a fixed candidate list taken from the validation records: each query's positives
and its own negatives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from finetune.data.text import TextSide
from finetune.retrieval.evaluation import Run, compute_metrics
from finetune.retrieval.sets import RetrievalSet

ScorePairs = Callable[[list[str], list[str]], torch.Tensor]  # (queries, documents) -> (N,) scores


def group_candidates(dataset: RetrievalSet) -> dict[str, list[str]]:
    """Each query's own candidates: its relevant documents, then the negatives of its records (no repeats)."""
    candidates: dict[str, list[str]] = {}
    for qid, relevant in dataset.qrels.items():
        candidates[qid] = [doc for doc, rel in relevant.items() if rel > 0]
    for qid, negatives in dataset.groups:
        seen = set(candidates.setdefault(qid, []))
        candidates[qid].extend(doc for doc in negatives if doc not in seen and not seen.add(doc))
    return candidates


def rerank_run(score_pairs: ScorePairs, dataset: RetrievalSet, candidates: dict[str, list[str]], *,
               query: TextSide = TextSide(), document: TextSide = TextSide(), batch_size: int = 64) -> Run:
    """Score every (query, candidate) pair, ``batch_size`` pairs at a time, with the sides' prompts applied."""
    pairs = [(qid, doc) for qid, docs in candidates.items() for doc in docs]
    scores: list[float] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="Reranking", unit=" batches", leave=False):
        chunk = pairs[start:start + batch_size]
        scores += score_pairs(query.prompted([dataset.queries[qid] for qid, _ in chunk]),
                              document.prompted([dataset.corpus[doc] for _, doc in chunk])).float().tolist()
    run: Run = {}
    for (qid, doc), score in zip(pairs, scores):
        run.setdefault(qid, {})[doc] = score
    return run


class RerankEvaluator:
    """Metrics of the cross-encoder being trained, reranking each validation query's own candidates (its positives
    and negatives: a fixed list from the data). Every process scores every pair (validation sets are small)."""

    def __init__(self, dataset: RetrievalSet, *, query: TextSide, document: TextSide, batch_size: int = 32):
        self.dataset, self.query, self.document, self.batch_size = dataset, query, document, batch_size
        self.candidates = group_candidates(dataset)

    def __call__(self, model, *, device: torch.device | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
        """``model``: an unwrapped ``CrossEncoderModel``."""
        def score(queries: list[str], documents: list[str]) -> torch.Tensor:
            with autocast():
                return model.score(queries, documents, batch_size=len(queries))

        run = rerank_run(score, self.dataset, self.candidates, query=self.query, document=self.document,
                         batch_size=self.batch_size)
        return compute_metrics(run, {qid: self.dataset.qrels[qid] for qid in self.candidates})

"""Retrieval metrics as an `evaluate` module: nDCG@10, MRR@10, Recall@1/10/100, MAP@100.

Load it from its folder (no Hub needed): ``evaluate.load("finetune/metrics/retrieval")``, or use
``finetune.metrics.load_retrieval_metric()``. Definitions follow trec_eval (checked against
pytrec_eval in the tests): every query counts; one without a relevant document scores 0.

Inputs, one entry per query:
    predictions: document ids ranked best first (ties already broken by the caller).
    references: the ids of the relevant documents (binary relevance).
"""

from __future__ import annotations

import math

import datasets
import evaluate

METRIC_NAMES = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")


def query_metrics(ranking: list[str], relevant: dict[str, int]) -> dict[str, float]:
    """All METRIC_NAMES for one query. ``relevant``: doc id -> relevance (> 0 counts as relevant; graded gains)."""
    judged = {doc: rel for doc, rel in relevant.items() if rel > 0}
    if not judged:
        return {name: 0.0 for name in METRIC_NAMES}
    gains = [judged.get(doc, 0) for doc in ranking]
    dcg = sum(gain / math.log2(position + 2) for position, gain in enumerate(gains[:10]))
    ideal = sorted(judged.values(), reverse=True)[:10]
    idcg = sum(gain / math.log2(position + 2) for position, gain in enumerate(ideal))
    first_hit = next((position for position, gain in enumerate(gains[:10]) if gain > 0), None)
    hits, precision_sum = 0, 0.0
    for position, gain in enumerate(gains[:100]):
        if gain > 0:
            hits += 1
            precision_sum += hits / (position + 1)
    return {
        "ndcg@10": dcg / idcg,
        "mrr@10": 1.0 / (first_hit + 1) if first_hit is not None else 0.0,
        "recall@1": sum(1 for g in gains[:1] if g > 0) / len(judged),
        "recall@10": sum(1 for g in gains[:10] if g > 0) / len(judged),
        "recall@100": sum(1 for g in gains[:100] if g > 0) / len(judged),
        "map@100": precision_sum / len(judged),
    }


def mean_metrics(per_query: list[dict[str, float]]) -> dict[str, float]:
    if not per_query:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: sum(metrics[name] for metrics in per_query) / len(per_query) for name in METRIC_NAMES}


class Retrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: ranked document ids per query; references: relevant document ids.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        return mean_metrics([query_metrics(list(ranking), {doc: 1 for doc in relevant})
                             for ranking, relevant in zip(predictions, references)])

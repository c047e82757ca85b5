"""Several models on the same queries: their per-query metrics as JSON Lines, and each model against the first.

``per_query`` below is one model's ``evaluate_model(..., per_query=True)["per_query"]``: query id -> {metric:
value}, every model over the same query ids. Each later model is compared with the first (the baseline) by
``significance.compare_paired``: mean difference, paired bootstrap interval, sign-flip p-value, per metric.
"""

from __future__ import annotations

import json

import numpy as np

from finetune.training.checkpointing import atomic_write
from finetune.metrics.retrieval.retrieval import METRIC_NAMES
from finetune.retrieval.significance import compare_paired

PerQuery = dict[str, dict[str, float]]  # query id -> {metric: value}


def write_per_query(path: str, per_query_by_model: dict[str, PerQuery], queries: dict[str, str]) -> None:
    """One JSON line per (model, query), models in the given order: model, query_id, query (its text), the metrics.
    Written atomically (``.gz`` paths compressed)."""
    with atomic_write(path) as handle:
        for model, per_query in per_query_by_model.items():
            for qid, values in per_query.items():
                handle.write(json.dumps({"model": model, "query_id": qid, "query": queries.get(qid), **values}) + "\n")


def compare_to_first(per_query_by_model: dict[str, PerQuery], *, metrics: tuple[str, ...] = METRIC_NAMES,
                     samples: int = 10_000, permutations: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, dict]:
    """For each model after the first: {"baseline", "queries", the settings, "metrics": {metric: {"difference",
    "low", "high", "p_value"}}}; difference = this model's mean - the baseline's. Deterministic given ``seed``."""
    (baseline, baseline_values), *others = per_query_by_model.items()
    query_ids = list(baseline_values)
    comparisons = {}
    for model, values in others:
        if values.keys() != baseline_values.keys():
            raise ValueError(f"{model} and {baseline} were scored on different queries; a paired test needs the same.")
        result = compare_paired(_matrix(baseline_values, query_ids, metrics), _matrix(values, query_ids, metrics),
                                samples=samples, permutations=permutations, confidence=confidence, seed=seed)
        comparisons[model] = {
            "baseline": baseline, "queries": len(query_ids), "bootstrap_samples": samples,
            "permutations": permutations, "confidence": confidence, "seed": seed,
            "metrics": {metric: {field: float(getattr(result, field)[index])
                                 for field in ("difference", "low", "high", "p_value")}
                        for index, metric in enumerate(metrics)}}
    return comparisons


def _matrix(per_query: PerQuery, query_ids: list[str], metrics: tuple[str, ...]) -> np.ndarray:
    """(Q, M): row i = query_ids[i], column j = metrics[j]."""
    return np.array([[per_query[qid][metric] for metric in metrics] for qid in query_ids], dtype=np.float64)


def format_comparisons(comparisons: dict[str, dict]) -> str:
    """One table per compared model: metric, difference, interval, p-value."""
    tables = []
    for model, comparison in comparisons.items():
        level = f"{comparison['confidence']:.0%}"
        title = (f"{model} - {comparison['baseline']} ({comparison['queries']} queries; paired bootstrap {level} "
                 f"interval of {comparison['bootstrap_samples']} resamples; sign-flip test of "
                 f"{comparison['permutations']} permutations; seed {comparison['seed']})")
        header = ["metric", "difference", f"{level} interval", "p-value"]
        rows = [[metric, f"{v['difference']:+.4f}", f"[{v['low']:+.4f}, {v['high']:+.4f}]", f"{v['p_value']:.4f}"]
                for metric, v in comparison["metrics"].items()]
        tables.append(title + "\n" + markdown_table(header, rows))
    return "\n\n".join(tables)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])

"""Retrieval evaluation: build a query/corpus/qrels set, rank the corpus exactly, compute IR metrics.

Metrics follow trec_eval's definitions (ties broken by document id, descending, as trec_eval
does), so they equal ir_measures / pytrec_eval on the same run:
nDCG@10, MRR@10, Recall@1/10/100, MAP@100. Every query of the qrels counts, as in pytrec_eval:
one missing from the run, or without any relevant document, scores 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from finetune.search import chunked_topk

METRIC_NAMES = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")
Run = dict[str, dict[str, float]]  # query id -> {doc id: score}
Qrels = dict[str, dict[str, int]]  # query id -> {doc id: relevance}


@dataclass
class RetrievalSet:
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # doc id -> text
    qrels: Qrels


def retrieval_set_from_records(records: Iterable[dict]) -> RetrievalSet:
    """Seed-format records -> queries (question), corpus (all pos_doc and neg_doc texts, deduplicated), qrels (pos_doc).

    Records with the same question are merged (their positives all count as relevant).
    """
    queries: dict[str, str] = {}
    corpus_ids: dict[str, str] = {}
    qrels: Qrels = {}
    question_ids: dict[str, str] = {}

    def doc_id(text: str) -> str:
        return corpus_ids.setdefault(text, f"d{len(corpus_ids)}")

    for record in records:
        qid = question_ids.setdefault(record["question"], f"q{len(question_ids)}")
        queries[qid] = record["question"]
        for text in record["pos_doc"]:
            qrels.setdefault(qid, {})[doc_id(text)] = 1
        for text in record.get("neg_doc", []):
            doc_id(text)
    return RetrievalSet(queries, {did: text for text, did in corpus_ids.items()}, qrels)


def rank(run_scores: dict[str, float]) -> list[str]:
    """Doc ids best first; ties broken by doc id descending (trec_eval's order)."""
    return [doc for doc, _ in sorted(run_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(ranking: list[str], relevant: dict[str, int]) -> dict[str, float]:
    """All METRIC_NAMES for one query. ``relevant``: doc id -> relevance (> 0 counts as relevant)."""
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
        "ndcg@10": dcg / idcg if idcg else 0.0,
        "mrr@10": 1.0 / (first_hit + 1) if first_hit is not None else 0.0,
        "recall@1": sum(1 for g in gains[:1] if g > 0) / len(judged),
        "recall@10": sum(1 for g in gains[:10] if g > 0) / len(judged),
        "recall@100": sum(1 for g in gains[:100] if g > 0) / len(judged),
        "map@100": precision_sum / len(judged),
    }


def compute_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean of every metric over all queries of ``qrels`` (one missing from ``run`` retrieved nothing)."""
    per_query = [query_metrics(rank(run.get(qid, {})), relevant) for qid, relevant in sorted(qrels.items())]
    if not per_query:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: sum(metrics[name] for metrics in per_query) / len(per_query) for name in METRIC_NAMES}


def search(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
           top_k: int = 100) -> Run:
    """Exact top-k search -> run. Shapes: query_emb (Q, D), corpus_emb (N, D)."""
    scores, indices = chunked_topk(query_emb, corpus_emb, top_k)
    return {qid: {doc_ids[i]: s for i, s in zip(row_indices.tolist(), row_scores.tolist())}
            for qid, row_scores, row_indices in zip(query_ids, scores, indices)}


def evaluate_retrieval(encode_queries: Callable[[list[str]], torch.Tensor],
                       encode_documents: Callable[[list[str]], torch.Tensor],
                       dataset: RetrievalSet, top_k: int = 100) -> dict[str, float]:
    """Encode queries and corpus with the given functions ((N, D) tensors), search, and score."""
    query_ids, doc_ids = list(dataset.queries), list(dataset.corpus)
    query_emb = encode_queries([dataset.queries[qid] for qid in query_ids])
    corpus_emb = encode_documents([dataset.corpus[did] for did in doc_ids])
    return compute_metrics(search(query_emb, corpus_emb, query_ids, doc_ids, top_k), dataset.qrels)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_beir_folder(folder: str, split: str = "test") -> RetrievalSet:
    """A BEIR folder: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv.

    Documents are "title text" when a title is present; only queries with qrels are kept.
    """
    qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        raise FileNotFoundError(f"BEIR folder {folder!r} has no qrels/{split}.tsv (choose another --split).")
    qrels: Qrels = {}
    with open(qrels_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if line_number == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(parts) < 3:
                raise ValueError(f"{qrels_path}, line {line_number}: expected 'query-id<TAB>corpus-id<TAB>score'.")
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    corpus = {str(doc["_id"]): f"{doc.get('title', '')} {doc['text']}".strip()
              for doc in _read_jsonl(os.path.join(folder, "corpus.jsonl"))}
    queries = {str(query["_id"]): query["text"] for query in _read_jsonl(os.path.join(folder, "queries.jsonl"))
               if str(query["_id"]) in qrels}
    return RetrievalSet(queries, corpus, {qid: rels for qid, rels in qrels.items() if qid in queries})


def load_retrieval_set(paths: list[str], split: str = "test") -> RetrievalSet:
    """A BEIR folder (one path that is a directory) or seed-format files/globs."""
    from finetune.schema import read_records

    if len(paths) == 1 and os.path.isdir(paths[0]):
        return load_beir_folder(paths[0], split)
    return retrieval_set_from_records(read_records(paths))

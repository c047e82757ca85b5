"""Retrieval evaluation: encode, store, search exactly, score; one stack for training and ``finetune.evaluate``.

The metric maths lives once, in the `evaluate` module ``finetune/metrics/retrieval``; here runs
are ranked with trec_eval's tie order (score, then document id, descending), so the numbers
equal ir_measures / pytrec_eval on the same run: nDCG@10, MRR@10, Recall@1/10/100, MAP@100.
Every query of the qrels counts, as in pytrec_eval: one missing from the run, or without any
relevant document, scores 0. Documents are ranked by the similarity the model declares (cosine
for every model this project saves, also with ``--normalize false``; or dot product).

During training the trainer is handed a :class:`RetrievalEvaluator` (:func:`evaluate_retrieval`: embeddings in
memory); ``python -m finetune.evaluate`` uses :func:`evaluate_model` on any SentenceTransformer-loadable model
(embeddings in shards on disk, work shared over processes). Both encode in the same batches
(``finetune.retrieval.embeddings``), search with ``finetune.retrieval.search.search_block`` and score with
:func:`metrics_from_blocks`: the same model on the same data gives the same metrics from both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from finetune.metrics.retrieval.retrieval import METRIC_NAMES, mean_metrics, query_metrics
from finetune.retrieval.embedder import load_embedder
from finetune.retrieval.embeddings import InMemoryEmbeddings, encode_in_memory
from finetune.retrieval.search import (SearchedBlock, ShardOptions, encode_corpus, read_blocks, remove_parts,
                                       search_block, search_queries)
from finetune.retrieval.sets import Qrels, RetrievalSet
from finetune.retrieval.similarity import similarity_transform
from finetune.retrieval.work_parts import process_state
from finetune.data.text import TextSide

__all__ = ["METRIC_NAMES", "RetrievalEvaluator", "MultiRetrievalEvaluator", "evaluate_model", "evaluate_retrieval"]
logger = logging.getLogger("finetune.retrieval.evaluation")

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}
SEARCH_DEPTH = 100  # documents evaluate_model keeps per query (recall@100 and map@100 look this deep)


def rank(run_scores: dict[str, float]) -> list[str]:
    """Doc ids best first; ties broken by doc id descending (trec_eval's order)."""
    return [doc for doc, _ in sorted(run_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def per_query_metrics(run: Run, qrels: Qrels) -> dict[str, dict[str, float]]:
    """Every metric of each query of ``qrels``, in sorted query id order (one missing from ``run`` found nothing)."""
    return {qid: query_metrics(rank(run.get(qid, {})), relevant) for qid, relevant in sorted(qrels.items())}


def compute_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean of every metric over all queries of ``qrels``: the mean of ``per_query_metrics``, summed in its order."""
    return mean_metrics(list(per_query_metrics(run, qrels).values()))


def search(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
           top_k: int = 100) -> Run:
    """Exact top-k search by dot product (the stack's ``search_block``) -> run. Shapes: query_emb (Q, D), corpus_emb
    (N, D)."""
    options = ShardOptions(folder=None)
    block = search_block(query_emb, InMemoryEmbeddings(corpus_emb, options.shard_size), top_k, options)
    return {qid: {doc_ids[i]: s for i, s in zip(row_indices, row_scores)}
            for qid, row_scores, row_indices in zip(query_ids, block.scores.tolist(), block.indices.tolist())}


def in_group_rows(dataset: RetrievalSet, doc_row: dict[str, int]) -> dict[str, list[int]]:
    """Per query with groups: the corpus rows of its positives, then of each of its groups' negatives in
    ``dataset.groups`` order (the layout ``in_group_metrics_from_rows`` reads)."""
    rows: dict[str, list[int]] = {}
    for qid, _ in dataset.groups:
        rows.setdefault(qid, [doc_row[d] for d, rel in dataset.qrels.get(qid, {}).items() if rel > 0])
    for qid, negatives in dataset.groups:
        rows[qid].extend(doc_row[d] for d in negatives)
    return rows


def in_group_metrics_from_rows(dataset: RetrievalSet, row_scores: dict[str, np.ndarray]) -> dict[str, float]:
    """``in_group_metrics`` from each grouped query's scores with the rows of ``in_group_rows``."""
    if not dataset.groups:
        return {}
    positives = {qid: sum(rel > 0 for rel in dataset.qrels.get(qid, {}).values()) for qid, _ in dataset.groups}
    used, reciprocal_ranks = dict(positives), []
    for qid, negatives in dataset.groups:
        best_positive = row_scores[qid][:positives[qid]].max()
        above = int((row_scores[qid][used[qid]:used[qid] + len(negatives)] > best_positive).sum())
        used[qid] += len(negatives)
        reciprocal_ranks.append(1.0 / (1 + above))
    return in_group_summary(reciprocal_ranks)


def in_group_summary(reciprocal_ranks: list[float]) -> dict[str, float]:
    """ingroup_accuracy and ingroup_mrr from each group's 1 / (1 + negatives scoring above its best positive)."""
    return {"ingroup_accuracy": sum(r == 1.0 for r in reciprocal_ranks) / len(reciprocal_ranks),
            "ingroup_mrr": sum(reciprocal_ranks) / len(reciprocal_ranks)}


def in_group_metrics(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_index: dict[str, int],
                     doc_index: dict[str, int], dataset: RetrievalSet) -> dict[str, float]:
    """The rank of each query's best positive among its own negatives (cheap, no corpus search).

    ingroup_accuracy: share of groups whose best positive beats every negative; ingroup_mrr: mean of
    1 / (1 + number of negatives scoring above the best positive).
    """
    rows = in_group_rows(dataset, doc_index)
    return in_group_metrics_from_rows(dataset, {qid: (corpus_emb[rows_of] @ query_emb[query_index[qid]]).numpy()
                                                for qid, rows_of in rows.items()})


def metrics_from_blocks(dataset: RetrievalSet, query_ids: list[str], doc_ids: list[str],
                        blocks: Iterable[SearchedBlock], *, per_query: bool = False, return_run: bool = False) -> dict:
    """METRIC_NAMES and the in-group metrics from the searched blocks of the queries (top-k rows and the scores of
    the rows of ``in_group_rows``): the last step of both the in-memory and the on-disk evaluation. ``per_query``
    adds ``"per_query"``: query id -> METRIC_NAMES (``per_query_metrics``), whose means are the metrics;
    ``return_run`` adds ``"run"``: the searched run the metrics were computed from (query id -> {doc id: score})."""
    group_rows = in_group_rows(dataset, {doc: row for row, doc in enumerate(doc_ids)})
    run: Run = {}
    row_scores: dict[str, np.ndarray] = {}
    for block in blocks:
        for offset, (scores, indices) in enumerate(zip(block.scores.tolist(), block.indices.tolist())):
            qid = query_ids[block.start + offset]
            run[qid] = {doc_ids[i]: s for i, s in zip(indices, scores)}
            if qid in group_rows:
                row_scores[qid] = block.row_scores[offset]
    values = per_query_metrics(run, dataset.qrels)
    metrics: dict = mean_metrics(list(values.values()))  # compute_metrics, keeping the per-query values
    metrics.update(in_group_metrics_from_rows(dataset, row_scores))
    if per_query:
        metrics["per_query"] = values
    if return_run:
        metrics["run"] = run
    return metrics


def evaluate_retrieval(encode_queries: Callable[[list[str]], torch.Tensor],
                       encode_documents: Callable[[list[str]], torch.Tensor],
                       dataset: RetrievalSet, top_k: int = 100, similarity: str = "cosine",
                       truncate_dims: tuple[int, ...] = (), *, options: ShardOptions | None = None,
                       device: torch.device | None = None) -> dict[str, float]:
    """Encode queries and corpus in memory with the given functions (one batch of texts -> (n, D)), search exactly by
    ``similarity``, and score: the stack of ``evaluate_model`` with the corpus held in memory in fp32.

    The batches are those of the on-disk shards and query blocks of ``options`` (``ShardOptions``; its ``folder`` is
    not used), so the metrics equal ``evaluate_model``'s with fp32 shards and the same options. Several processes
    share the batches (every process calls this; rows gathered on ``device``) and all get the metrics.
    Returns METRIC_NAMES plus, when the set has groups, the in-group metrics; for each of ``truncate_dims``
    the same metrics of the embeddings cut to that size (``ndcg@10_dim128``...; Matryoshka), from the same encoding.
    """
    options = options or ShardOptions(folder=None)
    query_ids, doc_ids = list(dataset.queries), list(dataset.corpus)
    corpus = InMemoryEmbeddings(encode_in_memory(encode_documents, [dataset.corpus[d] for d in doc_ids],
                                                 unit_size=options.shard_size, batch_size=options.batch_size,
                                                 device=device), options.shard_size)
    query_emb = encode_in_memory(encode_queries, [dataset.queries[q] for q in query_ids],
                                 unit_size=options.query_block_size, batch_size=options.batch_size, device=device)
    metrics = score_embeddings(query_emb, corpus, query_ids, doc_ids, dataset, top_k, similarity, options=options)
    for dim in truncate_dims:
        truncated = score_embeddings(query_emb, corpus, query_ids, doc_ids, dataset, top_k, similarity, dim=dim,
                                     options=options)
        metrics.update({f"{name}_dim{dim}": value for name, value in truncated.items()})
    return metrics


def score_embeddings(query_emb: torch.Tensor, corpus_emb, query_ids: list[str], doc_ids: list[str],
                     dataset: RetrievalSet, top_k: int = 100, similarity: str = "cosine", *, dim: int | None = None,
                     options: ShardOptions | None = None) -> dict[str, float]:
    """Metrics of ranking the corpus by ``similarity`` (embeddings cut to ``dim`` first, when given). Shapes:
    query_emb (Q, D); corpus_emb (N, D) or ``InMemoryEmbeddings``; rows as the ids."""
    options = options or ShardOptions(folder=None)
    if isinstance(corpus_emb, torch.Tensor):
        corpus_emb = InMemoryEmbeddings(corpus_emb, options.shard_size)
    group_rows = in_group_rows(dataset, {doc: row for row, doc in enumerate(doc_ids)})
    transform = similarity_transform(similarity, dim)
    size = options.query_block_size
    blocks = (search_block(query_emb[start:start + size], corpus_emb, top_k, options, transform=transform, start=start,
                           score_rows=[group_rows.get(qid, []) for qid in query_ids[start:start + size]])
              for start in range(0, len(query_ids), size))
    return metrics_from_blocks(dataset, query_ids, doc_ids, blocks)


class RetrievalEvaluator:
    """Retrieval metrics of the model being trained on a fixed :class:`RetrievalSet` (sentence-transformers' ``evaluator=``).

    Texts are tokenized as in training (``query``/``document`` sides, ``finetune.data.text``), encoded in the batches
    of ``evaluate_retrieval`` (shared over the processes), and ranked by the model's similarity (cosine).
    """

    def __init__(self, dataset: RetrievalSet, *, query: TextSide, document: TextSide, batch_size: int = 32,
                 top_k: int = 100, truncate_dims: tuple[int, ...] = ()):
        self.dataset = dataset
        self.truncate_dims = tuple(truncate_dims)  # Matryoshka sizes to report too
        self.query = query
        self.document = document
        self.batch_size = batch_size
        self.top_k = top_k

    def __call__(self, model, *, device: torch.device | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, float]:
        """``model``: an unwrapped ``EmbeddingModel``; every process must call this together (sharded encoding)."""
        device = device or next(model.parameters()).device

        def encoder(side: TextSide) -> Callable[[list[str]], torch.Tensor]:
            def encode(texts: list[str]) -> torch.Tensor:  # one batch
                with autocast():
                    return model.encode(texts, side, batch_size=len(texts))
            return encode

        return evaluate_retrieval(encoder(self.query), encoder(self.document), self.dataset, self.top_k,
                                  similarity=model.similarity, truncate_dims=self.truncate_dims,
                                  options=ShardOptions(folder=None, batch_size=self.batch_size), device=device)


class MultiRetrievalEvaluator:
    """One RetrievalEvaluator per validation dataset: metrics ``<name>_<metric>`` and their mean under ``<metric>``."""

    def __init__(self, evaluators: dict[str, RetrievalEvaluator]):
        self.evaluators = evaluators

    def __call__(self, model, **kwargs) -> dict[str, float]:
        per_dataset = {name: evaluator(model, **kwargs) for name, evaluator in self.evaluators.items()}
        metrics = {f"{name}_{metric}": value for name, values in per_dataset.items() for metric, value in values.items()}
        shared = set.intersection(*(set(values) for values in per_dataset.values()))
        metrics.update({metric: sum(values[metric] for values in per_dataset.values()) / len(per_dataset)
                        for metric in sorted(shared)})
        return metrics


class ForgettingCheckEvaluator:
    """The domain evaluator's metrics plus a general-domain set's, named ``general_<metric>``: kept apart from the
    domain metrics (which the best checkpoint and the logs' headline follow)."""

    PREFIX = "general_"

    def __init__(self, domain, general):
        self.domain, self.general = domain, general

    def __call__(self, model, **kwargs) -> dict[str, float]:
        metrics = dict(self.domain(model, **kwargs))
        metrics.update({f"{self.PREFIX}{name}": value for name, value in self.general(model, **kwargs).items()})
        return metrics


def evaluate_model(model_name_or_path: str, dataset: RetrievalSet, *, batch_size: int | None = None,
                   max_seq_length: int | None = None, truncate_dim: int | None = None, shard_dir: str | None = None,
                   shard_size: int = 50_000, query_block_size: int = 1024, keep_shards: bool = False,
                   shard_dtype: str = "float32", per_query: bool = False, return_run: bool = False) -> dict:
    """Retrieval metrics of any SentenceTransformer-loadable model (``load_embedder``), with its saved
    ``query``/``document`` prompts and its declared similarity; adds ``seconds``. ``truncate_dim``: evaluate the
    embeddings cut to that size.

    The corpus is encoded into ``shard_dtype`` shards of ``shard_size`` documents in ``shard_dir`` (default: a
    temporary folder) and the queries searched over them in blocks (``finetune.retrieval.search``); the folder is
    removed afterwards unless ``keep_shards``. The batches, chunks and arithmetic are ``evaluate_retrieval``'s: with
    fp32 shards the metrics equal the in-memory evaluation during training. Under ``accelerate launch`` every
    process calls this with the same ``shard_dir`` and shares the work; the metrics come back on the main process,
    ``{}`` on the others. ``per_query`` adds ``"per_query"``: query id -> METRIC_NAMES (see ``metrics_from_blocks``);
    ``return_run`` adds ``"run"``: each query's top ``SEARCH_DEPTH`` documents with their scores (a reranker's
    candidates; main process only, like the metrics).
    """
    state = process_state()
    if shard_dir is None:
        if state.num_processes > 1:
            raise ValueError("Several processes need a shard_dir they all see.")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="finetune-evaluate-") as folder:
            return evaluate_model(model_name_or_path, dataset, batch_size=batch_size, max_seq_length=max_seq_length,
                                  truncate_dim=truncate_dim, shard_dir=folder, shard_size=shard_size,
                                  query_block_size=query_block_size, shard_dtype=shard_dtype, per_query=per_query,
                                  return_run=return_run)
    start = time.perf_counter()
    embedder = load_embedder(model_name_or_path, device=state.device, max_seq_length=max_seq_length,
                             batch_size=batch_size)
    options = ShardOptions(folder=shard_dir, shard_size=shard_size, query_block_size=query_block_size,
                           batch_size=embedder.batch_size, dtype=shard_dtype)
    identity = embedder.identity + [truncate_dim, embedder.similarity]
    query_ids, doc_ids = list(dataset.queries), list(dataset.corpus)
    group_rows = in_group_rows(dataset, {doc: row for row, doc in enumerate(doc_ids)})
    shards = encode_corpus(lambda texts: embedder.encode(texts, "document"), [dataset.corpus[d] for d in doc_ids],
                           options, identity + ["document"], state)
    blocks = search_queries(lambda texts: embedder.encode(texts, "query"), [dataset.queries[q] for q in query_ids],
                            shards, SEARCH_DEPTH, options, identity + ["query"],
                            score_rows=[group_rows.get(qid, []) for qid in query_ids], device=state.device,
                            transform=similarity_transform(embedder.similarity, truncate_dim))
    if not state.is_main_process:
        return {}
    metrics = metrics_from_blocks(dataset, query_ids, doc_ids, read_blocks(blocks, options.query_block_size),
                                  per_query=per_query, return_run=return_run)
    metrics["seconds"] = time.perf_counter() - start
    if not keep_shards:
        remove_parts(options)
    return metrics

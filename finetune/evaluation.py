"""Retrieval evaluation: build a query/corpus/qrels set, rank the corpus exactly, compute IR metrics.

The metric maths lives once, in the `evaluate` module ``finetune/metrics/retrieval``; here runs
are ranked with trec_eval's tie order (score, then document id, descending), so the numbers
equal ir_measures / pytrec_eval on the same run: nDCG@10, MRR@10, Recall@1/10/100, MAP@100.
Every query of the qrels counts, as in pytrec_eval: one missing from the run, or without any
relevant document, scores 0. Documents are ranked by the similarity the model declares (cosine
for every model this project saves, also with ``--normalize false``; or dot product).

During training the trainer is handed a :class:`RetrievalEvaluator` (embeddings in memory);
``python -m finetune.evaluate`` uses :func:`evaluate_model` on any SentenceTransformer-loadable model
(corpus embeddings in fp16 shards on disk, work shared over processes: ``finetune.sharded_search``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from finetune.distributed import encode_sharded
from finetune.metrics.retrieval.retrieval import METRIC_NAMES, mean_metrics, query_metrics
from finetune.search import chunked_topk
from finetune.sharded_search import ShardOptions, encode_corpus, read_blocks, remove_parts, search_queries
from finetune.text import TextSide
from finetune.work_blocks import path_identity, process_state

SIMILARITIES = ("cosine", "dot")
logger = logging.getLogger("finetune.evaluation")

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}
Qrels = dict[str, dict[str, int]]  # query id -> {doc id: relevance}


@dataclass
class RetrievalSet:
    """Queries, corpus and relevance judgements; ``groups`` (query id, its negatives' doc ids) feed the in-group metric."""

    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # doc id -> text
    qrels: Qrels
    groups: list[tuple[str, list[str]]] = field(default_factory=list)

    def add_corpus_texts(self, texts: Iterable[str]) -> None:
        """Extra documents (distractors); texts already in the corpus are not added twice."""
        known = set(self.corpus.values())
        for text in texts:
            if text not in known:
                known.add(text)
                self.corpus[f"x{len(self.corpus)}"] = text


def retrieval_set_from_records(records: Iterable[dict]) -> RetrievalSet:
    """Seed-format records -> queries (question), corpus (all pos_doc and neg_doc texts, deduplicated), qrels (pos_doc).

    Records with the same question are merged (their positives all count as relevant).
    """
    queries: dict[str, str] = {}
    corpus_ids: dict[str, str] = {}
    qrels: Qrels = {}
    question_ids: dict[str, str] = {}
    groups: list[tuple[str, list[str]]] = []

    def doc_id(text: str) -> str:
        return corpus_ids.setdefault(text, f"d{len(corpus_ids)}")

    for record in records:
        qid = question_ids.setdefault(record["question"], f"q{len(question_ids)}")
        queries[qid] = record["question"]
        for text in record["pos_doc"]:
            qrels.setdefault(qid, {})[doc_id(text)] = 1
        negatives = [doc_id(text) for text in record.get("neg_doc", [])]
        if negatives:
            groups.append((qid, negatives))
    return RetrievalSet(queries, {did: text for text, did in corpus_ids.items()}, qrels, groups)


def rank(run_scores: dict[str, float]) -> list[str]:
    """Doc ids best first; ties broken by doc id descending (trec_eval's order)."""
    return [doc for doc, _ in sorted(run_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def compute_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean of every metric over all queries of ``qrels`` (one missing from ``run`` retrieved nothing)."""
    return mean_metrics([query_metrics(rank(run.get(qid, {})), relevant) for qid, relevant in sorted(qrels.items())])


def search(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
           top_k: int = 100) -> Run:
    """Exact top-k search -> run. Shapes: query_emb (Q, D), corpus_emb (N, D)."""
    scores, indices = chunked_topk(query_emb, corpus_emb, top_k)
    return {qid: {doc_ids[i]: s for i, s in zip(row_indices.tolist(), row_scores.tolist())}
            for qid, row_scores, row_indices in zip(query_ids, scores, indices)}


def in_group_metrics(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_index: dict[str, int],
                     doc_index: dict[str, int], dataset: RetrievalSet) -> dict[str, float]:
    """The rank of each query's best positive among its own negatives (cheap, no corpus search).

    ingroup_accuracy: share of groups whose best positive beats every negative; ingroup_mrr: mean of
    1 / (1 + number of negatives scoring above the best positive).
    """
    if not dataset.groups:
        return {}
    reciprocal_ranks = []
    for qid, negatives in dataset.groups:
        query = query_emb[query_index[qid]]
        positive_rows = [doc_index[d] for d, rel in dataset.qrels[qid].items() if rel > 0]
        best_positive = (corpus_emb[positive_rows] @ query).max()
        above = int(((corpus_emb[[doc_index[d] for d in negatives]] @ query) > best_positive).sum())
        reciprocal_ranks.append(1.0 / (1 + above))
    return in_group_summary(reciprocal_ranks)


def in_group_summary(reciprocal_ranks: list[float]) -> dict[str, float]:
    """ingroup_accuracy and ingroup_mrr from each group's 1 / (1 + negatives scoring above its best positive)."""
    return {"ingroup_accuracy": sum(r == 1.0 for r in reciprocal_ranks) / len(reciprocal_ranks),
            "ingroup_mrr": sum(reciprocal_ranks) / len(reciprocal_ranks)}


def ranking_similarity(similarity: str) -> str:
    """The similarity documents are ranked by: ``similarity`` when supported, else cosine (with a warning)."""
    if similarity not in SIMILARITIES:
        logger.warning("Similarity %r is not supported by the retrieval evaluation; ranking by cosine instead "
                       "(the same order as euclidean distance for normalised embeddings).", similarity)
        return "cosine"
    return similarity


def in_similarity_space(embeddings: torch.Tensor, similarity: str) -> torch.Tensor:
    """Embeddings whose dot products are the ``similarity`` scores: unit rows for cosine, unchanged for dot.

    Rows that are already unit vectors (normalising models) are left untouched, bit for bit. Other
    similarities (euclidean, manhattan) are ranked by cosine, with a warning.
    """
    if ranking_similarity(similarity) == "dot":
        return embeddings
    unit = ((embeddings.norm(dim=-1) - 1).abs() < 1e-5).unsqueeze(-1)  # (N, 1)
    return torch.where(unit, embeddings, F.normalize(embeddings, dim=-1))


def evaluate_retrieval(encode_queries: Callable[[list[str]], torch.Tensor],
                       encode_documents: Callable[[list[str]], torch.Tensor],
                       dataset: RetrievalSet, top_k: int = 100, similarity: str = "cosine",
                       truncate_dims: tuple[int, ...] = ()) -> dict[str, float]:
    """Encode queries and corpus with the given functions ((N, D) tensors), search exactly by ``similarity``, and score.

    Returns METRIC_NAMES plus, when the set has groups, the in-group metrics; for each of ``truncate_dims``
    the same metrics of the embeddings cut to that size (``ndcg@10_dim128``...; Matryoshka), from the same encoding.
    """
    query_ids, doc_ids = list(dataset.queries), list(dataset.corpus)
    query_emb = encode_queries([dataset.queries[qid] for qid in query_ids]).float()
    corpus_emb = encode_documents([dataset.corpus[did] for did in doc_ids]).float()
    metrics = score_embeddings(query_emb, corpus_emb, query_ids, doc_ids, dataset, top_k, similarity)
    for dim in truncate_dims:
        truncated = score_embeddings(query_emb[:, :dim], corpus_emb[:, :dim], query_ids, doc_ids, dataset, top_k,
                                     similarity)
        metrics.update({f"{name}_dim{dim}": value for name, value in truncated.items()})
    return metrics


def score_embeddings(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
                     dataset: RetrievalSet, top_k: int = 100, similarity: str = "cosine") -> dict[str, float]:
    """Metrics of ranking the corpus by ``similarity``. Shapes: query_emb (Q, D), corpus_emb (N, D), rows as the ids."""
    query_emb = in_similarity_space(query_emb, similarity)
    corpus_emb = in_similarity_space(corpus_emb, similarity)
    metrics = compute_metrics(search(query_emb, corpus_emb, query_ids, doc_ids, top_k), dataset.qrels)
    metrics.update(in_group_metrics(query_emb, corpus_emb, {q: i for i, q in enumerate(query_ids)},
                                    {d: i for i, d in enumerate(doc_ids)}, dataset))
    return metrics


class RetrievalEvaluator:
    """Retrieval metrics of the model being trained on a fixed :class:`RetrievalSet` (sentence-transformers' ``evaluator=``).

    Texts are tokenized as in training (``query``/``document`` sides, ``finetune.text``), encoded
    sharded over the processes, and ranked by the model's similarity (cosine).
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
            def encode(texts: list[str]) -> torch.Tensor:
                with autocast():
                    return model.encode(texts, side, batch_size=self.batch_size)
            return lambda texts: encode_sharded(encode, texts, device)

        return evaluate_retrieval(encoder(self.query), encoder(self.document), self.dataset, self.top_k,
                                  similarity=model.similarity, truncate_dims=self.truncate_dims)


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


def load_sentence_transformer(model_name_or_path: str, truncate_dim: int | None = None, device: str | None = None):
    """``SentenceTransformer(model_name_or_path)`` on ``device`` (default: cuda when available); a raw decoder LLM
    folder or id (no SentenceTransformer files) gets what training gives it (``finetune.decoders``: EOS appended,
    left padding, last-token pooling, normalised) instead of sentence-transformers' default mean pooling."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    from finetune.decoders import is_decoder, prepare_decoder_tokenizer
    from finetune.st_layout import read_sentence_transformer_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if read_sentence_transformer_config(model_name_or_path).pooling is None:
        try:
            decoder = is_decoder(AutoConfig.from_pretrained(model_name_or_path))
        except (OSError, ValueError):
            decoder = False
        if decoder:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

            transformer = Transformer(model_name_or_path)
            prepare_decoder_tokenizer(transformer.tokenizer)
            pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
            return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device,
                                       truncate_dim=truncate_dim)
    return SentenceTransformer(model_name_or_path, device=device, truncate_dim=truncate_dim)


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


def evaluate_model(model_name_or_path: str, dataset: RetrievalSet, *, batch_size: int, max_seq_length: int | None,
                   truncate_dim: int | None = None, shard_dir: str | None = None, shard_size: int = 50_000,
                   query_block_size: int = 1024, keep_shards: bool = False) -> dict:
    """Retrieval metrics of any SentenceTransformer-loadable model, with its saved ``query``/``document`` prompts
    and its declared similarity; adds ``seconds``. ``truncate_dim``: evaluate the embeddings cut to that size.

    The corpus is encoded into fp16 shards of ``shard_size`` documents in ``shard_dir`` (default: a temporary
    folder) and the queries searched over them in blocks (``finetune.sharded_search``); the folder is removed
    afterwards unless ``keep_shards``. Under ``accelerate launch`` every process calls this with the same
    ``shard_dir`` and shares the work; the metrics come back on the main process, ``{}`` on the others.
    """
    state = process_state()
    if shard_dir is None:
        if state.num_processes > 1:
            raise ValueError("Several processes need a shard_dir they all see.")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="finetune-evaluate-") as folder:
            return evaluate_model(model_name_or_path, dataset, batch_size=batch_size, max_seq_length=max_seq_length,
                                  truncate_dim=truncate_dim, shard_dir=folder, shard_size=shard_size,
                                  query_block_size=query_block_size)
    start = time.perf_counter()
    model = load_sentence_transformer(model_name_or_path, truncate_dim, device=str(state.device))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    similarity = ranking_similarity(getattr(model.similarity_fn_name, "value", model.similarity_fn_name) or "cosine")

    def encoder(prompt_name: str) -> Callable[[list[str]], torch.Tensor]:
        prompt = prompt_name if prompt_name in model.prompts else None

        def encode(texts: list[str]) -> torch.Tensor:  # one batch: (b, D) in the similarity space
            emb = model.encode(texts, prompt_name=prompt, batch_size=len(texts), convert_to_tensor=True,
                               show_progress_bar=False)
            return in_similarity_space(emb.float().cpu(), similarity)
        return encode

    options = ShardOptions(folder=shard_dir, shard_size=shard_size, query_block_size=query_block_size,
                           batch_size=batch_size)
    identity = [path_identity(model_name_or_path), model.max_seq_length, truncate_dim, similarity]
    query_ids, doc_ids = list(dataset.queries), list(dataset.corpus)
    group_rows = in_group_rows(dataset, {doc: row for row, doc in enumerate(doc_ids)})
    shards = encode_corpus(encoder("document"), [dataset.corpus[d] for d in doc_ids], options, identity + ["document"],
                           state)
    blocks = search_queries(encoder("query"), [dataset.queries[q] for q in query_ids], shards, 100, options,
                            identity + ["query"], score_rows=[group_rows.get(qid, []) for qid in query_ids],
                            device=state.device)
    if not state.is_main_process:
        return {}
    run: Run = {}
    row_scores: dict[str, np.ndarray] = {}
    for block in read_blocks(blocks, options.query_block_size):
        for offset, (scores, indices) in enumerate(zip(block.scores.tolist(), block.indices.tolist())):
            qid = query_ids[block.start + offset]
            run[qid] = {doc_ids[i]: s for i, s in zip(indices, scores)}
            if qid in group_rows:
                row_scores[qid] = block.row_scores[offset]
    metrics = compute_metrics(run, dataset.qrels)
    metrics.update(in_group_metrics_from_rows(dataset, row_scores))
    metrics["seconds"] = time.perf_counter() - start
    if not keep_shards:
        remove_parts(options)
    return metrics


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


def read_corpus_file(path: str) -> list[str]:
    """Extra corpus texts: JSON Lines with a "text" (and optional "title") field, or plain text, one per line."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                record = json.loads(line)
                line = f"{record.get('title', '')} {record['text']}".strip()
            texts.append(line)
    return texts


def load_retrieval_set(paths: list[str], split: str = "test", extra_corpus: list[str] | None = None) -> RetrievalSet:
    """A BEIR folder (one path that is a directory) or seed-format files/globs, plus extra corpus files."""
    from finetune.schema import read_records

    if len(paths) == 1 and os.path.isdir(paths[0]):
        dataset = load_beir_folder(paths[0], split)
    else:
        dataset = retrieval_set_from_records(read_records(paths))
    return with_extra_corpus(dataset, extra_corpus)


def with_extra_corpus(dataset: RetrievalSet, extra_corpus: list[str] | None) -> RetrievalSet:
    """``dataset`` with the documents of the extra corpus files (see ``read_corpus_file``) added."""
    for path in extra_corpus or []:
        dataset.add_corpus_texts(read_corpus_file(path))
    return dataset

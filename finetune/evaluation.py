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

from finetune.embedding_shards import InMemoryEmbeddings, encode_in_memory
from finetune.metrics.retrieval.retrieval import METRIC_NAMES, mean_metrics, query_metrics
from finetune.sharded_search import (SearchedBlock, ShardOptions, encode_corpus, read_blocks, remove_parts,
                                     search_block, search_queries)
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
    """Exact top-k search by dot product (the stack's ``search_block``) -> run. Shapes: query_emb (Q, D), corpus_emb
    (N, D)."""
    options = ShardOptions(folder=None)
    block = search_block(query_emb, InMemoryEmbeddings(corpus_emb, options.shard_size), top_k, options)
    return {qid: {doc_ids[i]: s for i, s in zip(row_indices, row_scores)}
            for qid, row_scores, row_indices in zip(query_ids, block.scores.tolist(), block.indices.tolist())}


def in_group_metrics(query_emb: torch.Tensor, corpus_emb: torch.Tensor, query_index: dict[str, int],
                     doc_index: dict[str, int], dataset: RetrievalSet) -> dict[str, float]:
    """The rank of each query's best positive among its own negatives (cheap, no corpus search).

    ingroup_accuracy: share of groups whose best positive beats every negative; ingroup_mrr: mean of
    1 / (1 + number of negatives scoring above the best positive).
    """
    rows = in_group_rows(dataset, doc_index)
    return in_group_metrics_from_rows(dataset, {qid: (corpus_emb[rows_of] @ query_emb[query_index[qid]]).numpy()
                                                for qid, rows_of in rows.items()})


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


def similarity_transform(similarity: str, dim: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What is compared: embeddings cut to their first ``dim`` values (Matryoshka; None: whole), then put in the
    ``similarity``'s space (``in_similarity_space``). Shapes: (n, D) -> (n, dim)."""
    def transform(embeddings: torch.Tensor) -> torch.Tensor:
        return in_similarity_space(embeddings if dim is None else embeddings[:, :dim], similarity)
    return transform


def metrics_from_blocks(dataset: RetrievalSet, query_ids: list[str], doc_ids: list[str],
                        blocks: Iterable[SearchedBlock]) -> dict[str, float]:
    """METRIC_NAMES and the in-group metrics from the searched blocks of the queries (top-k rows and the scores of
    the rows of ``in_group_rows``): the last step of both the in-memory and the on-disk evaluation."""
    group_rows = in_group_rows(dataset, {doc: row for row, doc in enumerate(doc_ids)})
    run: Run = {}
    row_scores: dict[str, np.ndarray] = {}
    for block in blocks:
        for offset, (scores, indices) in enumerate(zip(block.scores.tolist(), block.indices.tolist())):
            qid = query_ids[block.start + offset]
            run[qid] = {doc_ids[i]: s for i, s in zip(indices, scores)}
            if qid in group_rows:
                row_scores[qid] = block.row_scores[offset]
    metrics = compute_metrics(run, dataset.qrels)
    metrics.update(in_group_metrics_from_rows(dataset, row_scores))
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

    Texts are tokenized as in training (``query``/``document`` sides, ``finetune.text``), encoded in the batches
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


@dataclass
class Embedder:
    """A model ready for retrieval: ``encode(texts, side)`` -> (n, D) fp32 on CPU, for side "query" or "document"."""

    encode: Callable[[list[str], str], torch.Tensor]
    similarity: str  # the similarity the model declares: cosine or dot
    batch_size: int  # texts per forward pass
    identity: list  # JSON: changes when the model or how it encodes changes (for resuming shards)


def _training_run(model_name_or_path: str) -> dict:
    """The ``training_run.json`` a training of ours left in the model folder, or {}."""
    path = os.path.join(model_name_or_path, "training_run.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def load_embedder(model_name_or_path: str, *, device: torch.device, max_seq_length: int | None = None,
                  batch_size: int | None = None) -> Embedder:
    """The one loader of the retrieval tools: ``EmbeddingModel`` (padding-free, the training code) for every model it
    represents (a HF encoder or decoder with Transformer + Pooling (+ Normalize) modules: ours and most Hub models),
    ``SentenceTransformer`` itself for the rest (other modules, an adapter-only folder).

    Texts get the model's saved ``query``/``document`` prompts; lengths: ``max_seq_length`` when given, else the
    query and passage lengths the model was trained with (its ``training_run.json``), else its max_seq_length.
    ``batch_size``: default the training's evaluation batch size (so the metrics equal the training's final
    evaluation to float precision), else 64.
    """
    from finetune.modeling import EmbeddingModel, ModelLoadError
    from finetune.st_layout import read_sentence_transformer_config

    run = _training_run(model_name_or_path)
    if batch_size is None and run:
        from finetune.arguments import EmbeddingTrainingArguments

        batch_size = run.get("per_device_eval_batch_size") or run.get("non_default_options", {}).get(
            "per_device_eval_batch_size") or EmbeddingTrainingArguments.__dataclass_fields__[
            "per_device_eval_batch_size"].default
    batch_size = batch_size or 64
    st = read_sentence_transformer_config(model_name_or_path)
    if not st.unsupported_modules:
        try:
            model = EmbeddingModel.from_pretrained(model_name_or_path, padding_free=True).to(device)
        except ModelLoadError as error:
            logger.info("Loading %s with sentence-transformers (%s).", model_name_or_path, error)
        else:
            limit = min(model.tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512) or 512)
            lengths = {"query": max_seq_length or run.get("query_max_length") or st.max_seq_length or limit,
                       "document": max_seq_length or run.get("passage_max_length") or st.max_seq_length or limit}
            sides = {name: TextSide(st.prompts.get(name, ""), lengths[name]) for name in lengths}
            logger.info("%s: query %s, document %s, batches of %d.", model_name_or_path, sides["query"],
                        sides["document"], batch_size)
            return Embedder(lambda texts, side: model.encode(texts, sides[side], batch_size=len(texts)),
                            model.similarity if st.similarity is None else ranking_similarity(st.similarity),
                            batch_size, [path_identity(model_name_or_path), "ours",
                                         {name: [side.prompt, side.max_length] for name, side in sides.items()}])
    model = load_sentence_transformer(model_name_or_path, device=str(device))
    if max_seq_length:
        model.max_seq_length = max_seq_length

    def encode(texts: list[str], side: str) -> torch.Tensor:
        emb = model.encode(texts, prompt_name=side if side in model.prompts else None, batch_size=len(texts),
                           convert_to_tensor=True, show_progress_bar=False)
        return emb.float().cpu()
    similarity = ranking_similarity(getattr(model.similarity_fn_name, "value", model.similarity_fn_name) or "cosine")
    return Embedder(encode, similarity, batch_size,
                    [path_identity(model_name_or_path), "sentence-transformers", model.max_seq_length])


def evaluate_model(model_name_or_path: str, dataset: RetrievalSet, *, batch_size: int | None = None,
                   max_seq_length: int | None = None, truncate_dim: int | None = None, shard_dir: str | None = None,
                   shard_size: int = 50_000, query_block_size: int = 1024, keep_shards: bool = False,
                   shard_dtype: str = "float32") -> dict:
    """Retrieval metrics of any SentenceTransformer-loadable model (``load_embedder``), with its saved
    ``query``/``document`` prompts and its declared similarity; adds ``seconds``. ``truncate_dim``: evaluate the
    embeddings cut to that size.

    The corpus is encoded into ``shard_dtype`` shards of ``shard_size`` documents in ``shard_dir`` (default: a
    temporary folder) and the queries searched over them in blocks (``finetune.sharded_search``); the folder is
    removed afterwards unless ``keep_shards``. The batches, chunks and arithmetic are ``evaluate_retrieval``'s: with
    fp32 shards the metrics equal the in-memory evaluation during training. Under ``accelerate launch`` every
    process calls this with the same ``shard_dir`` and shares the work; the metrics come back on the main process,
    ``{}`` on the others.
    """
    state = process_state()
    if shard_dir is None:
        if state.num_processes > 1:
            raise ValueError("Several processes need a shard_dir they all see.")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="finetune-evaluate-") as folder:
            return evaluate_model(model_name_or_path, dataset, batch_size=batch_size, max_seq_length=max_seq_length,
                                  truncate_dim=truncate_dim, shard_dir=folder, shard_size=shard_size,
                                  query_block_size=query_block_size, shard_dtype=shard_dtype)
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
                            shards, 100, options, identity + ["query"],
                            score_rows=[group_rows.get(qid, []) for qid in query_ids], device=state.device,
                            transform=similarity_transform(embedder.similarity, truncate_dim))
    if not state.is_main_process:
        return {}
    metrics = metrics_from_blocks(dataset, query_ids, doc_ids, read_blocks(blocks, options.query_block_size))
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

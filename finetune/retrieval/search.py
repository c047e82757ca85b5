"""Exact search of many queries over a corpus larger than memory, shared over processes and resumable.

    options = ShardOptions(folder="out.parts")
    shards = encode_corpus(encode_documents, doc_texts, options, identity, state)      # 1. fp16 shards on disk
    blocks = search_queries(encode_queries, query_texts, shards, k, options, identity)  # 2. top-k per query block
    for block in read_blocks(blocks, options.query_block_size): ...                     # 3. one process reads them

1. The corpus is encoded into fixed-size fp16 shards (``finetune.retrieval.embeddings``).
2. Queries are cut into blocks of ``query_block_size``; each block's process encodes it (fp32),
   searches it over every shard (``finetune.retrieval.topk``: shards read one at a time, memory-mapped) and
   writes its top-k, plus the scores of any corpus rows asked for per query (``score_rows``: a
   query's positives, say), into one part file.
3. Any process reads the parts in query order.

The results do not depend on the number of processes: shard, batch, block and chunk boundaries are
fixed by the options alone, and equal scores are ordered by corpus row. Every process must call
1 and 2 together; a rerun with the same inputs and options redoes only the missing shards and blocks.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.training.checkpointing import atomic_write
from finetune.retrieval.embeddings import DTYPES, EmbeddingShards, Encode, encode_in_batches, encode_shards
from finetune.retrieval.topk import topk_over_chunks
from finetune.retrieval.work_parts import PartsFolder, fingerprint, texts_digest

logger = logging.getLogger("finetune.retrieval.search")

QUERY_CHUNK = 1024  # queries scored against a corpus chunk at once


@dataclass(frozen=True)
class ShardOptions:
    """Where the parts go and how the work is cut; every field but ``folder`` is part of the results' fingerprint."""

    folder: str | None  # parts folder: corpus/ (shards) and queries/ (search results) go inside; None: in memory
    shard_size: int = 50_000  # corpus rows per shard file
    query_block_size: int = 1024  # queries encoded and searched as one unit of work
    batch_size: int = 64  # texts per forward pass
    corpus_chunk: int = 16384  # corpus rows scored at a time
    use_faiss: bool = False  # faiss exact index per chunk (GPU when faiss has it) instead of torch matmuls
    dtype: str = "float16"  # how corpus embeddings are stored (a name of embeddings.DTYPES)

    def __post_init__(self):
        for name in ("shard_size", "query_block_size", "batch_size", "corpus_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")

    def settings(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "folder"}


@dataclass
class SearchedBlock:
    """One block of queries: rows [start, start + q) of the queries."""

    start: int
    scores: np.ndarray  # (q, k) fp32, best first
    indices: np.ndarray  # (q, k) int64 corpus rows; equal scores by row ascending
    row_scores: list[np.ndarray]  # per query, fp32 scores of the rows asked for in score_rows, in that order


def encode_corpus(encode: Encode, texts: list[str], options: ShardOptions, identity, state) -> EmbeddingShards:
    """Shards of ``texts`` in ``options.folder``/corpus; ``identity`` (JSON) names the encoder, for resuming."""
    key = fingerprint("corpus", identity, options.shard_size, options.batch_size, options.dtype, texts_digest(texts))
    parts = PartsFolder(os.path.join(options.folder, "corpus"), key, state, name="shard", ext=".npy")
    return encode_shards(encode, texts, parts, shard_size=options.shard_size, batch_size=options.batch_size,
                         dtype=options.dtype)


Transform = Callable[[torch.Tensor], torch.Tensor]  # (n, D) fp32 -> (n, D') fp32: the vectors that are compared


def search_block(query_emb: torch.Tensor, corpus, k: int, options: ShardOptions, *,
                 score_rows: Sequence[list[int]] | None = None, transform: Transform | None = None,
                 start: int = 0) -> SearchedBlock:
    """Top ``k`` of one block of queries over a corpus (``EmbeddingShards`` or ``InMemoryEmbeddings``), plus the
    scores of the rows asked for per query (``score_rows``). Shapes: query_emb (q, D) fp32, on the device to score on.

    ``transform`` is applied to the queries and to every corpus chunk and row read (in fp32) before scoring (a cut to
    a Matryoshka size, normalisation for cosine); the stored vectors stay as they are.
    """
    transform = transform or (lambda emb: emb)
    query_emb = transform(query_emb.float())
    chunks = ((first, transform(chunk.to(query_emb.device).float())) for first, chunk in corpus.chunks(options.corpus_chunk))
    scores, indices = topk_over_chunks(query_emb, chunks, k, query_chunk=QUERY_CHUNK, use_faiss=options.use_faiss)
    asked = [[]] * len(query_emb) if score_rows is None else list(score_rows)
    rows = transform(corpus.rows([row for rows_of in asked for row in rows_of]).float())  # (R, D), one read per shard
    ends, query_cpu = np.cumsum([len(rows_of) for rows_of in asked]), query_emb.cpu()
    row_scores = [(rows[end - len(rows_of):end] @ query_cpu[q]).numpy() for q, (rows_of, end) in
                  enumerate(zip(asked, ends))]
    return SearchedBlock(start, scores.cpu().numpy(), indices.cpu().numpy(), row_scores)


def search_queries(encode: Encode, texts: list[str], shards: EmbeddingShards, k: int, options: ShardOptions,
                   identity, *, score_rows: Sequence[list[int]] | None = None,
                   device: torch.device | None = None, transform: Transform | None = None) -> list[str]:
    """Search every query block still missing (this process's share); returns the paths of all blocks, in order.

    ``identity`` names the query encoder; ``score_rows[i]``: corpus rows whose scores with query i to keep
    too. ``device``: where queries and corpus chunks are scored (default CPU); ``transform``: see :func:`search_block`
    (part of ``identity`` when it changes the results). Every process must call this.
    """
    state = shards.parts.state
    key = fingerprint("queries", shards.parts.fingerprint, identity, k, options.settings(), texts_digest(texts),
                      None if score_rows is None else texts_digest(" ".join(map(str, rows)) for rows in score_rows))
    parts = PartsFolder(os.path.join(options.folder, "queries"), key, state, name="block", ext=".npz")
    size = options.query_block_size
    count = -(-len(texts) // size)
    todo, done = parts.assign(count)
    logger.info("Process %d of %d: %d queries in %d blocks of %d, %d already searched; searching %d blocks here "
                "over %d shards.", state.process_index, state.num_processes, len(texts), count, size, done, len(todo),
                shards.count)
    for index in tqdm(todo, desc="Searching", unit=" blocks", disable=not state.is_main_process):
        start = index * size
        query_emb = encode_in_batches(encode, texts[start:start + size], options.batch_size).to(device or "cpu")
        block = search_block(query_emb, shards, k, options, transform=transform,
                             score_rows=None if score_rows is None else score_rows[start:start + size])
        counts = [len(scores) for scores in block.row_scores]
        with atomic_write(parts.part(index), binary=True) as handle:
            np.savez(handle, scores=block.scores, indices=block.indices,
                     row_scores=np.concatenate(block.row_scores) if block.row_scores else np.empty(0, np.float32),
                     row_counts=np.array(counts, dtype=np.int64))
    state.wait_for_everyone()
    paths = [parts.part(index) for index in range(count)]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise RuntimeError(f"Search results {missing[:3]} are missing after searching (another process failed?).")
    return paths


def read_blocks(paths: list[str], query_block_size: int) -> Iterator[SearchedBlock]:
    """The blocks written by ``search_queries``, in query order."""
    for index, path in enumerate(paths):
        with np.load(path) as part:
            row_scores = np.split(part["row_scores"], np.cumsum(part["row_counts"])[:-1])
            yield SearchedBlock(index * query_block_size, part["scores"], part["indices"], row_scores)


def remove_parts(options: ShardOptions) -> None:
    """Delete the corpus/ and queries/ parts, and the folder when nothing else is left in it."""
    for name in ("corpus", "queries"):
        shutil.rmtree(os.path.join(options.folder, name), ignore_errors=True)
    if os.path.isdir(options.folder) and not os.listdir(options.folder):
        os.rmdir(options.folder)


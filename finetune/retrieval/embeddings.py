"""Corpus embeddings in shards of a fixed number of rows: on disk (fp16 or fp32 ``.npy`` files, encoded by any
process, read memory-mapped: :class:`EmbeddingShards`) or in memory (:class:`InMemoryEmbeddings`), one layout.

Shard i holds rows [i x shard_size, (i + 1) x shard_size) of the corpus as an (n, D) array.
Its bytes depend only on its texts, the encoder and ``batch_size``, never on which or how many
processes encode: inside a shard the texts are encoded longest first (a stable sort, so little
padding) in batches of ``batch_size`` (:func:`encode_in_batches`). A shard is written atomically, so
a rerun after a kill encodes only the missing ones (``finetune.retrieval.work_parts``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finetune.training.checkpointing import atomic_write
from finetune.retrieval.work_parts import PartsFolder

logger = logging.getLogger("finetune.retrieval.embeddings")

Encode = Callable[[list[str]], torch.Tensor]  # texts (one batch) -> (n, D) embeddings
DTYPES = {"float32": torch.float32, "float16": torch.float16}  # how stored embeddings are kept


def length_sorted_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of ``texts`` cut into batches of ``batch_size``, longest text first (a stable sort: equal lengths keep
    their order). The batches depend on ``texts`` and ``batch_size`` only."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def unit_batches(texts: list[str], unit_size: int, batch_size: int) -> list[list[int]]:
    """The batches of every unit of ``unit_size`` texts (a corpus shard, a query block), as indices into ``texts``:
    the batches :func:`encode_in_batches` runs on each unit, so in-memory and on-disk encodings are the same."""
    return [[start + i for i in batch] for start in range(0, len(texts), unit_size)
            for batch in length_sorted_batches(texts[start:start + unit_size], batch_size)]


def encode_in_batches(encode: Encode, texts: list[str], batch_size: int, *, progress=None) -> torch.Tensor:
    """(N, D) fp32 embeddings of ``texts`` in their order, encoded longest first in batches of ``batch_size``.

    The batches depend on ``texts`` and ``batch_size`` only. ``progress``: a tqdm bar to advance.
    """
    rows = None
    for batch in length_sorted_batches(texts, batch_size):
        emb = encode([texts[i] for i in batch]).float().cpu()  # (b, D)
        if rows is None:
            rows = torch.empty((len(texts), emb.shape[1]), dtype=torch.float32)
        rows[batch] = emb
        if progress is not None:
            progress.update(len(batch))
    return rows if rows is not None else torch.empty((0, 0))


def encode_in_memory(encode: Encode, texts: list[str], *, unit_size: int, batch_size: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """(N, D) fp32 embeddings of ``texts``, in their order, on CPU: the batches of the shards of ``unit_size`` rows
    on disk (:func:`unit_batches`), so the same vectors bit for bit, however many processes share the work.

    Under several processes batch j goes to process j % P; every process runs the same number of forward passes
    (repeating the first batch where it has fewer: ZeRO-3 gathers weights in every forward), and the rows are
    gathered on ``device`` (a CUDA device under NCCL). Every process must call this together.
    """
    import torch.distributed as dist

    from finetune.training.distributed import world

    batches = unit_batches(texts, unit_size, batch_size)
    if not batches:
        return torch.empty((0, 0))
    rank, size = world()
    if size == 1:
        per_batch = [encode([texts[i] for i in batch]).float().cpu() for batch in batches]
    else:
        mine = batches[rank::size]
        runs = mine + batches[:1] * (-(-len(batches) // size) - len(mine))
        local = torch.stack([F.pad(encode([texts[i] for i in batch]).float(), (0, 0, 0, batch_size - len(batch)))
                             for batch in runs]).to(device or "cpu")  # (rounds, batch_size, D)
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local)
        per_batch = [gathered[j % size][j // size][:len(batch)].cpu() for j, batch in enumerate(batches)]
    rows = torch.empty((len(texts), per_batch[0].shape[1]), dtype=torch.float32)
    for batch, emb in zip(batches, per_batch):
        rows[batch] = emb
    return rows


class InMemoryEmbeddings:
    """Embeddings held in memory in the layout of :class:`EmbeddingShards`: ``num_rows`` rows cut into shards of
    ``shard_size`` (same ``chunks`` and ``rows``), so a search reads them in the same pieces as from disk."""

    def __init__(self, embeddings: torch.Tensor, shard_size: int):
        self.embeddings, self.shard_size = embeddings, shard_size  # (N, D)
        self.num_rows = embeddings.shape[0]
        self.count = math.ceil(self.num_rows / shard_size)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, (c, D) tensor) over the whole corpus, ``chunk_rows`` at a time, never across a shard."""
        for shard_start in range(0, self.num_rows, self.shard_size):
            shard_end = min(shard_start + self.shard_size, self.num_rows)
            for start in range(shard_start, shard_end, chunk_rows):
                yield start, self.embeddings[start:min(start + chunk_rows, shard_end)]

    def rows(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), D) rows, in the order asked."""
        return self.embeddings[torch.as_tensor(indices, dtype=torch.long)] if len(indices) else \
            self.embeddings[:0]


class EmbeddingShards:
    """The shards of one corpus: ``num_rows`` rows of dimension ``dim``, ``shard_size`` rows per file (the last fewer)."""

    def __init__(self, parts: PartsFolder, num_rows: int, shard_size: int):
        self.parts, self.num_rows, self.shard_size = parts, num_rows, shard_size
        self.count = math.ceil(num_rows / shard_size)

    @property
    def dim(self) -> int:
        return self.open(0).shape[1]

    def open(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memory map, (n, D) float16 or float32."""
        return np.load(self.parts.part(index), mmap_mode="r")

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, (c, D) tensor as stored) over the whole corpus, ``chunk_rows`` at a time, never across a shard.

        One shard is mapped at a time and unmapped before the next: resident memory stays one shard
        and one chunk, whatever the corpus size.
        """
        for index in range(self.count):
            shard = self.open(index)
            for start in range(0, len(shard), chunk_rows):
                yield index * self.shard_size + start, torch.from_numpy(np.array(shard[start:start + chunk_rows]))
            del shard

    def rows(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), D) rows of the corpus as stored, in the order asked; each shard involved is mapped once."""
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for index in np.unique(indices // self.shard_size):
            where = np.nonzero(indices // self.shard_size == index)[0]
            shard = self.open(int(index))
            if out is None:
                out = np.empty((len(indices), shard.shape[1]), dtype=shard.dtype)
            out[where] = shard[indices[where] - index * self.shard_size]
            del shard
        return torch.from_numpy(out) if out is not None else torch.empty((0, self.dim), dtype=torch.float16)


def encode_shards(encode: Encode, texts: list[str], parts: PartsFolder, *, shard_size: int, batch_size: int,
                  desc: str = "Encoding corpus", dtype: str = "float16") -> EmbeddingShards:
    """Encode the shards of ``texts`` still missing in ``parts``, this process's share, stored as ``dtype`` (a name
    of ``DTYPES``); returns all shards once every process is done. Every process must call this together. Progress
    bar on the main process only."""
    state = parts.state
    shards = EmbeddingShards(parts, len(texts), shard_size)
    todo, done = parts.assign(shards.count)
    logger.info("Process %d of %d: %d texts in %d shards of %d, %d already encoded; encoding %d shards here.",
                state.process_index, state.num_processes, len(texts), shards.count, shard_size, done, len(todo))
    total = sum(len(texts[i * shard_size:(i + 1) * shard_size]) for i in todo)
    with tqdm(total=total, desc=desc, unit=" texts", disable=not state.is_main_process) as bar:
        for index in todo:
            emb = encode_in_batches(encode, texts[index * shard_size:(index + 1) * shard_size], batch_size, progress=bar)
            with atomic_write(parts.part(index), binary=True) as handle:
                np.save(handle, emb.to(DTYPES[dtype]).numpy())
    state.wait_for_everyone()
    missing = [i for i in range(shards.count) if not os.path.isfile(parts.part(i))]
    if missing:
        raise RuntimeError(f"Shards {missing[:5]} of {parts.path} are missing after encoding (another process failed?).")
    return shards

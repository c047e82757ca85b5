"""Corpus embeddings on disk: fp16 ``.npy`` shards of a fixed number of rows, encoded by any process, read memory-mapped.

Shard i holds rows [i x shard_size, (i + 1) x shard_size) of the corpus as an (n, D) float16 array.
Its bytes depend only on its texts, the encoder and ``batch_size``, never on which or how many
processes encode: inside a shard the texts are encoded longest first (a stable sort, so little
padding) in batches of ``batch_size`` (:func:`encode_in_batches`). A shard is written atomically, so
a rerun after a kill encodes only the missing ones (``finetune.work_blocks``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune.checkpointing import atomic_write
from finetune.work_blocks import PartsFolder

logger = logging.getLogger("finetune.embedding_shards")

Encode = Callable[[list[str]], torch.Tensor]  # texts (one batch) -> (n, D) embeddings


def encode_in_batches(encode: Encode, texts: list[str], batch_size: int, *, progress=None) -> torch.Tensor:
    """(N, D) fp32 embeddings of ``texts`` in their order, encoded longest first in batches of ``batch_size``.

    The batches depend on ``texts`` and ``batch_size`` only. ``progress``: a tqdm bar to advance.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # stable: equal lengths keep their order
    rows = None
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        emb = encode([texts[i] for i in batch]).float().cpu()  # (b, D)
        if rows is None:
            rows = torch.empty((len(texts), emb.shape[1]), dtype=torch.float32)
        rows[batch] = emb
        if progress is not None:
            progress.update(len(batch))
    return rows if rows is not None else torch.empty((0, 0))


class EmbeddingShards:
    """The shards of one corpus: ``num_rows`` rows of dimension ``dim``, ``shard_size`` rows per file (the last fewer)."""

    def __init__(self, parts: PartsFolder, num_rows: int, shard_size: int):
        self.parts, self.num_rows, self.shard_size = parts, num_rows, shard_size
        self.count = math.ceil(num_rows / shard_size)

    @property
    def dim(self) -> int:
        return self.open(0).shape[1]

    def open(self, index: int) -> np.ndarray:
        """Shard ``index`` as a read-only memory map, (n, D) float16."""
        return np.load(self.parts.part(index), mmap_mode="r")

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, (c, D) fp16 tensor) over the whole corpus, ``chunk_rows`` at a time, never across a shard.

        One shard is mapped at a time and unmapped before the next: resident memory stays one shard
        and one chunk, whatever the corpus size.
        """
        for index in range(self.count):
            shard = self.open(index)
            for start in range(0, len(shard), chunk_rows):
                yield index * self.shard_size + start, torch.from_numpy(np.array(shard[start:start + chunk_rows]))
            del shard

    def rows(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), D) fp16 rows of the corpus, in the order asked; each shard involved is mapped once."""
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for index in np.unique(indices // self.shard_size):
            where = np.nonzero(indices // self.shard_size == index)[0]
            shard = self.open(int(index))
            if out is None:
                out = np.empty((len(indices), shard.shape[1]), dtype=np.float16)
            out[where] = shard[indices[where] - index * self.shard_size]
            del shard
        return torch.from_numpy(out) if out is not None else torch.empty((0, self.dim), dtype=torch.float16)


def encode_shards(encode: Encode, texts: list[str], parts: PartsFolder, *, shard_size: int, batch_size: int,
                  desc: str = "Encoding corpus") -> EmbeddingShards:
    """Encode the shards of ``texts`` still missing in ``parts``, this process's share; returns all shards once every
    process is done. Every process must call this together. Progress bar on the main process only."""
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
                np.save(handle, emb.to(torch.float16).numpy())
    state.wait_for_everyone()
    missing = [i for i in range(shards.count) if not os.path.isfile(parts.part(i))]
    if missing:
        raise RuntimeError(f"Shards {missing[:5]} of {parts.path} are missing after encoding (another process failed?).")
    return shards

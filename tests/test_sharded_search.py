"""Sharded encoding and search (finetune.retrieval.embeddings, finetune.retrieval.search, finetune.retrieval.topk): exact tie order
whatever the chunking, shards and search results that do not depend on the number of processes (simulated here with
threads and a barrier; tests/test_data_prep_mine.py and tests/test_distributed_eval.py launch real processes)."""

import threading

import numpy as np
import pytest
import torch

from finetune.retrieval.embeddings import encode_shards
from finetune.retrieval.topk import chunked_topk
from finetune.retrieval.search import ShardOptions, encode_corpus, read_blocks, search_queries
from finetune.retrieval.work_parts import PartsFolder


class ThreadState:
    """What the tools use of accelerate's PartialState, for one of ``size`` threads sharing a barrier."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = rank, size, barrier
        self.is_main_process = self.is_local_main_process = rank == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        self.barrier.wait()


def as_processes(size: int, work):
    """``work(state)`` in ``size`` threads at once, like ``size`` processes; returns their results by rank."""
    barrier, results, errors = threading.Barrier(size, timeout=60), [None] * size, []

    def run(rank):
        try:
            results[rank] = work(ThreadState(rank, size, barrier))
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class RecordingEncoder:
    """Deterministic 6-d vectors of texts; like padding in a real model, each vector depends a little on its batch
    (its longest text), so other batch boundaries give other bytes."""

    def __init__(self):
        self.batches, self.lock = [], threading.Lock()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        with self.lock:
            self.batches.append(list(texts))
        longest = max(len(text) for text in texts)
        rows = [[len(text), sum(map(ord, text)) % 97, text.count("a"), text.count(" "), 1.0, 0.001 * longest]
                for text in texts]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


TEXTS = [("word " * (i % 7 + 1) + f"text {i} " + "a" * (i % 5)).strip() for i in range(23)]


def test_ties_are_ordered_by_row_whatever_the_chunking():
    generator = torch.Generator().manual_seed(0)
    corpus = torch.randint(-1, 2, (60, 4), generator=generator).float()  # small integers: many exactly equal scores
    queries = torch.randint(-1, 2, (9, 4), generator=generator).float()
    full = (queries @ corpus.T).tolist()
    expected = [sorted(range(60), key=lambda c: (-row[c], c))[:10] for row in full]
    for query_chunk, corpus_chunk in ((1, 1), (4, 7), (9, 13), (100, 100)):
        scores, indices = chunked_topk(queries, corpus, 10, query_chunk=query_chunk, corpus_chunk=corpus_chunk)
        assert indices.tolist() == expected, (query_chunk, corpus_chunk)
        assert scores.tolist() == [[row[c] for c in best] for row, best in zip(full, expected)]


def test_shards_and_batches_do_not_depend_on_the_process_count(tmp_path):
    def encode(folder, encoder):
        return lambda state: encode_shards(encoder, TEXTS, PartsFolder(str(folder), "key", state, name="shard", ext=".npy"),
                                           shard_size=5, batch_size=2)

    one, two = RecordingEncoder(), RecordingEncoder()
    shards = as_processes(1, encode(tmp_path / "one", one))[0]
    as_processes(2, encode(tmp_path / "two", two))
    names = sorted(path.name for path in (tmp_path / "one").glob("shard-*.npy"))
    assert names == [f"shard-{i:07d}.npy" for i in range(5)]  # 23 texts: 4 shards of 5, one of 3
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert sorted(map(tuple, one.batches)) == sorted(map(tuple, two.batches))
    for batch in one.batches:  # inside one shard, longest first, at most batch_size texts
        assert len(batch) <= 2 and len({TEXTS.index(text) // 5 for text in batch}) == 1
    rows = [21, 0, 7, 7, 12]
    expected = torch.cat([RecordingEncoder()(batch) for batch in one.batches])  # every text once, in batch order
    order = [TEXTS.index(text) for batch in one.batches for text in batch]
    assert torch.equal(shards.rows(rows), expected[[order.index(r) for r in rows]].half())
    assert shards.open(4).dtype == np.float16 and shards.open(4).shape == (3, 6)


def test_each_process_encodes_only_missing_shards(tmp_path):
    encoder = RecordingEncoder()
    parts = lambda state: PartsFolder(str(tmp_path), "key", state, name="shard", ext=".npy")  # noqa: E731
    as_processes(1, lambda state: encode_shards(encoder, TEXTS, parts(state), shard_size=5, batch_size=5))
    (tmp_path / "shard-0000001.npy").unlink()
    (tmp_path / "shard-0000003.npy").unlink()
    (tmp_path / ".shard-0000003.npy.x.tmp").write_bytes(b"half a shard")  # a killed writer's leftover
    encoder.batches.clear()
    as_processes(2, lambda state: encode_shards(encoder, TEXTS, parts(state), shard_size=5, batch_size=5))
    assert sorted(map(sorted, encoder.batches)) == sorted([sorted(TEXTS[5:10]), sorted(TEXTS[15:20])])
    assert not list(tmp_path.glob(".*.tmp"))
    as_processes(1, lambda state: encode_shards(encoder, TEXTS, PartsFolder(str(tmp_path), "other settings", state,
                                                                            name="shard", ext=".npy"),
                                                shard_size=5, batch_size=5))
    assert len(encoder.batches) == 2 + 5  # other settings: every shard again


@pytest.mark.parametrize("use_faiss", [False, True])
def test_search_over_shards_equals_the_in_memory_search_for_any_process_count(tmp_path, use_faiss):
    generator = torch.Generator().manual_seed(1)
    corpus = torch.nn.functional.normalize(torch.randn(70, 6, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(11, 6, generator=generator), dim=1)
    texts = [f"d{i}" for i in range(70)]
    vectors = dict(zip(texts, corpus))
    vectors.update({f"q{i}": query for i, query in enumerate(queries)})
    encode = lambda batch: torch.stack([vectors[text] for text in batch])  # noqa: E731
    score_rows = [[i, (5 * i) % 70] if i % 3 else [] for i in range(11)]

    def search(folder):
        options = ShardOptions(folder=str(folder), shard_size=16, query_block_size=4, batch_size=3, corpus_chunk=5,
                               use_faiss=use_faiss)

        def work(state):
            shards = encode_corpus(encode, texts, options, "doc encoder", state)
            return search_queries(encode, [f"q{i}" for i in range(11)], shards, 8, options, "query encoder",
                                  score_rows=score_rows)
        return options, work

    options, work = search(tmp_path / "one")
    blocks = list(read_blocks(as_processes(1, work)[0], options.query_block_size))
    options_two, work_two = search(tmp_path / "two")
    blocks_two = list(read_blocks(as_processes(2, work_two)[0], options_two.query_block_size))
    scores, indices = np.concatenate([b.scores for b in blocks]), np.concatenate([b.indices for b in blocks])
    expected_scores, expected_indices = chunked_topk(queries, corpus.half(), 8)
    assert indices.tolist() == expected_indices.tolist()
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=0, atol=1e-6)
    for a, b in zip(blocks, blocks_two):
        assert a.start == b.start and np.array_equal(a.scores, b.scores) and np.array_equal(a.indices, b.indices)
        assert all(np.array_equal(x, y) for x, y in zip(a.row_scores, b.row_scores))
    row_scores = [scores for block in blocks for scores in block.row_scores]
    for q, rows in enumerate(score_rows):
        np.testing.assert_allclose(row_scores[q], (corpus.half().float()[rows] @ queries[q]).numpy(), atol=1e-6)


def test_a_rerun_searches_only_the_missing_query_blocks(tmp_path):
    encoder = RecordingEncoder()
    options = ShardOptions(folder=str(tmp_path), shard_size=10, query_block_size=3, batch_size=4)
    queries = [f"query {i}" for i in range(8)]

    def work(state):
        shards = encode_corpus(encoder, TEXTS, options, "encoder", state)
        return search_queries(encoder, queries, shards, 4, options, "encoder")

    first = [block.indices for block in read_blocks(as_processes(1, work)[0], 3)]
    (tmp_path / "queries" / "block-0000001.npz").unlink()
    encoder.batches.clear()
    again = [block.indices for block in read_blocks(as_processes(2, work)[0], 3)]
    assert encoder.batches == [sorted(queries[3:6], key=len, reverse=True)]  # no shard, one query block
    assert all(np.array_equal(a, b) for a, b in zip(first, again))

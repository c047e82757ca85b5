"""Run by tests/test_global_negatives.py under 2 processes; ``reference_gradients`` and ``reference_objective`` are
its 1-process references.

    accelerate launch --multi_gpu --num_processes 2 tests/global_negatives_script.py MODEL OUT

Besides the plain ranking loss ('global' and 'local' backprop), each process runs two objectives the way the
trainer does (``finetune.objectives.base.batch_for_objective``, then the objective): 'query_to_query' (queries as
in-batch candidates, without doc_to_query: every process's queries must be gathered), and 'duplicate' (a
positive text shared by the two processes' halves of the global batch: never a negative of the other).
"""

import sys

import torch
import torch.distributed as dist

from conftest import make_records
from finetune.data.examples import pad_sequences
from finetune.data.schema import text_key
from finetune.training.distributed import gather_rows, world
from finetune.objectives.losses import ranking_loss
from finetune.model.embedding_model import EmbeddingModel
from finetune.objectives.builtin import RankingObjective
from finetune.objectives.base import batch_for_objective

BATCH, SHARDS = 8, 2


def batch_texts():
    records = make_records(BATCH, num_negatives=1, seed=11)
    return [r["question"] for r in records], [r["pos_doc"][0] for r in records], [r["neg_doc"][0] for r in records]


# The objective runs: name -> (its ranking directions, whether query 1's positive text is also query 5's).
OBJECTIVE_RUNS = {"query_to_query": (("query_to_doc", "query_to_query"), False),
                  "duplicate": (("query_to_doc",), True)}


def objective_texts(shared_positive):
    """batch_texts(), with query 1's positive (process 0's half) given to query 5 too (process 1's half)."""
    queries, positives, negatives = batch_texts()
    if shared_positive:
        positives[5] = positives[1]
    return queries, positives, negatives


def embed(model, texts):
    encoded = [model.tokenizer(text)["input_ids"] for text in texts]
    ids, mask = pad_sequences(encoded, model.tokenizer.pad_token_id)
    return model(ids, mask)


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def keys(texts):
    return torch.tensor([text_key(t) for t in texts])


def reference_gradients(model_path, backprop):
    """One process: 'global' = the plain loss of the whole batch; 'local' = the average over shards of
    each shard's loss with the other shards' documents held constant."""
    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(model_path)
    queries, positives, negatives = batch_texts()
    if backprop == "global":
        loss = ranking_loss(embed(model, queries), embed(model, positives + negatives), keys(positives + negatives),
                            num_negatives=1)
        loss.backward()
        return loss.item(), flat_grads(model)
    b = BATCH // SHARDS
    shard_docs = [positives[s * b:(s + 1) * b] + negatives[s * b:(s + 1) * b] for s in range(SHARDS)]
    total = 0.0
    for s in range(SHARDS):
        docs = torch.cat([embed(model, shard_docs[o]) if o == s else embed(model, shard_docs[o]).detach()
                          for o in range(SHARDS)])
        loss = ranking_loss(embed(model, queries[s * b:(s + 1) * b]), docs, keys(sum(shard_docs, [])),
                            num_negatives=1, shard_index=s, num_shards=SHARDS) / SHARDS
        loss.backward()
        total += loss.item()
    return total, flat_grads(model)


def reference_objective(model_path, name, with_keys=True):
    """One process, the whole batch of 8: the objective's loss and gradients (``with_keys=False``: without
    duplicate masking, to show that the shared text matters)."""
    directions, shared = OBJECTIVE_RUNS[name]
    model = EmbeddingModel.from_pretrained(model_path)
    queries, positives, negatives = objective_texts(shared)
    inputs = {"doc_keys": keys(positives + negatives) if with_keys else None, "query_keys": keys(queries)}
    objective = RankingObjective(directions=directions)
    loss = objective(batch_for_objective(objective, embed(model, queries), embed(model, positives + negatives),
                                         inputs, gather=True)).loss
    loss.backward()
    return loss.item(), flat_grads(model)


def objective_on_this_process(model_path, name, rank, size):
    """As the trainer does it: this process's half of the batch, gathered for the objective; DDP-averaged."""
    directions, shared = OBJECTIVE_RUNS[name]
    model = EmbeddingModel.from_pretrained(model_path)
    queries, positives, negatives = objective_texts(shared)
    b = BATCH // SHARDS
    local_queries = queries[rank * b:(rank + 1) * b]
    local_docs = positives[rank * b:(rank + 1) * b] + negatives[rank * b:(rank + 1) * b]
    objective = RankingObjective(directions=directions)
    batch = batch_for_objective(objective, embed(model, local_queries), embed(model, local_docs),
                                {"doc_keys": keys(local_docs), "query_keys": keys(local_queries)}, gather=True)
    loss = objective(batch).loss
    loss.backward()
    grads, mean_loss = flat_grads(model), loss.detach().clone()
    dist.all_reduce(grads)
    dist.all_reduce(mean_loss)
    return mean_loss / size, grads / size


def main(model_path, output):
    dist.init_process_group("gloo")
    rank, size = world()
    assert size == SHARDS, f"expected {SHARDS} processes, got {size}"
    torch.set_num_threads(1)
    queries, positives, negatives = batch_texts()
    b = BATCH // SHARDS
    local_docs = positives[rank * b:(rank + 1) * b] + negatives[rank * b:(rank + 1) * b]
    result = {}
    for backprop in ("global", "local"):
        model = EmbeddingModel.from_pretrained(model_path)
        doc_emb = gather_rows(embed(model, local_docs), backprop)
        doc_keys = gather_rows(keys(local_docs), "local")
        loss = ranking_loss(embed(model, queries[rank * b:(rank + 1) * b]), doc_emb, doc_keys, num_negatives=1,
                            shard_index=rank, num_shards=size)
        loss.backward()
        grads, mean_loss = flat_grads(model), loss.detach().clone()
        dist.all_reduce(grads)  # what DDP does: average the processes' gradients
        dist.all_reduce(mean_loss)
        result[f"{backprop}_grads"], result[f"{backprop}_loss"] = grads / size, mean_loss / size
    for name in OBJECTIVE_RUNS:
        result[f"{name}_loss"], result[f"{name}_grads"] = objective_on_this_process(model_path, name, rank, size)
    if rank == 0:
        torch.save(result, output)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])

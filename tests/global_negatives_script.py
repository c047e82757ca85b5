"""Run by tests/test_global_negatives.py under 2 processes; ``reference_gradients`` is its 1-process reference.

    accelerate launch --multi_gpu --num_processes 2 tests/global_negatives_script.py MODEL OUT
"""

import sys

import torch
import torch.distributed as dist

from conftest import make_records
from finetune.data import pad_sequences, text_key
from finetune.distributed import gather_rows, world
from finetune.losses import ranking_loss
from finetune.modeling import EmbeddingModel

BATCH, SHARDS = 8, 2


def batch_texts():
    records = make_records(BATCH, num_negatives=1, seed=11)
    return [r["question"] for r in records], [r["pos_doc"][0] for r in records], [r["neg_doc"][0] for r in records]


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
    if rank == 0:
        torch.save(result, output)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Regression tests for review findings: GradCache under accumulation, temperature, sampler epochs,
sharded ranking loss against a hand-written reference, and the seed of negative sampling."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_records, make_trainer, write_jsonl
from finetune import train
from finetune.training.config import parse_arguments
from finetune.data.samplers import LengthGroupedEpochSampler
from finetune.data.examples import TripletDataset
from finetune.objectives.losses import ranking_loss
from finetune.model.embedding_model import EmbeddingModel


# --- 1. GradCache with gradient accumulation -------------------------------------------------------------------

def test_gradcache_with_gradient_accumulation_equals_plain(tiny_bert_without_dropout, tmp_path):
    """GradCache divides its loss by the accumulation steps as the plain step does: with plain SGD (no Adam
    normalisation, no clipping) two accumulated optimizer steps end at the same weights."""
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(32, num_negatives=2, seed=4))

    def run(name, *extra):
        output_dir = tmp_path / name
        train.main(["--model_name_or_path", tiny_bert_without_dropout, "--train_file", train_file,
                    "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "8",
                    "--gradient_accumulation_steps", "2", "--num_hard_negatives", "2", "--optim", "sgd",
                    "--learning_rate", "0.5", "--max_grad_norm", "0", "--weight_decay", "0", "--warmup_steps", "0",
                    "--logging_steps", "1", "--save_steps", "1000", "--use_cpu", "true", "--report_to", "none",
                    "--dataloader_num_workers", "0", "--seed", "3", *extra])
        return load_file(str(output_dir / "model.safetensors"))

    plain = run("plain")
    cached = run("cached", "--gradcache_mini_batch_size", "4")
    initial = load_file(f"{tiny_bert_without_dropout}/model.safetensors")
    assert plain.keys() == cached.keys()
    # The runs really moved the weights (else equality would prove nothing).
    moved = max((plain[key].float() - initial[key].float()).abs().max().item() for key in plain if key in initial)
    assert moved > 1e-3
    worst = max((plain[key].float() - cached[key].float()).abs().max().item() for key in plain)
    assert worst < 1e-5, f"GradCache and plain weights differ by {worst}"


# --- 2. Temperature reaches the trainer's loss --------------------------------------------------------------------

def test_trainer_loss_uses_temperature(tiny_bert, tmp_path):
    """compute_loss scores with scale = 1/--temperature (not a fixed 20)."""
    losses = {}
    for temperature in (0.05, 0.2):
        trainer, model, batch = make_trainer(tiny_bert, tmp_path / str(temperature), temperature=temperature)
        model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
            query_emb = model(batch["query_input_ids"], batch["query_attention_mask"])
            doc_emb = model(batch["doc_input_ids"], batch["doc_attention_mask"])
            expected = ranking_loss(query_emb, doc_emb, batch["doc_keys"], num_negatives=2, scale=1 / temperature)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6), f"temperature {temperature}"
        losses[temperature] = loss.item()
    assert abs(losses[0.05] - losses[0.2]) > 1e-3


# --- 3. LengthGroupedEpochSampler follows set_epoch ---------------------------------------------------------------

def test_length_grouped_sampler_yields_the_current_epoch():
    """After set_epoch(3) the sampler yields (3, index) keys (TripletDataset draws per epoch), a full
    permutation, in an order that differs from epoch 0's and is reproducible."""
    n = 40
    lengths = [(7 * index) % n + 1 for index in range(n)]  # distinct lengths: the sort inside mega-batches is total
    sampler = LengthGroupedEpochSampler(lengths, 4, seed=11)
    epoch0 = list(sampler)
    assert all(epoch == 0 for epoch, _ in epoch0)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    assert all(epoch == 3 for epoch, _ in epoch3), epoch3[:5]
    assert sorted(index for _, index in epoch3) == list(range(n))
    assert [index for _, index in epoch3] != [index for _, index in epoch0]
    fresh = LengthGroupedEpochSampler(lengths, 4, seed=11)
    fresh.set_epoch(3)
    assert list(fresh) == epoch3


# --- 4. Sharded ranking loss against a hand-written reference -----------------------------------------------------

B, K, D, S = 3, 2, 4, 2
BLOCK = B * (1 + K)


def reference_loss(query_emb, doc_emb, doc_keys, scale, mode, shard_index):
    """The loss with explicit loops over the global layout of finetune/objectives/losses.py (float64)."""
    keys = doc_keys.tolist()
    total = 0.0
    for i in range(B):
        q = query_emb[i]
        target = shard_index * BLOCK + i
        if mode == "shared":
            candidates = list(range(S * BLOCK))
        else:
            candidates = [s * BLOCK + p for s in range(S) for p in range(B)]
            candidates += [shard_index * BLOCK + B + i * K + n for n in range(K)]
        candidates = [c for c in candidates if c == target or keys[c] != keys[target]]
        logits = []
        for c in candidates:
            d = doc_emb[c]
            logits.append(scale * (q @ d) / (q.norm() * d.norm()))
        logits = torch.stack(logits)
        total = total - logits[candidates.index(target)] + torch.logsumexp(logits, dim=0)
    return total / B


def sharded_inputs(shard_index, duplicate):
    generator = torch.Generator().manual_seed(100 + shard_index)
    query_emb = torch.randn(B, D, generator=generator, dtype=torch.float64)
    doc_emb = torch.randn(S * BLOCK, D, generator=generator, dtype=torch.float64)
    doc_keys = torch.arange(S * BLOCK, dtype=torch.long) * 7919 + 13
    if duplicate:
        other = 1 - shard_index
        positive_key = doc_keys[shard_index * BLOCK].item()  # the key of query 0's positive
        doc_keys[other * BLOCK + 1] = positive_key  # a positive of the other shard: same text
        doc_keys[other * BLOCK + B] = positive_key  # a hard negative of the other shard: same text
    return query_emb, doc_emb, doc_keys


@pytest.mark.parametrize("duplicate", [False, True], ids=["distinct", "duplicate"])
@pytest.mark.parametrize("shard_index", [0, 1])
@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_ranking_loss_with_shards_matches_a_hand_reference(mode, shard_index, duplicate):
    """ranking_loss with 2 shards: the right target column (shard offset), the right candidates per mode,
    duplicate texts of the other shard masked, and gradients into every row of the gathered documents."""
    scale = 5.0
    query_emb, doc_emb, doc_keys = sharded_inputs(shard_index, duplicate)
    query, docs = query_emb.clone().requires_grad_(), doc_emb.clone().requires_grad_()
    loss = ranking_loss(query, docs, doc_keys, num_negatives=K, scale=scale, mode=mode,
                        shard_index=shard_index, num_shards=S)
    loss.backward()
    ref_query, ref_docs = query_emb.clone().requires_grad_(), doc_emb.clone().requires_grad_()
    expected = reference_loss(ref_query, ref_docs, doc_keys, scale, mode, shard_index)
    expected.backward()

    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(docs.grad, ref_docs.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(query.grad, ref_query.grad, atol=1e-6, rtol=1e-5)
    other_block = slice((1 - shard_index) * BLOCK, (2 - shard_index) * BLOCK)
    assert ref_docs.grad[other_block].abs().max() > 1e-3  # the other shard's rows do receive gradient
    if duplicate:  # the case really exercises masking: without it the reference differs
        unmasked = reference_loss(query_emb, doc_emb, torch.arange(S * BLOCK), scale, mode, shard_index)
        assert abs(unmasked.item() - expected.item()) > 1e-4


# --- 5. Negative sampling is seeded by --data_seed ----------------------------------------------------------------

@pytest.mark.parametrize("data_seed, expected_seed", [("7", 7), (None, 1)], ids=["data_seed_7", "data_seed_unset"])
def test_negative_sampling_uses_data_seed(tiny_bert, tmp_path, data_seed, expected_seed):
    """The training TripletDataset draws its positives/negatives with --data_seed when given (as the sampler
    does, finetune.training.trainer._get_train_sampler), else with --seed."""
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(12, num_negatives=8, seed=5))
    argv = ["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(tmp_path / "out"),
            "--num_hard_negatives", "2", "--use_cpu", "true", "--report_to", "none", "--seed", "1"]
    if data_seed is not None:
        argv += ["--data_seed", data_seed]
    _, data_args, training_args = parse_arguments(argv)
    tokenizer = EmbeddingModel.from_pretrained(tiny_bert).tokenizer
    train_dataset, _ = train.build_datasets(data_args, training_args, tokenizer)

    def draws(dataset):
        return [dataset[(0, i)]["doc_input_ids"] for i in range(len(dataset))]

    by_seed = {seed: draws(TripletDataset(train_dataset.tokenized, 2, seed=seed)) for seed in (1, 7)}
    assert by_seed[1] != by_seed[7]  # the two seeds are distinguishable on this data
    assert draws(train_dataset) == by_seed[expected_seed], \
        f"negatives drawn with seed {train_dataset.seed}, expected {expected_seed}"

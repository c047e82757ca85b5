"""Distillation, Matryoshka and in-batch directions against hand-written references on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.training.config import parse_arguments
from finetune.objectives.losses import (direction_scores, kl_distillation_loss, margin_mse_loss,
                                        own_candidate_scores, own_teacher_scores, ranking_loss)
from finetune.objectives.builtin import (DistillationObjective, MatryoshkaObjective, RankingObjective, WeightedSum,
                                         build_objective)
from finetune.objectives.base import EmbeddedBatch

B, K, D = 3, 2, 5


def cosine(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def tensors(seed=0, shards=1):
    generator = torch.Generator().manual_seed(seed)
    all_queries = torch.randn(shards * B, D, generator=generator, dtype=torch.float64)
    docs = torch.randn(shards * B * (1 + K), D, generator=generator, dtype=torch.float64)
    scores = torch.randn(shards * B * (1 + K), generator=generator, dtype=torch.float64) * 3
    return all_queries, docs, scores


def own_docs(docs, shard, i):
    """Query i's positive and own negatives in the layout of finetune/objectives/losses.py (block of its shard)."""
    base = shard * B * (1 + K)
    return [docs[base + i]] + [docs[base + B + i * K + n] for n in range(K)]


def own_scores(scores, shard, i):
    base = shard * B * (1 + K)
    return [float(scores[base + i])] + [float(scores[base + B + i * K + n]) for n in range(K)]


@pytest.mark.parametrize("shard", [0, 1])
def test_kl_distillation_matches_a_hand_reference(shard):
    all_queries, docs, scores = tensors(1, shards=2)
    queries = all_queries[shard * B:(shard + 1) * B]
    scale, temperature = 7.0, 2.5
    where = dict(num_negatives=K, shard_index=shard, num_shards=2)
    loss = kl_distillation_loss(own_candidate_scores(queries, docs, **where),
                                own_teacher_scores(scores, batch=B, **where), scale=scale, teacher_temperature=temperature)
    expected = 0.0
    for i in range(B):
        student = [scale * cosine(queries[i], doc) for doc in own_docs(docs, shard, i)]
        teacher = [s / temperature for s in own_scores(scores, shard, i)]
        p_teacher = [math.exp(t) / sum(math.exp(u) for u in teacher) for t in teacher]
        log_student = [s - math.log(sum(math.exp(u) for u in student)) for s in student]
        expected += sum(p * (math.log(p) - q) for p, q in zip(p_teacher, log_student))
    assert loss.item() == pytest.approx(expected / B, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_margin_mse_matches_a_hand_reference(temperature):
    queries, docs, scores = tensors(2)
    scale = 4.0
    loss = margin_mse_loss(own_candidate_scores(queries, docs, num_negatives=K),
                           own_teacher_scores(scores, batch=B, num_negatives=K), scale=scale,
                           teacher_temperature=temperature)
    squares = []
    for i in range(B):
        student = [scale * cosine(queries[i], doc) for doc in own_docs(docs, 0, i)]
        teacher = [value / temperature for value in own_scores(scores, 0, i)]
        squares += [((student[0] - student[n]) - (teacher[0] - teacher[n])) ** 2 for n in range(1, K + 1)]
    assert loss.item() == pytest.approx(sum(squares) / len(squares), rel=1e-5)


def joint_softmax_reference(all_queries, docs, shard, shards, directions, scale, query_keys, doc_keys, mode):
    """GTE's loss by loops: -log e^{s(q_i,d_i)} / (sum over every unmasked candidate of every direction)."""
    block = B * (1 + K)
    positives = [docs[s * block + j] for s in range(shards) for j in range(B)]  # positive j of all queries j
    positive_keys = [int(doc_keys[s * block + j]) for s in range(shards) for j in range(B)]
    total = 0.0
    for i in range(B):
        me = shard * B + i
        q, d = all_queries[me], positives[me]
        target = scale * cosine(q, d)
        logits = []
        if mode == "shared":
            candidates = range(shards * block)
        else:
            candidates = [s * block + j for s in range(shards) for j in range(B)] + \
                         [shard * block + B + i * K + n for n in range(K)]
        for c in candidates:
            if c != shard * block + i and int(doc_keys[c]) == positive_keys[me]:
                continue  # a duplicate of the positive
            logits.append(scale * cosine(q, docs[c]))
        for j in range(shards * B):
            same_query = int(query_keys[j]) == int(query_keys[me])
            same_positive = positive_keys[j] == positive_keys[me]
            if "doc_to_query" in directions and not (j == me or same_query or same_positive):
                logits.append(scale * cosine(d, all_queries[j]))
            if "query_to_query" in directions and not (j == me or same_query):
                logits.append(scale * cosine(q, all_queries[j]))
            if "doc_to_doc" in directions and not (j == me or same_positive):
                logits.append(scale * cosine(d, positives[j]))
        total += -(target - math.log(sum(math.exp(x) for x in logits)))
    return total / B


ALL = ("query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc")


@pytest.mark.parametrize("directions", [ALL, ("query_to_doc", "doc_to_query"), ("query_to_doc", "query_to_query"),
                                        ("query_to_doc", "doc_to_doc")])
@pytest.mark.parametrize("mode", ["shared", "exclusive"])
@pytest.mark.parametrize("shard", [0, 1])
def test_directions_match_the_joint_softmax_reference(directions, mode, shard):
    all_queries, docs, _ = tensors(3, shards=2)
    all_queries.requires_grad_(True)
    docs.requires_grad_(True)
    query_keys = torch.arange(2 * B)
    doc_keys = torch.arange(100, 100 + docs.shape[0])
    query_keys[4] = query_keys[1]  # query 1 of shard 0 repeats in shard 1: never a negative of the other
    doc_keys[B * (1 + K) + 2] = doc_keys[0]  # shard 1's query 2 has query 0's positive: a true pair, masked
    queries = all_queries[shard * B:(shard + 1) * B]
    loss = ranking_loss(queries, docs, doc_keys, num_negatives=K, scale=3.0, mode=mode, shard_index=shard,
                        num_shards=2, directions=directions, all_query_emb=all_queries, query_keys=query_keys)
    expected = joint_softmax_reference(all_queries.detach(), docs.detach(), shard, 2, directions, 3.0, query_keys,
                                       doc_keys, mode)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    other = slice((1 - shard) * B, (2 - shard) * B)
    other_positives = slice((1 - shard) * B * (1 + K), (1 - shard) * B * (1 + K) + B)
    assert docs.grad[other_positives].abs().sum() > 0  # gradient reaches the other process's documents
    if {"doc_to_query", "query_to_query"} & set(directions):
        assert all_queries.grad[other].abs().sum() > 0  # ... and its queries, when they are candidates


def test_query_to_doc_alone_is_todays_loss_and_extra_directions_need_it():
    queries, docs, _ = tensors(4)
    keys = torch.arange(docs.shape[0])
    assert torch.equal(ranking_loss(queries, docs, keys, num_negatives=K, directions=("query_to_doc",)),
                       ranking_loss(queries, docs, keys, num_negatives=K))
    with pytest.raises(ValueError, match="must include 'query_to_doc'"):
        ranking_loss(queries, docs, keys, num_negatives=K, directions=("doc_to_doc",))
    with pytest.raises(ValueError, match="Unknown ranking direction"):
        direction_scores(queries, queries, docs, directions=("doc_to_everything",), num_negatives=K)


def test_matryoshka_sums_the_objective_over_truncated_renormalised_embeddings():
    queries, docs, scores = tensors(5)
    batch = EmbeddedBatch(queries.float(), docs.float(), torch.arange(docs.shape[0]), scores.float())
    inner = WeightedSum([(1.0, RankingObjective(scale=10.0)), (0.5, DistillationObjective("margin_mse", scale=10.0))])
    output = MatryoshkaObjective(inner, dims=(5, 3, 2), weights=(1.0, 0.5, 0.25))(batch)
    expected = 0.0
    for dim, weight in [(5, 1.0), (3, 0.5), (2, 0.25)]:
        q, d = queries[:, :dim].float(), docs[:, :dim].float()
        ranking = ranking_loss(q, d, torch.arange(docs.shape[0]), num_negatives=K, scale=10.0)
        distillation = margin_mse_loss(own_candidate_scores(q, d, num_negatives=K),
                                       own_teacher_scores(scores.float(), batch=B, num_negatives=K), scale=10.0)
        expected += weight * (ranking + 0.5 * distillation)
        assert output.components[f"loss_ranking_dim{dim}"].item() == pytest.approx(ranking.item(), abs=1e-6)
        assert output.components[f"loss_distillation_margin_mse_dim{dim}"].item() == pytest.approx(
            distillation.item(), abs=1e-5)
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_losses_are_fp32_under_bf16_embeddings():
    queries, docs, scores = tensors(6)
    batch = EmbeddedBatch(queries.bfloat16(), docs.bfloat16(), torch.arange(docs.shape[0]), scores.float())
    reference = EmbeddedBatch(queries.bfloat16().float(), docs.bfloat16().float(), torch.arange(docs.shape[0]),
                              scores.float())
    for objective in (RankingObjective(scale=50.0, directions=ALL), DistillationObjective("kl", scale=50.0),
                      DistillationObjective("margin_mse", scale=50.0)):
        loss = objective(batch).loss
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(objective(reference).loss.item(), rel=1e-5)


def test_build_objective_from_arguments(tmp_path):
    def build(*flags):
        return build_objective(parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", *flags])[2])

    assert build() == RankingObjective(scale=20.0, mode="shared")  # the default: today's loss alone
    pure = build("--distillation", "kl", "--ranking_weight", "0", "--teacher_temperature", "2")
    assert pure == DistillationObjective("kl", scale=20.0, teacher_temperature=2.0)
    mixed = build("--distillation", "margin_mse", "--distillation_weight", "0.3", "--matryoshka_dims", "8,4",
                  "--ranking_directions", "query_to_doc,doc_to_doc")
    assert isinstance(mixed, MatryoshkaObjective) and mixed.dims == (8, 4) and mixed.weights == (1.0, 1.0)
    assert mixed.needs_scores and not mixed.needs_all_queries
    assert [weight for weight, _ in mixed.inner.terms] == [1.0, 0.3]


@pytest.mark.parametrize("flags, message", [
    (["--ranking_weight", "0"], "leaves nothing to train"),
    (["--distillation", "listwise"], "--distillation must be one of"),
    (["--ranking_directions", "doc_to_doc"], "including query_to_doc"),
    (["--ranking_directions", "query_to_doc,query_to_doc"], "distinct values"),
    (["--matryoshka_dims", "64,0"], "distinct positive sizes"),
    (["--matryoshka_dims", "64,32", "--matryoshka_weights", "1"], "one weight >= 0 per size"),
    (["--matryoshka_dims", "sixty"], "takes integers"),
    (["--matryoshka_weights", "1"], "needs --matryoshka_dims"),
    (["--teacher_temperature", "0"], "--teacher_temperature must be > 0"),
])
def test_bad_objective_options(flags, message):
    from finetune.training.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_arguments(["--use_cpu", "true", *flags])


def test_doc_to_doc_alone_needs_no_gathered_queries():
    """doc_to_doc with local queries only (queries not gathered, no query keys) on the second of two shards."""
    all_queries, docs, _ = tensors(8, shards=2)
    doc_keys = torch.arange(100, 100 + docs.shape[0])
    directions = ("query_to_doc", "doc_to_doc")
    loss = ranking_loss(all_queries[B:], docs, doc_keys, num_negatives=K, scale=3.0, shard_index=1, num_shards=2,
                        directions=directions)
    expected = joint_softmax_reference(all_queries, docs, 1, 2, directions, 3.0, torch.arange(2 * B), doc_keys, "shared")
    assert loss.item() == pytest.approx(expected, abs=1e-5)

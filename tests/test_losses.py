"""The ranking loss against hand computations on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.objectives.losses import ranking_loss, ranking_scores


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def hand_cross_entropy(score_rows, targets):
    """Mean of -log softmax(row)[target], written out without torch."""
    total = 0.0
    for row, target in zip(score_rows, targets):
        finite = [s for s in row if s != float("-inf")]
        log_sum = math.log(sum(math.exp(s) for s in finite))
        total += log_sum - row[target]
    return total / len(score_rows)


@pytest.fixture
def batch():
    # B = 2 queries, k = 1 negative each: docs = [pos0, pos1, neg0, neg1]
    queries = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    docs = unit([0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.5, 0.5, 0.5], [0.0, 0.6, 0.8])
    return queries, docs


def cos_matrix(a, b):
    return [[float(x @ y) for y in b] for x in a]


def test_shared_mode_matches_hand_computation(batch):
    queries, docs = batch
    scale = 20.0
    cos = cos_matrix(queries, docs)  # every query against all 4 docs
    expected = hand_cross_entropy([[scale * c for c in row] for row in cos], [0, 1])
    loss = ranking_loss(queries, docs, num_negatives=1, scale=scale, mode="shared")
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_exclusive_mode_uses_only_own_negatives(batch):
    queries, docs = batch
    scale = 20.0
    cos = cos_matrix(queries, docs)
    rows = [[scale * cos[0][0], scale * cos[0][1], scale * cos[0][2]],  # q0: pos0, pos1, its neg0
            [scale * cos[1][0], scale * cos[1][1], scale * cos[1][3]]]  # q1: pos0, pos1, its neg1
    loss = ranking_loss(queries, docs, num_negatives=1, scale=scale, mode="exclusive")
    assert loss.item() == pytest.approx(hand_cross_entropy(rows, [0, 1]), rel=1e-5, abs=1e-6)
    scores, _ = ranking_scores(queries, docs, num_negatives=1, scale=scale, mode="exclusive")
    assert scores.shape == (2, 3)


def test_modes_differ_when_negatives_are_shared(batch):
    queries, docs = batch
    shared = ranking_loss(queries, docs, num_negatives=1, mode="shared")
    exclusive = ranking_loss(queries, docs, num_negatives=1, mode="exclusive")
    assert shared.item() > exclusive.item()  # shared adds the other query's negative as a candidate


def test_in_batch_only_is_plain_softmax_over_positives():
    queries = unit([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    docs = unit([1.0, 0.1], [0.1, 1.0], [0.7, 0.7])
    cos = cos_matrix(queries, docs)
    expected = hand_cross_entropy([[10 * c for c in row] for row in cos], [0, 1, 2])
    for mode in ("shared", "exclusive"):
        assert ranking_loss(queries, docs, num_negatives=0, scale=10, mode=mode).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_scores_are_scaled_cosine_even_for_unnormalised_inputs(batch):
    queries, docs = batch
    scores, _ = ranking_scores(3 * queries, 7 * docs, num_negatives=1, scale=2.0)
    torch.testing.assert_close(scores, 2.0 * queries @ docs.T)


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_duplicate_of_positive_is_masked_not_a_negative(batch, mode):
    queries, docs = batch
    # q1's negative has the same text as q0's positive (key 100): for q0 it must not count.
    keys = torch.tensor([100, 200, 300, 100])
    scores, _ = ranking_scores(queries, docs, keys, num_negatives=1, mode=mode)
    if mode == "shared":
        assert scores[0, 3] == float("-inf")  # q0 vs neg1 (duplicate of pos0)
        assert torch.isfinite(scores[0, :3]).all() and torch.isfinite(scores[1]).all()
        cos = cos_matrix(queries, docs)
        rows = [[20 * cos[0][j] for j in range(3)], [20 * c for c in cos[1]]]
    else:
        assert torch.isfinite(scores).all()  # q1 only sees its own negative: not a duplicate of pos1
        cos = cos_matrix(queries, docs)
        rows = [[20 * cos[0][0], 20 * cos[0][1], 20 * cos[0][2]], [20 * cos[1][0], 20 * cos[1][1], 20 * cos[1][3]]]
    loss = ranking_loss(queries, docs, keys, num_negatives=1, mode=mode)
    assert loss.item() == pytest.approx(hand_cross_entropy(rows, [0, 1]), rel=1e-5, abs=1e-6)


def test_duplicate_positive_across_queries_is_masked():
    queries = unit([1.0, 0.0], [0.9, 0.1])
    docs = unit([1.0, 0.05], [1.0, 0.05])  # both queries share the same positive text
    keys = torch.tensor([7, 7])
    scores, _ = ranking_scores(queries, docs, keys, num_negatives=0)
    assert scores[0, 1] == float("-inf") and scores[1, 0] == float("-inf")
    assert torch.isfinite(scores.diagonal()).all()
    assert ranking_loss(queries, docs, keys, num_negatives=0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_scored_in_fp32(dtype):
    torch.manual_seed(0)
    queries, docs = torch.randn(4, 16), torch.randn(4 * 3, 16)
    reference = ranking_loss(queries, docs, num_negatives=2, scale=100.0)  # temperature 0.01
    low = ranking_loss(queries.to(dtype), docs.to(dtype), num_negatives=2, scale=100.0)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert low.item() == pytest.approx(reference.item(), rel=tolerance)


def test_wrong_document_count_is_an_error(batch):
    queries, docs = batch
    with pytest.raises(ValueError, match=r"Expected 1\*2\*\(1\+2\) = 6 documents"):
        ranking_loss(queries, docs, num_negatives=2)


def test_unknown_mode_is_an_error(batch):
    with pytest.raises(ValueError, match="hard-negative mode"):
        ranking_loss(*batch, num_negatives=1, mode="global")

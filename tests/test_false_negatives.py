"""False negatives inside the loss (--false_negative_margin with a self, teacher or model guide) and hardness
weighting (--hardness_weighting): by hand on tiny tensors, bit-identical when off, GradCache == plain, 2 processes
== 1 process of the whole batch, the masked count in the logs, and the refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import conftest
from conftest import launch_two_processes, make_records, write_jsonl
from finetune import train
from finetune.data.schema import DataFormatError
from finetune.objectives.base import EmbeddedBatch, batch_for_objective, gather_batch
from finetune.objectives.builtin import (DatasetDispatch, DistillationObjective, MatryoshkaObjective, RankingObjective,
                                         WeightedSum, build_objective)
from finetune.objectives.losses import (false_negative_mask, hardness_weighted_scores, ranking_loss, ranking_scores,
                                        teacher_guide_scores)
from finetune.training.config import ConfigError, parse_arguments
from finetune.training.inputs import load_guide

ROOT = Path(__file__).resolve().parent.parent
INF = float("-inf")


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ---------------------------------------------------------------------------------------------- by hand
def test_false_negative_mask_by_hand():
    guide = torch.tensor([[0.80, 0.79, 0.60, 0.95, INF],
                          [0.30, 0.50, 0.45, 0.10, 0.49]])
    labels = torch.tensor([0, 1])
    mask = false_negative_mask(guide, labels, margin=0.05)
    # query 0: 0.79 > 0.75 and 0.95 > 0.75 dropped, 0.60 kept, -inf (no guide score) kept; query 1: 0.49 > 0.45
    # dropped, 0.45 is not above 0.45 (strict), 0.30 and 0.10 kept; the positives never
    assert mask.tolist() == [[False, True, False, True, False], [False, False, False, False, True]]
    assert false_negative_mask(guide, labels, margin=0.0).tolist() == [[False, False, False, True, False],
                                                                       [False, False, False, False, False]]
    everything = false_negative_mask(guide, labels, margin=100.0)
    assert not everything[[0, 1], labels].any() and not everything[0, 4]  # the positive and -inf, whatever the margin
    assert everything.sum() == 7


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_teacher_guide_holds_only_each_query_s_own_candidates(mode):
    """B = 2, k = 2, 2 shards, this process shard 1: documents [pos0 pos1 n00 n01 n10 n11] per shard."""
    scores = torch.arange(12, dtype=torch.float32)  # document d has teacher score d
    keys = torch.arange(100, 112)
    keys[10] = keys[7]  # shard 1's query 1's negative n10 repeats its positive pos1: masked already, no guide score
    guide, labels = teacher_guide_scores(scores, batch=2, num_negatives=2, mode=mode, doc_keys=keys,
                                         shard_index=1, num_shards=2)
    rows = guide.tolist()
    if mode == "shared":  # every document of both blocks; shard 1 is documents 6..11
        assert labels.tolist() == [6, 7]
        assert [j for j, s in enumerate(rows[0]) if s != INF] == [6, 8, 9]
        assert [rows[0][j] for j in (6, 8, 9)] == [6.0, 8.0, 9.0]
        assert [j for j, s in enumerate(rows[1]) if s != INF] == [7, 11]  # n10 (10) is the duplicate
        assert [rows[1][j] for j in (7, 11)] == [7.0, 11.0]
    else:  # the 4 positives of both shards, then the query's own 2 negatives
        assert labels.tolist() == [2, 3]
        assert rows[0] == [INF, INF, 6.0, INF, 8.0, 9.0]
        assert rows[1] == [INF, INF, INF, 7.0, INF, 11.0]
    assert guide.shape == ranking_scores(torch.randn(2, 4), torch.randn(12, 4), num_negatives=2, mode=mode,
                                         shard_index=1, num_shards=2)[0].shape


def hand_cross_entropy(rows, targets):
    total = 0.0
    for row, target in zip(rows, targets):
        total += math.log(sum(math.exp(s) for s in row if s != INF)) - row[target]
    return total / len(rows)


@pytest.fixture
def batch():
    # B = 2 queries, k = 1: docs = [pos0, pos1, neg0, neg1]; neg0 is nearly pos0 (a planted false negative)
    queries = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    docs = unit([0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.88, 0.12, 0.05], [0.0, 0.6, 0.8])
    return queries, docs


def test_masked_candidates_leave_the_softmax_and_the_positive_never_does(batch):
    queries, docs = batch
    cos = (queries @ docs.T).tolist()
    mask = torch.tensor([[True, False, True, False], [False, True, False, True]])  # positives "masked": ignored
    loss = ranking_loss(queries, docs, num_negatives=1, scale=5.0, false_negatives=mask)
    rows = [[5 * cos[0][0], 5 * cos[0][1], INF, 5 * cos[0][3]], [5 * cos[1][0], 5 * cos[1][1], 5 * cos[1][2], INF]]
    assert loss.item() == pytest.approx(hand_cross_entropy(rows, [0, 1]), rel=1e-5)
    assert mask[0, 0] and mask[1, 1]  # the caller's mask is not changed


def test_self_guide_drops_the_planted_copy_and_counts_it(batch):
    queries, docs = batch
    keys = torch.arange(4)
    output = RankingObjective(scale=5.0, false_negative_margin=0.05)(gather_batch(queries, docs, keys, gather=True))
    cos = (queries @ docs.T).tolist()
    # query 0: neg0 scores 0.98 against the positive's 0.99 -> dropped; nothing else is within 0.05 of a positive
    assert cos[0][2] > cos[0][0] - 0.05 and all(cos[i][j] < cos[i][i] - 0.05 for i, j in [(0, 1), (0, 3), (1, 0),
                                                                                         (1, 2), (1, 3)])
    rows = [[5 * cos[0][0], 5 * cos[0][1], INF, 5 * cos[0][3]], [5 * c for c in cos[1]]]
    assert output.loss.item() == pytest.approx(hand_cross_entropy(rows, [0, 1]), rel=1e-5)
    assert output.components["false_negatives_masked"].item() == 1
    plain = RankingObjective(scale=5.0)(gather_batch(queries, docs, keys, gather=True))
    assert plain.loss.item() > output.loss.item() + 0.2 and "false_negatives_masked" not in plain.components


def test_teacher_and_model_guides(batch):
    queries, docs = batch
    keys = torch.arange(4)
    # teacher: neg1 scores above pos1 for query 1, neg0 well below pos0 -> only neg1 dropped; in-batch kept
    teacher = torch.tensor([5.0, 3.0, 1.0, 3.5])
    output = RankingObjective(scale=5.0, false_negative_margin=0.0, false_negative_guide="teacher")(
        EmbeddedBatch(queries, docs, keys, teacher))
    cos = (queries @ docs.T).tolist()
    rows = [[5 * c for c in cos[0]], [5 * cos[1][0], 5 * cos[1][1], 5 * cos[1][2], INF]]
    assert output.loss.item() == pytest.approx(hand_cross_entropy(rows, [0, 1]), rel=1e-5)
    assert output.components["false_negatives_masked"].item() == 1
    assert RankingObjective(false_negative_guide="teacher").needs_scores is False  # off: nothing gathered
    assert RankingObjective(false_negative_margin=0.0, false_negative_guide="teacher").needs_scores
    unscored = RankingObjective(scale=5.0, false_negative_margin=0.0, false_negative_guide="teacher")(
        EmbeddedBatch(queries, docs))
    plain = ranking_loss(queries, docs, num_negatives=1, scale=5.0)
    assert unscored.loss.item() == pytest.approx(plain.item())  # a batch without scores: nothing dropped
    assert unscored.components["false_negatives_masked"].item() == 0
    # model: the guide's embeddings decide, not the student's: a guide that sees pos1 in neg0 for query 1
    guide_docs = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    output = RankingObjective(scale=5.0, false_negative_margin=0.01, false_negative_guide="model")(
        EmbeddedBatch(queries, docs, keys, guide_query_emb=queries, guide_doc_emb=guide_docs))
    rows = [[5 * c for c in cos[0]], [5 * cos[1][0], 5 * cos[1][1], INF, 5 * cos[1][3]]]
    assert output.loss.item() == pytest.approx(hand_cross_entropy(rows, [0, 1]), rel=1e-5)
    assert output.components["false_negatives_masked"].item() == 1


def test_hardness_weighting_by_hand_and_its_weights_carry_no_gradient():
    torch.manual_seed(0)
    query_emb, doc_emb = torch.randn(3, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    keys = torch.arange(9)
    keys[4] = keys[0]  # a duplicate of query 0's positive: -inf, not a negative, no weight
    alpha, scale = 4.0, 10.0
    loss = ranking_loss(query_emb, doc_emb, keys, num_negatives=2, scale=scale, hardness_weighting=alpha)
    scores, labels = ranking_scores(query_emb, doc_emb, keys, num_negatives=2, scale=scale)
    expected = 0.0
    for i, row in enumerate(scores.tolist()):
        negatives = [s for j, s in enumerate(row) if j != labels[i] and s != INF]
        weights = [math.exp(alpha * s / scale) for s in negatives]
        mean = sum(weights) / len(weights)
        denominator = math.exp(row[labels[i]]) + sum(w / mean * math.exp(s) for w, s in zip(weights, negatives))
        expected += (math.log(denominator) - row[labels[i]]) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # gradient: the weights are constants (computed from detached scores)
    grads = torch.autograd.grad(loss, [query_emb, doc_emb])
    finite = torch.isfinite(scores)
    negative = finite.clone()
    negative[torch.arange(3), labels] = False
    hardness = (alpha * scores.detach() / scale).masked_fill(~negative, INF)
    log_weights = torch.where(negative, hardness - (hardness.logsumexp(1, keepdim=True)
                                                    - negative.sum(1, keepdim=True).float().log()), 0.0)
    reference = F.cross_entropy(scores + log_weights, labels)
    for got, want in zip(grads, torch.autograd.grad(reference, [query_emb, doc_emb])):
        torch.testing.assert_close(got, want)
    # alpha -> 0: the plain loss; alpha > 0 weighs the hard negatives more, so the loss grows here
    plain = ranking_loss(query_emb, doc_emb, keys, num_negatives=2, scale=scale)
    assert ranking_loss(query_emb, doc_emb, keys, num_negatives=2, scale=scale,
                        hardness_weighting=1e-6).item() == pytest.approx(plain.item(), rel=1e-5)
    assert loss.item() > plain.item()


def test_a_row_without_negatives_keeps_its_loss():
    scores = torch.tensor([[3.0, INF, INF], [1.0, 2.0, 0.5]])
    weighted = hardness_weighted_scores(scores, torch.tensor([0, 0]), alpha=5.0)
    assert weighted[0].tolist() == [3.0, INF, INF]
    assert torch.isfinite(weighted[1]).all() and weighted[1, 0] == 1.0


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
@pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query", "doc_to_doc")])
def test_with_the_options_off_the_loss_is_bit_identical(tmp_path, mode, directions):
    """Defaults: the objective built from the arguments calls the pre-existing arithmetic, bit for bit (values and
    gradients), against a reference written without the new arguments."""
    _, _, args = parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", "--hard_negatives_mode", mode,
                                  "--ranking_directions", ",".join(directions)])
    objective = build_objective(args)
    assert (objective.false_negative_margin, objective.hardness_weighting, objective.guide) == (None, 0.0, None)
    generator = torch.Generator().manual_seed(3)
    query_emb = torch.randn(4, 8, generator=generator, requires_grad=True)
    doc_emb = torch.randn(12, 8, generator=generator, requires_grad=True)
    keys = torch.arange(12)
    keys[6] = keys[1]
    output = objective(gather_batch(query_emb, doc_emb, keys, gather=True, query_keys=torch.arange(4)))
    scores, labels = ranking_scores(query_emb, doc_emb, keys, num_negatives=2, scale=20.0, mode=mode)
    if len(directions) > 1:
        from finetune.objectives.losses import direction_scores

        scores = torch.cat([scores, direction_scores(query_emb, query_emb, doc_emb, directions=directions,
                                                     num_negatives=2, scale=20.0, query_keys=torch.arange(4),
                                                     doc_keys=keys)], dim=1)
    reference = F.cross_entropy(scores, labels)
    assert torch.equal(output.loss, reference) and output.components.keys() == {"loss_ranking"}
    for got, want in zip(torch.autograd.grad(output.loss, [query_emb, doc_emb]),
                         torch.autograd.grad(reference, [query_emb, doc_emb])):
        assert torch.equal(got, want)


def test_matryoshka_counts_per_size():
    generator = torch.Generator().manual_seed(1)
    query_emb, doc_emb = torch.randn(4, 8, generator=generator), torch.randn(8, 8, generator=generator)
    objective = MatryoshkaObjective(RankingObjective(false_negative_margin=0.3), dims=(8, 4), weights=(1.0, 1.0))
    components = objective(EmbeddedBatch(query_emb, doc_emb, torch.arange(8))).components
    assert {"false_negatives_masked_dim8", "false_negatives_masked_dim4"} <= components.keys()


def test_the_guide_embeds_the_batch_and_every_wrapper_passes_it_on():
    calls = []

    def guide(inputs):  # a stand-in for finetune.objectives.guide.GuideEncoder
        calls.append(inputs)
        return torch.ones(2, 3), torch.zeros(4, 3)

    ranking = RankingObjective(false_negative_margin=0.0, false_negative_guide="model", guide=guide)
    for objective in (ranking, WeightedSum([(1.0, DistillationObjective()), (1.0, ranking)]),
                      MatryoshkaObjective(ranking, (3,), (1.0,)),
                      DatasetDispatch({0: RankingObjective(), 1: ranking}, ["a", "b"], default=RankingObjective())):
        assert objective.guide is guide
    inputs = {"doc_keys": torch.arange(4)}
    batch = batch_for_objective(ranking, torch.randn(2, 3), torch.randn(4, 3), inputs, gather=True)
    assert calls == [inputs] and torch.equal(batch.guide_query_emb, torch.ones(2, 3))
    assert torch.equal(batch.guide_doc_emb, torch.zeros(4, 3)) and batch.truncated(2).guide_doc_emb.shape == (4, 3)
    plain = RankingObjective()
    assert plain.guide is None and WeightedSum([(1.0, plain)]).guide is None
    assert batch_for_objective(plain, torch.randn(2, 3), torch.randn(4, 3), inputs, gather=True).guide_doc_emb is None


# ----------------------------------------------------------------------------------------- in the trainer
def planted_records(count, num_negatives=2, seed=3):
    """Records with teacher scores where every other record's first negative is its positive reworded (a planted
    false negative, which the teacher scores like the positive)."""
    records = make_records(count, num_negatives=num_negatives, seed=seed)
    for index, record in enumerate(records):
        if index % 2 == 0:
            record["neg_doc"][0] = "in other words " + record["pos_doc"][0]
        record["pos_scores"] = [5.0]
        record["neg_scores"] = [5.5 if index % 2 == 0 and n == 0 else 1.0 - n for n in range(num_negatives)]
    return records


# margin per guide: the tiny random BERT's cosines are all close to 1, so its margins are small
GUIDES = {"self": dict(false_negative_margin=0.002),
          "teacher": dict(false_negative_margin=0.0, false_negative_guide="teacher"),
          "model": dict(false_negative_margin=0.002, false_negative_guide="model")}


def trainer_with(model_path, tmp_path, guide_name, records, hardness=0.0, **overrides):
    options = {**GUIDES[guide_name], "hardness_weighting": hardness, **overrides}
    if guide_name == "model":
        options["guide_model"] = model_path
    flags = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    _, _, args = parse_arguments(["--output_dir", str(tmp_path / "args"), "--use_cpu", "true", *flags])
    from transformers import AutoTokenizer

    objective = build_objective(args, guide=load_guide(args, AutoTokenizer.from_pretrained(model_path)))
    return conftest.make_trainer(model_path, tmp_path, records=records, objective=objective, **options)


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("guide_name, hardness", [("self", 0.0), ("teacher", 5.0), ("model", 5.0)])
def test_gradcache_equals_plain_with_masking_on(tiny_bert, tmp_path, guide_name, hardness):
    """Dropout on, one chunk per side: the cached step consumes the RNG as the plain one; the masks agree."""
    records = planted_records(10)
    trainer, model, batch = trainer_with(tiny_bert, tmp_path / "p", guide_name, records, hardness)
    torch.manual_seed(5)
    plain_loss = trainer.training_step(model, batch).item()
    cached_trainer, cached_model, _ = trainer_with(tiny_bert, tmp_path / "c", guide_name, records, hardness,
                                                   gradcache_mini_batch_size=1000)
    torch.manual_seed(5)
    cached_loss = cached_trainer.training_step(cached_model, batch).item()
    assert cached_loss == pytest.approx(plain_loss, abs=1e-6)
    torch.testing.assert_close(gradients(cached_model), gradients(model), atol=1e-6, rtol=1e-5)
    plain_count = trainer.components.pop_means()["false_negatives_masked"]
    assert plain_count == cached_trainer.components.pop_means()["false_negatives_masked"]
    assert 0 < plain_count < 10 * 29  # some candidates dropped, not all (10 queries x 29 negatives each)


def test_gradcache_in_small_chunks_equals_plain_with_masking_on(tiny_bert_without_dropout, tmp_path):
    records = planted_records(10)
    trainer, model, batch = trainer_with(tiny_bert_without_dropout, tmp_path / "p", "model", records, 5.0)
    plain_loss = trainer.training_step(model, batch).item()
    cached_trainer, cached_model, _ = trainer_with(tiny_bert_without_dropout, tmp_path / "c", "model", records, 5.0,
                                                   gradcache_mini_batch_size=4)
    assert cached_trainer.objective.guide.mini_batch_size == 4  # the guide embeds in GradCache's chunks too
    assert cached_trainer.training_step(cached_model, batch).item() == pytest.approx(plain_loss, abs=1e-5)
    torch.testing.assert_close(gradients(cached_model), gradients(model), atol=1e-5, rtol=1e-4)


def run_args(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(output_dir),
            "--num_hard_negatives", "2", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1",
            "--save_steps", "100", "--use_cpu", "true", "--report_to", "none", "--dataloader_num_workers", "0", *extra]


def logged(output_dir):
    return [e for e in json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def test_two_processes_equal_one_process_of_the_whole_batch(tiny_bert_without_dropout, tmp_path):
    """Model guide + hardness weighting, global negatives, GradCache in chunks of 3 on 2 processes of 4 queries ==
    1 process of 8, plain: same weights, losses and masked counts (summed over the processes in the logs)."""
    train_file = write_jsonl(tmp_path / "train.jsonl", planted_records(24, seed=5))
    common = run_args(tiny_bert_without_dropout, train_file, tmp_path / "x", "--max_steps", "2",
                      "--false_negative_margin", "0.002", "--false_negative_guide", "model",
                      "--guide_model", tiny_bert_without_dropout, "--hardness_weighting", "5")
    two = launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, "--per_device_train_batch_size", "4",
                                "--output_dir", str(tmp_path / "two"), "--gradcache_mini_batch_size", "3"])
    assert "World size 2" in two.stdout + two.stderr
    train.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for two_log, one_log in zip(logged(tmp_path / "two"), logged(tmp_path / "one")):
        assert two_log["loss"] == pytest.approx(one_log["loss"], abs=1e-4)
        assert two_log["false_negatives_masked"] == one_log["false_negatives_masked"] > 0


def test_the_masked_count_is_logged(tiny_bert, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", planted_records(16))
    train.main(run_args(tiny_bert, train_file, tmp_path / "on", "--max_steps", "2", "--per_device_train_batch_size",
                        "8", "--false_negative_margin", "0", "--false_negative_guide", "teacher"))
    counts = [entry["false_negatives_masked"] for entry in logged(tmp_path / "on")]
    assert len(counts) == 2 and sum(counts) == 8.0  # one epoch: the 8 planted copies, scored above the positive


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flags, message", [
    (["--false_negative_guide", "oracle", "--false_negative_margin", "0"], r"--false_negative_guide must be one of"),
    (["--false_negative_guide", "teacher"], r"need --false_negative_margin \(the filter is off\)"),
    (["--guide_model", "some/model"], r"need --false_negative_margin"),
    (["--false_negative_margin", "nan"], r"--false_negative_margin must be a finite number"),
    (["--false_negative_margin", "0.1", "--false_negative_guide", "model"], r"model and --guide_model PATH go together"),
    (["--false_negative_margin", "0.1", "--guide_model", "x"], r"model and --guide_model PATH go together"),
    (["--hardness_weighting", "-1"], r"--hardness_weighting must be >= 0"),
    (["--false_negative_margin", "0.1", "--ranking_weight", "0", "--distillation", "kl"],
     r"act on the ranking loss, which --ranking_weight 0 turns off"),
])
def test_refusals_are_one_line(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", *flags])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags", [["--false_negative_margin", "0"], ["--hardness_weighting", "2"]])
def test_a_cross_encoder_refuses_them(tmp_path, flags):
    """A reranker scores each pair on its own: no in-batch softmax to filter or weight."""
    with pytest.raises(ConfigError, match=f"{flags[0]}: bi-encoder options"):
        parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", "--model_type", "cross-encoder", *flags])


def test_a_guide_with_another_tokenizer_is_refused_before_training(tiny_bert, tiny_qwen3, train_file, tmp_path):
    with pytest.raises(ConfigError, match=r"--guide_model '.*' has another tokenizer than the model trained "
                                          r"\(another vocabulary") as error:
        train.main(run_args(tiny_bert, train_file, tmp_path / "out", "--false_negative_margin", "0.1",
                            "--false_negative_guide", "model", "--guide_model", tiny_qwen3))
    assert "\n" not in str(error.value) and not (tmp_path / "out" / "checkpoint-1").exists()
    with pytest.raises(ConfigError, match=r"^--guide_model '.*missing' \("):
        train.main(run_args(tiny_bert, train_file, tmp_path / "out2", "--false_negative_margin", "0.1",
                            "--false_negative_guide", "model", "--guide_model", str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="build_objective needs the loaded --guide_model"):
        _, _, args = parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", "--false_negative_margin",
                                      "0", "--false_negative_guide", "model", "--guide_model", tiny_bert])
        build_objective(args)


def test_a_teacher_guide_needs_scored_training_data(tmp_path):
    unscored = write_jsonl(tmp_path / "plain.jsonl", make_records(4))
    with pytest.raises(DataFormatError, match=r"field 'pos_scores': missing, but --false_negative_guide teacher"):
        train.main(["--model_name_or_path", str(tmp_path / "no-such-model"), "--train_file", unscored,
                    "--output_dir", str(tmp_path / "out"), "--false_negative_margin", "0",
                    "--false_negative_guide", "teacher", "--use_cpu", "true"])

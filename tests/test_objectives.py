"""The objective interface: the ranking objective is today's loss bit for bit, any objective plugs into the
trainer (plain and GradCache steps alike), teacher scores reach it aligned, and its components are logged."""

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import conftest
from conftest import make_records
from finetune.training.config import parse_arguments
from finetune.objectives.losses import ranking_loss
from finetune.objectives.base import EmbeddedBatch, ObjectiveOutput, gather_batch
from finetune.objectives.builtin import RankingObjective, build_objective

ROOT = Path(__file__).resolve().parent.parent


def random_batch(batch=4, k=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query_emb = torch.randn(batch, dim, generator=generator, requires_grad=True)
    doc_emb = torch.randn(batch * (1 + k), dim, generator=generator, requires_grad=True)
    doc_keys = torch.arange(batch * (1 + k))
    return query_emb, doc_emb, doc_keys


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_ranking_objective_is_the_ranking_loss_bit_for_bit(mode):
    query_emb, doc_emb, doc_keys = random_batch()
    doc_keys[5] = doc_keys[1]  # a duplicate: masking goes through unchanged
    output = RankingObjective(scale=33.0, mode=mode)(gather_batch(query_emb, doc_emb, doc_keys, gather=True))
    expected = ranking_loss(query_emb, doc_emb, doc_keys, num_negatives=2, scale=33.0, mode=mode)
    assert torch.equal(output.loss, expected)
    assert torch.equal(output.components["loss_ranking"], expected)


DIRECTION_SETS = [("query_to_doc",), ("query_to_doc", "doc_to_query"), ("query_to_doc", "query_to_query"),
                  ("query_to_doc", "doc_to_doc"), ("query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc")]


@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=lambda d: "+".join(d))
@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_ranking_objective_passes_its_directions_on(tmp_path, mode, directions):
    """The objective wires its in-batch directions into the loss: for every direction set, its loss (built directly
    and from --ranking_directions) is the pure loss function's, on the second of two shards with a repeated query."""
    batch_size, k, shards = 3, 2, 2
    generator = torch.Generator().manual_seed(7)
    all_query_emb = torch.randn(shards * batch_size, 8, generator=generator)
    doc_emb = torch.randn(shards * batch_size * (1 + k), 8, generator=generator)
    query_keys, doc_keys = torch.arange(shards * batch_size), torch.arange(100, 100 + doc_emb.shape[0])
    query_keys[4] = query_keys[0]  # a query of shard 0 repeats in shard 1: masked in the query directions
    local = all_query_emb[batch_size:]
    batch = EmbeddedBatch(local, doc_emb, doc_keys, shard_index=1, num_shards=shards, all_query_emb=all_query_emb,
                          query_keys=query_keys)
    expected = ranking_loss(local, doc_emb, doc_keys, num_negatives=k, scale=5.0, mode=mode, shard_index=1,
                            num_shards=shards, directions=directions, all_query_emb=all_query_emb, query_keys=query_keys)
    _, _, args = parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", "--temperature", str(1 / 5.0),
                                  "--hard_negatives_mode", mode, "--ranking_directions", ",".join(directions)])
    for objective in (RankingObjective(scale=5.0, mode=mode, directions=directions), build_objective(args)):
        output = objective(batch)
        assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6), objective
        assert output.components["loss_ranking"].item() == pytest.approx(expected.item(), abs=1e-6)
    if len(directions) > 1:  # the directions change the loss on this batch: dropping them could not pass
        only_query_to_doc = ranking_loss(local, doc_emb, doc_keys, num_negatives=k, scale=5.0, mode=mode,
                                         shard_index=1, num_shards=shards)
        assert abs(expected.item() - only_query_to_doc.item()) > 0.05


def test_gather_batch_in_one_process_is_the_local_batch():
    query_emb, doc_emb, doc_keys = random_batch()
    scores = torch.rand(doc_emb.shape[0])
    batch = gather_batch(query_emb, doc_emb, doc_keys, scores, gather=True)
    assert (batch.shard_index, batch.num_shards, batch.num_negatives) == (0, 1, 2)
    assert batch.doc_emb is doc_emb and batch.doc_scores is scores


def test_build_objective_reads_temperature_and_mode(tmp_path):
    _, _, args = parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", "--temperature", "0.025",
                                  "--hard_negatives_mode", "exclusive"])
    objective = build_objective(args)
    assert (objective.scale, objective.mode) == (40.0, "exclusive")


class TeacherMatching:
    """A stand-in for a distillation objective: MSE between student cosine scores and the teacher's doc_scores."""

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        assert batch.doc_scores is not None
        k = batch.num_negatives
        query = F.normalize(batch.query_emb.float(), dim=-1)
        docs = F.normalize(batch.doc_emb.float(), dim=-1)
        size = query.shape[0]
        positives, negatives = docs[:size], docs[size:].view(size, k, -1)
        student = torch.cat([(query * positives).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", query, negatives)], 1)
        teacher = torch.cat([batch.doc_scores[:size, None], batch.doc_scores[size:].view(size, k)], 1)
        loss = F.mse_loss(student, teacher)
        return ObjectiveOutput(loss, {"loss_teacher": loss})


def scored_records(count, k=3, seed=4):
    records = make_records(count, num_negatives=k, seed=seed)
    for index, record in enumerate(records):
        record["pos_scores"] = [0.9 - 0.01 * index]
        record["neg_scores"] = [0.1 * n - 0.05 * index for n in range(k)]
    return records


def make_trainer(model_path, tmp_path, objective=None, **overrides):
    return conftest.make_trainer(model_path, tmp_path, records=scored_records(8), objective=objective, **overrides)


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_any_objective_plugs_in_and_gradcache_needs_no_change(tiny_bert, tmp_path):
    """A custom objective that reads teacher scores: the plain and the cached step give the same loss and gradients."""
    trainer, model, batch = make_trainer(tiny_bert, tmp_path / "p", TeacherMatching())
    expected_scores = torch.tensor([0.9 - 0.01 * i for i in range(8)])
    assert torch.allclose(batch["doc_scores"][:8], expected_scores)  # positives' teacher scores, in batch order
    cached_trainer, cached_model, _ = make_trainer(tiny_bert, tmp_path / "c", TeacherMatching(),
                                                   gradcache_mini_batch_size=5)
    for module in (model, cached_model):  # the steps call model.train(); the tiny BERT's dropout is turned off
        for layer in module.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
    plain_loss = trainer.training_step(model, batch).item()
    plain = gradients(model)
    cached_loss = cached_trainer.training_step(cached_model, batch).item()
    assert cached_loss == pytest.approx(plain_loss, abs=1e-6)
    torch.testing.assert_close(gradients(cached_model), plain, atol=1e-6, rtol=1e-5)
    reference = TeacherMatching()(gather_batch(model(batch["query_input_ids"], batch["query_attention_mask"]),
                                               model(batch["doc_input_ids"], batch["doc_attention_mask"]),
                                               doc_scores=batch["doc_scores"], gather=False)).loss
    assert plain_loss == pytest.approx(reference.item(), abs=1e-6)
    assert trainer.components.pop_means().keys() == {"loss_teacher"}


def test_components_are_logged_and_in_the_model_card(tiny_bert, train_file, tmp_path):
    from finetune import train

    output_dir = tmp_path / "out"
    train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(output_dir),
                "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--use_cpu", "true",
                "--report_to", "none", "--save_steps", "100"])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    for entry in logged:  # one objective: its only component is the loss itself
        assert entry["loss_ranking"] == pytest.approx(entry["loss"], rel=1e-4)
    card = (output_dir / "README.md").read_text()
    assert "| step | epoch | training loss | loss_ranking |" in card
    assert f"| {logged[0]['loss_ranking']:.4f} |" in card


def code_lines_of_class(path: Path, name: str) -> int:
    """Lines of code of a class: without blank lines, comments and docstrings."""
    source = path.read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == name)
    docstrings = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(inner) is not None:
            docstrings.update(range(inner.body[0].lineno, inner.body[0].end_lineno + 1))
    lines = source.splitlines()[node.lineno - 1:node.end_lineno]
    return sum(1 for number, line in enumerate(lines, start=node.lineno)
               if line.strip() and not line.strip().startswith("#") and number not in docstrings)


def test_trainer_stays_thin():
    """The Trainer subclass only encodes, gathers and calls the objective; logic lives in the modules it delegates to."""
    assert code_lines_of_class(ROOT / "finetune" / "training" / "trainer.py", "EmbeddingTrainer") <= 100

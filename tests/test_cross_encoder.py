"""Cross-encoder (reranker) training: the same records and entry point, a folder sentence-transformers'
CrossEncoder loads with our scores, the losses by hand, resume, and the refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_records, write_jsonl
from finetune import train
from finetune.data.columns import load_raw_dataset, tokenize_dataset
from finetune.data.text import TextSide
from finetune.model.cross_encoder import CrossEncoderModel
from finetune.objectives.reranking import RerankerObjective, group_scores, listwise_loss, pointwise_loss
from finetune.training.config import ConfigError

QUERIES = ["alpha beta gamma river", "python function returns list of items"]
DOCUMENTS = ["river stone water flows under the old bridge by the mill", "returns a list"]


def run_args(model, train_file, output_dir, *extra):
    return ["--model_type", "cross-encoder", "--model_name_or_path", model, "--train_file", train_file,
            "--output_dir", str(output_dir), "--per_device_train_batch_size", "4", "--num_hard_negatives", "2",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--logging_steps", "5", "--save_steps", "3",
            "--use_cpu", "true", "--report_to", "none", "--query_max_length", "12", "--passage_max_length", "20",
            *extra]


def test_group_scores_and_losses_by_hand():
    scores = torch.tensor([2.0, 0.5, 1.0, -1.0, 0.0, 3.0])  # B=2, k=2: positives, then q0's and q1's negatives
    groups = group_scores(scores, 2)
    assert groups.tolist() == [[2.0, 1.0, -1.0], [0.5, 0.0, 3.0]]
    expected = -(torch.log_softmax(groups, dim=1)[:, 0]).mean()
    assert listwise_loss(groups).item() == pytest.approx(expected.item(), abs=1e-7)
    bce = [-torch.log(torch.sigmoid(torch.tensor(2.0))), -torch.log(1 - torch.sigmoid(torch.tensor(1.0))),
           -torch.log(1 - torch.sigmoid(torch.tensor(-1.0))), -torch.log(torch.sigmoid(torch.tensor(0.5))),
           -torch.log(1 - torch.sigmoid(torch.tensor(0.0))), -torch.log(1 - torch.sigmoid(torch.tensor(3.0)))]
    assert pointwise_loss(groups).item() == pytest.approx(torch.stack(bce).mean().item(), abs=1e-6)


def test_distillation_adds_kl_to_the_teacher_scores_at_scale_one():
    scores = torch.tensor([2.0, 0.5, 1.0, -1.0, 0.0, 3.0])
    teacher = torch.tensor([5.0, 4.0, 1.0, 0.0, 2.0, 1.0])  # the same layout
    objective = RerankerObjective(distillation="kl", distillation_weight=0.5, ranking_weight=2.0)
    output = objective(scores, 2, teacher)
    student, target = group_scores(scores, 2), group_scores(teacher, 2)
    kl = F.kl_div(F.log_softmax(student, 1), F.log_softmax(target, 1), reduction="batchmean", log_target=True)
    assert output.components["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert output.loss.item() == pytest.approx(2.0 * listwise_loss(student).item() + 0.5 * kl.item(), abs=1e-6)


def test_pairs_are_tokenized_as_cross_encoder_predict_tokenizes_them(tiny_bert, tmp_path):
    from sentence_transformers import CrossEncoder

    records = [{"question": q, "pos_doc": [d], "neg_doc": [DOCUMENTS[1 - i]]} for i, (q, d) in
               enumerate(zip(QUERIES, DOCUMENTS))]
    model = CrossEncoderModel.from_pretrained(tiny_bert, max_length=16)
    tokenized = tokenize_dataset(load_raw_dataset(write_jsonl(tmp_path / "d.jsonl", records)), model.tokenizer,
                                 query=TextSide("q: "), document=TextSide("d: "), pair_max_length=16)
    theirs = CrossEncoder(tiny_bert, num_labels=1, max_length=16).tokenizer(
        ["q: " + QUERIES[0], "q: " + QUERIES[0]], ["d: " + DOCUMENTS[0], "d: " + DOCUMENTS[1]], truncation=True,
        max_length=16)
    row = tokenized[0]
    assert [row["pos_input_ids"][0], row["neg_input_ids"][0]] == theirs["input_ids"]
    # Segment ids as the tokenizer gives them; a tokenizer without them gets zeros (what BERT uses when none come).
    segments = theirs.get("token_type_ids") or [[0] * len(ids) for ids in theirs["input_ids"]]
    assert [row["pos_token_type_ids"][0], row["neg_token_type_ids"][0]] == segments
    assert max(len(ids) for ids in theirs["input_ids"]) == 16  # the long document was cut


@pytest.mark.parametrize("loss, activation", [("listwise", torch.nn.Identity), ("pointwise", torch.nn.Sigmoid)])
def test_trained_folder_loads_with_cross_encoder_and_predict_equals_our_scores(tiny_bert, train_file, validation_file,
                                                                                 tmp_path, loss, activation):
    from sentence_transformers import CrossEncoder

    output_dir = tmp_path / "out"
    before = CrossEncoderModel.from_pretrained(tiny_bert, max_length=32)
    metrics = train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "30", "--reranker_loss", loss,
                                  "--validation_file", validation_file))
    ours = CrossEncoderModel.from_pretrained(str(output_dir), max_length=32)
    theirs = CrossEncoder(str(output_dir))
    assert theirs.max_seq_length == 32  # query_max_length + passage_max_length
    assert isinstance(theirs.activation_fn, activation)
    expected = activation()(ours.score(QUERIES, DOCUMENTS))
    torch.testing.assert_close(torch.as_tensor(theirs.predict(list(zip(QUERIES, DOCUMENTS)))), expected,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before.model.bert.embeddings.word_embeddings.weight,
                              ours.model.bert.embeddings.word_embeddings.weight)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evals = [entry["eval_ndcg@10"] for entry in state["log_history"] if "eval_ndcg@10" in entry]
    assert evals[-1] > evals[0]  # the base model (a new head) first: reranking its own candidates got better
    assert metrics["eval_ndcg@10"] == evals[-1]
    card = (output_dir / "README.md").read_text()
    assert "pipeline_tag: text-ranking" in card and "CrossEncoder(" in card
    run = json.loads((output_dir / "training_run.json").read_text())
    assert run["model_type"] == "cross-encoder" and run["reranker_loss"] == loss


def test_cross_encoder_training_resumes_where_it_stopped(tiny_bert, train_file, tmp_path):
    output_dir = tmp_path / "out"
    train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "3"))
    train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "6"))
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [5]  # steps 4-6 only: resumed


@pytest.mark.parametrize("extra, message", [
    (["--gradcache_mini_batch_size", "2"], "--gradcache_mini_batch_size: bi-encoder options"),
    (["--num_hard_negatives", "0"], "--num_hard_negatives must be >= 1"),
    (["--matryoshka_dims", "16"], "--matryoshka_dims: bi-encoder options"),
])
def test_bi_encoder_options_are_refused_for_a_cross_encoder(tiny_bert, train_file, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        train.main(run_args(tiny_bert, train_file, tmp_path / "out", *extra))


@pytest.mark.parametrize("extra, message", [
    (["--lora_r", "4"], "apply to bi-encoders"),
    (["--reranker_loss", "pairwise"], "--reranker_loss must be one of"),
])
def test_bad_reranker_options_end_in_one_line_errors(tiny_bert, train_file, tmp_path, extra, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        train.main(run_args(tiny_bert, train_file, tmp_path / "out", *extra))


def test_records_without_negatives_are_named_before_training(tiny_bert, tmp_path):
    from finetune.data.schema import DataFormatError

    records = make_records(6, seed=4)
    records[3]["neg_doc"] = []
    data = write_jsonl(tmp_path / "no_negatives.jsonl", records)
    with pytest.raises(DataFormatError, match=r"no_negatives.jsonl, line 4, field 'neg_doc'"):
        train.main(run_args(tiny_bert, data, tmp_path / "out", "--max_steps", "1"))

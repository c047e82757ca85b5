"""train.main() end to end on the tiny BERT: trains, checkpoints, resumes, refuses to clobber."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune import train
from finetune.training.config import ConfigError
from finetune.model.embedding_model import EmbeddingModel

TEXTS = ["alpha beta gamma river", "python function returns list", "query document passage"]


def run_args(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "2", "--use_cpu", "true",
            "--report_to", "none", "--dataloader_num_workers", "0", *extra]


def test_train_changes_embeddings_saves_checkpoint_and_resumes(tiny_bert, train_file, validation_file, tmp_path):
    output_dir = tmp_path / "out"
    before = EmbeddingModel.from_pretrained(tiny_bert).encode(TEXTS)
    metrics = train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "2",
                                  "--validation_file", validation_file))
    assert metrics["train_samples_per_second"] > 0 and "eval_loss" in metrics
    assert (output_dir / "checkpoint-2" / "model.safetensors").is_file()
    assert (output_dir / "modules.json").is_file()
    after = EmbeddingModel.from_pretrained(str(output_dir)).encode(TEXTS)
    assert (after - before).abs().max() > 1e-4

    # Same command with more steps: resumes at step 2 (NeMo's resume_if_exists) instead of restarting.
    train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "4"))
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged_steps == [1, 2, 3, 4]
    assert state["global_step"] == 4


def test_resumed_run_ends_where_an_uninterrupted_one_does(tiny_bert, train_file, tmp_path):
    """Resume from the step-2 checkpoint of a 4-step run; the final weights must equal the straight run's."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--max_steps", "4", "--num_train_epochs", "1")
    train.main(run_args(tiny_bert, train_file, straight, *args))
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train.main(run_args(tiny_bert, train_file, resumed, *args))
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[key].float() - b[key].float()).abs().max().item() for key in a) < 1e-6
    assert not torch.equal(a["embeddings.word_embeddings.weight"],
                           load_file(str(straight / "checkpoint-2" / "model.safetensors"))["embeddings.word_embeddings.weight"])


def test_refuses_non_empty_output_dir_without_checkpoint(tiny_bert, train_file, tmp_path):
    output_dir = tmp_path / "busy"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    with pytest.raises(train.OutputDirError, match="not empty and holds no checkpoint"):
        train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "1"))
    assert (output_dir / "notes.txt").read_text() == "keep me"
    train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert (output_dir / "modules.json").is_file()


def test_bad_data_stops_before_the_model_loads(tiny_bert, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "pos_doc": []}\n', encoding="utf-8")
    monkeypatch.setattr(EmbeddingModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    from finetune.data.schema import DataFormatError
    with pytest.raises(DataFormatError, match="line 1, field 'pos_doc'"):
        train.main(run_args(tiny_bert, str(bad), tmp_path / "out", "--max_steps", "1"))


def test_evaluation_during_training_logs_retrieval_metrics_and_keeps_the_best(tiny_bert, train_file, validation_file,
                                                                           tmp_path):
    output_dir = tmp_path / "out"
    metrics = train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "4", "--validation_file",
                                  validation_file, "--eval_strategy", "steps", "--eval_steps", "2",
                                  "--load_best_model_at_end", "true", "--save_total_limit", "5"))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_ndcg@10" in entry]
    assert [entry["step"] for entry in evals] == [0, 2, 4, 4]  # base model, two evaluations, the final one
    for entry in evals:
        assert {"eval_loss", "eval_mrr@10", "eval_recall@100", "eval_map@100", "eval_ingroup_mrr"} <= entry.keys()
        assert 0.0 <= entry["eval_ndcg@10"] <= 1.0
    best_step = max((2, 4), key=lambda step: next(e["eval_ndcg@10"] for e in evals if e["step"] == step))
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    # The saved model is the best checkpoint's, and the final evaluation scores it.
    best = load_file(str(output_dir / f"checkpoint-{best_step}" / "model.safetensors"))
    final = load_file(str(output_dir / "model.safetensors"))
    assert all(torch.equal(best[key], final[key]) for key in best)
    assert metrics["eval_ndcg@10"] == pytest.approx(state["best_metric"])


def test_padded_and_padding_free_training_agree_and_group_by_length_trains(tiny_bert_without_dropout, train_file,
                                                                          tmp_path):
    """Two steps with --padding_free true/false give the same weights (dropout off); group_by_length runs."""
    runs = {}
    for name, extra in {"packed": ("--padding_free", "true"), "padded": ("--padding_free", "false"),
                        "grouped": ("--train_sampling_strategy", "group_by_length")}.items():
        train.main(run_args(tiny_bert_without_dropout, train_file, tmp_path / name, "--max_steps", "2", *extra))
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert max((runs["packed"][k] - runs["padded"][k]).abs().max().item() for k in runs["packed"]) < 1e-5
    with pytest.raises(ConfigError, match="train_sampling_strategy batch_rebalance is not supported"):
        train.main(run_args(tiny_bert_without_dropout, train_file, tmp_path / "rebalance", "--max_steps", "1",
                            "--train_sampling_strategy", "batch_rebalance"))


def test_evaluate_command_on_the_output_equals_the_final_evaluation(tiny_bert, train_file, validation_file, tmp_path):
    """One retrieval stack: ``python -m finetune.evaluate`` on a trained folder, with its defaults, gives the metrics
    of the training's final evaluation (same encoding batches, per-side lengths and prompts, fp32 search)."""
    from finetune.evaluate import __main__ as evaluate

    output_dir = tmp_path / "out"
    metrics = train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "3", "--validation_file",
                                  validation_file, "--query_max_length", "9", "--passage_max_length", "14",
                                  "--query_prefix", "query: ", "--per_device_eval_batch_size", "5"))
    results = evaluate.main(["--model_name_or_path", str(output_dir), "--data", validation_file])
    ours = results[str(output_dir)]
    final = {name.removeprefix("eval_"): value for name, value in metrics.items()
             if name.removeprefix("eval_") in ours}
    assert set(final) == set(ours) - {"seconds"} and "ingroup_mrr" in final
    for name, value in final.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    shorter = evaluate.main(["--model_name_or_path", str(output_dir), "--data", validation_file,
                             "--max_seq_length", "4"])[str(output_dir)]
    assert shorter["ndcg@10"] != ours["ndcg@10"]  # the per-side lengths are what made them equal

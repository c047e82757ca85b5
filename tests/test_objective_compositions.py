"""Every objective composes with GradCache, with 2 processes (== 1 process of double batch), with exact resume,
and reaches the model card; distillation refuses unscored data before the model loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_two_processes, make_records, make_trainer, write_jsonl
from finetune import train
from finetune.data.schema import DataFormatError

ROOT = Path(__file__).resolve().parent.parent
ALL_DIRECTIONS = "query_to_doc,doc_to_query,query_to_query,doc_to_doc"
OBJECTIVES = {
    "kl": dict(distillation="kl", teacher_temperature=2.0),
    "pure_margin_mse": dict(distillation="margin_mse", ranking_weight=0),
    "directions": dict(ranking_directions=ALL_DIRECTIONS),
    "matryoshka_kl_directions": dict(matryoshka_dims="32,16,8", distillation="kl", ranking_directions=ALL_DIRECTIONS),
}


def scored_records(count, num_negatives=3, seed=0):
    """Random records with teacher scores: the positive scores highest, negatives decreasing."""
    records = make_records(count, num_negatives=num_negatives, seed=seed)
    for index, record in enumerate(records):
        record["pos_scores"] = [8.0 - (index % 5) * 0.3]
        record["neg_scores"] = [3.0 - n - (index % 3) * 0.5 for n in range(num_negatives)]
    return records


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", OBJECTIVES)
def test_gradcache_equals_plain_for_every_objective(tiny_bert, tmp_path, name):
    """Dropout on: with one chunk per side the cached step consumes the RNG exactly as the plain one."""
    records = scored_records(10, seed=3)
    trainer, model, batch = make_trainer(tiny_bert, tmp_path / "p", records=records, **OBJECTIVES[name])
    torch.manual_seed(5)
    plain_loss = trainer.training_step(model, batch).item()
    cached_trainer, cached_model, _ = make_trainer(tiny_bert, tmp_path / "c", records=records,
                                                   gradcache_mini_batch_size=1000, **OBJECTIVES[name])
    torch.manual_seed(5)
    cached_loss = cached_trainer.training_step(cached_model, batch).item()
    assert cached_loss == pytest.approx(plain_loss, abs=1e-5)
    torch.testing.assert_close(gradients(cached_model), gradients(model), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["kl", "matryoshka_kl_directions"])
def test_gradcache_in_small_chunks_equals_plain(tiny_bert_without_dropout, tmp_path, name):
    records = scored_records(10, seed=4)
    trainer, model, batch = make_trainer(tiny_bert_without_dropout, tmp_path / "p", records=records, **OBJECTIVES[name])
    plain_loss = trainer.training_step(model, batch).item()
    cached_trainer, cached_model, _ = make_trainer(tiny_bert_without_dropout, tmp_path / "c", records=records,
                                                   gradcache_mini_batch_size=4, **OBJECTIVES[name])
    assert cached_trainer.training_step(cached_model, batch).item() == pytest.approx(plain_loss, abs=1e-5)
    torch.testing.assert_close(gradients(cached_model), gradients(model), atol=1e-5, rtol=1e-4)


def flags(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def run_args(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(output_dir),
            "--num_hard_negatives", "2", "--learning_rate", "1e-3", "--warmup_steps", "0", "--logging_steps", "1",
            "--use_cpu", "true", "--report_to", "none", "--dataloader_num_workers", "0", *extra]


def test_two_processes_equal_one_process_of_double_batch(tiny_bert_without_dropout, tmp_path):
    """All directions + KL distillation + Matryoshka, global negatives: queries, documents and scores are gathered."""
    train_file = write_jsonl(tmp_path / "train.jsonl", scored_records(24, seed=5))
    common = run_args(tiny_bert_without_dropout, train_file, tmp_path / "x", "--max_steps", "2", "--save_steps", "100",
                      *flags(OBJECTIVES["matryoshka_kl_directions"]))
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    two = launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, "--per_device_train_batch_size", "4",
                                "--output_dir", str(two_dir)])
    assert "World size 2" in two.stdout + two.stderr
    train.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(one_dir)])
    a, b = load_file(str(two_dir / "model.safetensors")), load_file(str(one_dir / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    logs = [[e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e]
            for run in (two_dir, one_dir)]
    for two_log, one_log in zip(*logs):
        for key in ("loss", "loss_ranking_dim8", "loss_distillation_kl_dim32"):
            assert two_log[key] == pytest.approx(one_log[key], abs=1e-4), key


def test_resume_is_exact_and_the_card_shows_quality_by_dimension(tiny_bert, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", scored_records(24, seed=6))
    validation_file = write_jsonl(tmp_path / "validation.jsonl", make_records(8, seed=7))  # no scores: allowed
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
             *flags(OBJECTIVES["matryoshka_kl_directions"])]
    metrics = train.main(run_args(tiny_bert, train_file, straight, *extra, "--validation_file", validation_file))
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train.main(run_args(tiny_bert, train_file, resumed, *extra))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert max((a[key].float() - b[key].float()).abs().max().item() for key in a) < 1e-6
    assert {"eval_ndcg@10_dim32", "eval_ndcg@10_dim16", "eval_ndcg@10_dim8"} <= set(metrics)
    card = (straight / "README.md").read_text()
    assert "| dimensions | nDCG@10 before | nDCG@10 after | MRR@10 after |" in card
    assert "| 8 | " in card and f"{metrics['eval_ndcg@10_dim8']:.4f}" in card
    assert (straight / "matryoshka_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![nDCG@10 versus embedding size](matryoshka_quality.png)" in card


def test_distillation_without_scores_fails_before_the_model_loads(tmp_path):
    unscored = write_jsonl(tmp_path / "plain.jsonl", make_records(4))
    with pytest.raises(DataFormatError, match=r"plain.jsonl, line 1, field 'pos_scores': missing, but --distillation kl"):
        train.main(["--model_name_or_path", str(tmp_path / "no-such-model"), "--train_file", unscored,
                    "--output_dir", str(tmp_path / "out"), "--distillation", "kl", "--use_cpu", "true"])


def test_matryoshka_dims_larger_than_the_model_are_refused(tiny_bert, train_file, tmp_path):
    from finetune.training.config import ConfigError

    with pytest.raises(ConfigError, match=r"--matryoshka_dims \[64\] exceed the model's embedding size 32"):
        train.main(run_args(tiny_bert, train_file, tmp_path / "out", "--matryoshka_dims", "64,16", "--max_steps", "1"))

"""--general_validation: a general-domain set evaluated before and after training, beside the domain validation."""

import json

import pytest

from conftest import make_records, write_jsonl
from finetune import train
from finetune.training.config import ConfigError


def args(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
            "--max_steps", "3", "--save_steps", "3", "--use_cpu", "true", "--report_to", "none", *extra]


def test_general_set_is_reported_apart_before_and_after_and_leaves_domain_metrics_alone(
        tiny_bert, train_file, validation_file, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", make_records(9, seed=11))
    plain = train.main(args(tiny_bert, train_file, tmp_path / "plain", "--validation_file", validation_file))
    checked = train.main(args(tiny_bert, train_file, tmp_path / "checked", "--validation_file", validation_file,
                              "--general_validation", general))
    domain = {name: value for name, value in plain.items() if name.startswith("eval_") and "runtime" not in name
              and "per_second" not in name}
    assert {name: checked[name] for name in domain} == domain  # the domain numbers are untouched
    state = json.loads((tmp_path / "checked" / "trainer_state.json").read_text())
    before = next(entry for entry in state["log_history"] if entry.get("step") == 0 and "eval_ndcg@10" in entry)
    assert 0 <= before["eval_general_ndcg@10"] <= 1 and "eval_general_mrr@10" in checked
    run = json.loads((tmp_path / "checked" / "training_run.json").read_text())
    assert run["forgetting_check"]["files"] == ["general.jsonl"]
    assert run["forgetting_check"]["before"]["ndcg@10"] == before["eval_general_ndcg@10"]
    assert run["forgetting_check"]["after"]["ndcg@10"] == checked["eval_general_ndcg@10"]
    card = (tmp_path / "checked" / "README.md").read_text()
    section = card[card.index("### Forgetting check"):]
    assert f"{before['eval_general_ndcg@10']:.4f} | {checked['eval_general_ndcg@10']:.4f}" in section
    main_table = card[card.index("## Evaluation"):card.index("### Forgetting check")]
    assert "general" not in main_table
    assert json.loads((tmp_path / "plain" / "training_run.json").read_text())["forgetting_check"] is None


def test_general_validation_needs_domain_validation(tiny_bert, train_file, tmp_path):
    general = write_jsonl(tmp_path / "general.jsonl", make_records(5, seed=11))
    with pytest.raises(ConfigError, match="--general_validation needs a --validation_file"):
        train.main(args(tiny_bert, train_file, tmp_path / "out", "--general_validation", general))

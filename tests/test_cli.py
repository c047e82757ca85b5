"""Command-line behaviour: recipes and overrides, clean errors, every option documented in the README."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments

from finetune.training.arguments import DataArguments, EmbeddingTrainingArguments, ModelArguments
from finetune.training.config import DEFAULT_RECIPE, ConfigError, parse_arguments

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_then_command_line_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1.0e-4\nnum_hard_negatives: 3\ntrain_file: [a.jsonl, b.jsonl]\n"
                      "query_prefix: 'query: '\nbf16: false\n")
    model_args, data_args, training_args = parse_arguments([str(recipe), "--learning_rate", "3e-5", "--use_cpu", "true"])
    assert training_args.learning_rate == 3e-5 and data_args.num_hard_negatives == 3
    assert data_args.train_file == ["a.jsonl", "b.jsonl"] and data_args.validation_file is None
    assert data_args.query_prefix == "query: "


def test_json_recipe(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"temperature": 0.02, "hard_negatives_mode": "exclusive"}))
    _, _, training_args = parse_arguments([str(recipe), "--use_cpu", "true"])
    assert training_args.scale == pytest.approx(50.0) and training_args.hard_negatives_mode == "exclusive"


def test_no_arguments_runs_the_example_recipe(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    model_args, data_args, training_args = parse_arguments(None)
    assert training_args.max_steps == 40 and training_args.output_dir == "outputs/example-run"
    assert data_args.train_file[0].endswith("example_data/train.jsonl.gz")
    assert data_args.validation_file[0].endswith("example_data/validation.jsonl.gz")
    assert Path(data_args.train_file[0]).is_file() and Path(data_args.validation_file[0]).is_file()
    assert Path(model_args.model_name_or_path, "modules.json").is_file()  # the packaged MiniLM


def test_unknown_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match="Unknown option.*learning_rat"):
        parse_arguments([str(recipe)])
    recipe.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_arguments([str(recipe)])


@pytest.mark.parametrize("flag, value, message", [
    ("--hard_negatives_mode", "global", "must be one of"),
    ("--temperature", "0", "must be > 0"),
    ("--num_hard_negatives", "-1", "must be >= 0"),
    ("--pooling", "max", "must be one of"),
])
def test_contradictory_or_invalid_values(flag, value, message):
    with pytest.raises(ValueError, match=message):
        parse_arguments([flag, value, "--use_cpu", "true"])


def test_every_option_is_documented_in_readme():
    readme = (ROOT / "docs" / "options.md").read_text()  # the options page (was a README section)
    base = {field.name: field for field in dataclasses.fields(TrainingArguments)}
    ours = [field.name for cls in (ModelArguments, DataArguments) for field in dataclasses.fields(cls)]
    ours += [field.name for field in dataclasses.fields(EmbeddingTrainingArguments)
             if field.name not in base or base[field.name].default != field.default]
    missing = [name for name in ours if f"`--{name}`" not in readme]
    assert not missing, f"options without a README line: {missing}"
    for cls in (ModelArguments, DataArguments, EmbeddingTrainingArguments):
        for field in dataclasses.fields(cls):
            if field.name in ours:
                assert field.metadata.get("help"), f"--{field.name} has no help string"


def test_bad_data_from_the_command_line_is_one_clear_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "pos_doc": ["p"]}\n{"question": 1, "pos_doc": ["p"]}\n')
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "train.py"), "--train_file", str(bad),
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"{bad}, line 2, field 'question': expected a string, got int 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_evaluation_without_validation_data_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="need --validation_file"):
        parse_arguments(["--train_file", "x.jsonl", "--eval_strategy", "steps", "--use_cpu", "true"])


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group in this process, as a command launched with accelerate has one (of 1 process here)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def entry_points(monkeypatch, main):
    """Each command's entry point, with ``main`` as the work it runs."""
    from data_prep import records
    from finetune import train
    from finetune.evaluate import __main__ as evaluate

    monkeypatch.setattr(train, "main", main)
    monkeypatch.setattr(evaluate, "main", main)
    return {"train": train.cli, "evaluate": evaluate.cli, "data_prep": lambda: records.run_cli(main)}


@pytest.mark.parametrize("command", ["train", "evaluate", "data_prep"])
def test_a_command_that_succeeded_ends_its_process_group(process_group, monkeypatch, command):
    """Left to the interpreter's shutdown, the group's teardown can abort a finished process (SIGABRT, see
    finetune.training.distributed.end_process_group); after a failure it is left alone (a dead peer would hang a barrier)."""
    from finetune.training.config import ConfigError

    def fails():
        raise ConfigError("bad option")

    with pytest.raises(SystemExit) as failed:
        entry_points(monkeypatch, fails)[command]()
    assert failed.value.code == 2 and process_group.is_initialized()
    try:
        entry_points(monkeypatch, lambda: None)[command]()
    except SystemExit as exited:  # data_prep's tools exit with their status
        assert exited.code == 0
    assert not process_group.is_initialized()


@pytest.mark.parametrize("option, refused", [(["--lora_r", "4"], "--lora_r is not supported with FSDP yet"),
                                             (["--gradcache_mini_batch_size", "2"],
                                              "--gradcache_mini_batch_size is not supported with FSDP")])
def test_options_that_fsdp_does_not_take_end_in_one_line_before_any_work(option, refused, tiny_bert, train_file,
                                                                        tmp_path, monkeypatch, capsys):
    """Launched with an FSDP config (accelerate says so in ACCELERATE_USE_FSDP): refused with exit code 2 and one
    line, before the data is read (a missing training file is not even noticed), never a traceback."""
    from finetune import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(sys, "argv", ["train.py", "--model_name_or_path", tiny_bert, "--use_cpu", "true",
                                      "--train_file", str(tmp_path / "missing.jsonl"),
                                      "--output_dir", str(tmp_path / "out"), "--report_to", "none", *option])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {refused}") and "\n" not in error, error


@pytest.mark.parametrize("flag, value, allowed", [("--on_non_finite", "ignore", "('stop', 'skip')"),
                                                  ("--global_backprop", "both", "('global', 'local')"),
                                                  ("--attention_kernel", "xformers", "('auto', 'flash_attn'")])
def test_a_value_outside_an_options_choices_is_one_line_naming_them(flag, value, allowed, monkeypatch, capsys):
    """The allowed values come from the module that implements them (monitoring.ON_NON_FINITE,
    distributed.GATHER_MODES, attention_kernels.KERNELS); the refusal is one line and exit code 2."""
    from finetune import train

    monkeypatch.setattr(sys, "argv", ["train.py", flag, value, "--use_cpu", "true"])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error
    assert error.startswith(f"error: {flag} must be one of {allowed}") and repr(value) in error, error

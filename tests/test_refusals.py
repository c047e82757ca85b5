"""Every refusal of the training options: one line naming the option, before any data or model is read; and the
command line turns each into `error: ...` with exit code 2. The list below must cover every `raise` of
finetune/training/arguments.py and finetune/training/config.py (checked), so a new refusal comes with its test."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.training.config import ConfigError, parse_arguments

ROOT = Path(__file__).resolve().parent.parent
VAL = str(ROOT / "data_prep" / "example_data" / "validation.jsonl.gz")

# (the flags, a part of the message); one entry per refusal, in the order of the sources.
REFUSALS = [
    (["--model_type", "poly-encoder"], "--model_type must be one of"),
    (["--model_type", "cross-encoder", "--pooling", "cls"], "apply to bi-encoders"),
    (["--attention", "sideways"], "--attention must be one of"),
    (["--pooling", "median"], "--pooling must be one of"),
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--lora_alpha", "8"], "--lora_alpha / --lora_target_modules need --lora_r"),
    (["--save_adapter_only", "true"], "--save_adapter_only true needs --lora_r"),
    (["--lora_r", "4", "--save_adapter_only", "true", "--attention", "bidirectional"], "cannot keep --attention"),
    (["--lora_r", "4", "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--train_file", VAL, "--train_datasets", '{"name": "a", "files": ["x.jsonl"]}'], "not both"),
    (["--dataset_sampling", "zigzag"], "--dataset_sampling must be one of"),
    (["--dataset_temperature", "2"], "--dataset_temperature needs --dataset_sampling weighted"),
    (["--train_file", VAL, "--eval_retrieval_data", VAL], "--eval_retrieval_data needs a --validation_file"),
    (["--train_file", VAL, "--general_validation", VAL], "--general_validation needs a --validation_file"),
    (["--train_file", VAL, "--eval_corpus_file", VAL], "--eval_corpus_file needs evaluation data"),
    (["--num_hard_negatives", "-1"], "--num_hard_negatives must be >= 0"),
    (["--query_max_length", "1"], "--query_max_length must be at least 2 tokens"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--hard_negatives_mode", "mixed"], "--hard_negatives_mode must be one of"),
    (["--global_backprop", "partial"], "--global_backprop must be one of"),
    (["--gradcache_mini_batch_size", "0"], "--gradcache_mini_batch_size must be >= 1"),
    (["--on_non_finite", "ignore"], "--on_non_finite must be one of"),
    (["--train_sampling_strategy", "batch_rebalance"], "is not supported here"),
    (["--global_batch_size", "33"], "is not divisible by processes x per-device batch"),
    (["--ranking_directions", "doc_to_query"], "--ranking_directions must list distinct values"),
    (["--reranker_loss", "pairwise"], "--reranker_loss must be one of"),
    (["--distillation", "mse"], "--distillation must be one of"),
    (["--ranking_weight", "-1"], "--ranking_weight and --distillation_weight must be >= 0"),
    (["--ranking_weight", "0"], "--ranking_weight 0 leaves nothing to train"),
    (["--teacher_temperature", "0"], "--teacher_temperature must be > 0"),
    (["--matryoshka_weights", "1"], "--matryoshka_weights needs --matryoshka_dims"),
    (["--matryoshka_dims", "a,b"], "--matryoshka_dims takes integers"),
    (["--matryoshka_dims", "64,64"], "--matryoshka_dims must be distinct positive sizes"),
    (["--matryoshka_dims", "64,32", "--matryoshka_weights", "1"], "--matryoshka_weights needs one weight"),
    (["--false_negative_guide", "oracle", "--false_negative_margin", "0"], "--false_negative_guide must be one of"),
    (["--false_negative_guide", "teacher"], "need --false_negative_margin (the filter is off)"),
    (["--false_negative_margin", "inf"], "--false_negative_margin must be a finite number"),
    (["--false_negative_margin", "0", "--false_negative_guide", "model"], "--guide_model PATH go together"),
    (["--hardness_weighting", "-1"], "--hardness_weighting must be >= 0"),
    (["--hardness_weighting", "5", "--ranking_weight", "0", "--distillation", "kl"], "act on the ranking loss"),
    # config.py
    (["{recipe_missing}"], "Cannot read recipe"),
    (["{recipe_list}"], "must be a mapping of option names to values"),
    (["--train_file", VAL, "--eval_strategy", "steps"], "--eval_strategy / --load_best_model_at_end need"),
    (["--model_type", "cross-encoder", "--matryoshka_dims", "16"], "bi-encoder options"),
    (["--model_type", "cross-encoder", "--num_hard_negatives", "0"], "--num_hard_negatives must be >= 1"),
    (["--no_such_option", "1"], "Unknown option(s)"),
    (["--train_sampling_strategy", "balanced"], "invalid choice: 'balanced'"),  # argparse's own, as one line
]
NOT_REACHABLE_ON_CPU = {"check_precision_support", "launch_defaults"}  # tested in test_out_of_memory / test_deepspeed


def resolve(flags, tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    names = {"{recipe_missing}": str(tmp_path / "absent.yaml"), "{recipe_list}": str(tmp_path / "list.yaml")}
    return [names.get(flag, flag) for flag in flags]


@pytest.mark.parametrize("flags, message", REFUSALS, ids=[message for _, message in REFUSALS])
def test_each_refusal_is_one_line_naming_the_problem(flags, message, tmp_path):
    argv = resolve(flags, tmp_path)
    if not argv[0].endswith(".yaml"):
        argv += ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    with pytest.raises(ConfigError) as caught:
        parse_arguments(argv)
    assert message in str(caught.value) and "\n" not in str(caught.value).strip()


def test_every_raise_of_the_option_checks_has_a_case():
    """Counts the `raise` statements of the two modules: one per case, plus _parse's re-raise of the dataclasses'
    errors as ConfigError (functions the CPU cannot reach aside)."""
    raises = []
    for path in (ROOT / "finetune" / "training" / "arguments.py", ROOT / "finetune" / "training" / "config.py"):
        tree = ast.parse(path.read_text())
        skipped = {id(node) for function in ast.walk(tree) if isinstance(function, ast.FunctionDef)
                   and function.name in NOT_REACHABLE_ON_CPU for node in ast.walk(function)}
        raises += [node for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None
                   and id(node) not in skipped]
    assert len(raises) == len(REFUSALS) + 1, "a refusal without a case in REFUSALS (or a case without its refusal)"


def test_the_command_line_ends_a_refusal_with_one_line_and_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "finetune" / "train.py"), "--temperature", "0",
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --temperature must be > 0, got 0.0."], result.stderr[-2000:]

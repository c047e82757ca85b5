"""Parse arguments from an optional YAML/JSON recipe file plus command-line overrides.

``python finetune/train.py recipe.yaml --learning_rate 1e-5``: the recipe's keys become flags
placed before the command line's, so the command line wins. Unknown keys are errors. With no
arguments at all, the default job's recipe (``recipes/example.yaml``) is used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from finetune.training.arguments import DataArguments, EmbeddingTrainingArguments, ModelArguments

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "example.yaml")


class ConfigError(ValueError):
    """Options that cannot be used: an unreadable recipe, an unknown option, an invalid value."""


def recipe_to_flags(path: str) -> list[str]:
    """A recipe's ``key: value`` mapping as ``["--key", "value", ...]`` (lists expand, dicts become JSON)."""
    try:
        content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"Cannot read recipe {path}: {error}") from None
    if content is None:
        return []
    if not isinstance(content, dict):
        raise ConfigError(f"Recipe {path} must be a mapping of option names to values, got {type(content).__name__}.")
    flags: list[str] = []
    for key, value in content.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, list):  # mappings in a list (e.g. train_datasets) travel as JSON objects
            flags.extend(json.dumps(item) if isinstance(item, dict) else str(item) for item in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launch_defaults() -> list[str]:
    """Flags that the launch environment calls for; they go first, so recipes and the command line override them.

    Several processes and no CUDA (GPU launches get nothing):
    - DeepSpeed: with no backend named, accelerate starts DeepSpeed's process group but counts a
      single process, and DeepSpeed then rejects the batch size ("train_batch_size ... 4 != 4 * 1 * 2").
      ``--ddp_backend gloo`` makes the Trainer's accelerate state count every process.
    - Plain data parallelism: without ``--use_cpu true`` each process would train alone (world
      size 1, all writing the same folder); ``--use_cpu true`` joins them in one gloo group.
    """
    deepspeed = _env_flag("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and _env_flag("ACCELERATE_USE_CPU"):
        raise ConfigError("ACCELERATE_USE_CPU=true turns DeepSpeed off silently (accelerate then trains with plain "
                          "data parallelism); unset it. Without CUDA, DeepSpeed runs on the CPU anyway.")
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return []
    return ["--ddp_backend", "gloo"] if deepspeed else ["--use_cpu", "true"]


class OptionParser(HfArgumentParser):
    """HfArgumentParser whose errors (a value outside an option's choices, a missing value) are one-line
    ConfigErrors, not argparse's usage dump and SystemExit."""

    def error(self, message: str):
        raise ConfigError(f"{message}; `python finetune/train.py --help` lists the options.")


def build_parser() -> HfArgumentParser:
    # No abbreviations: a misspelt recipe key must be an error, not silently another option.
    return OptionParser((ModelArguments, DataArguments, EmbeddingTrainingArguments), allow_abbrev=False)


def parse_arguments(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, EmbeddingTrainingArguments]:
    """Parse ``[recipe_file] [--flag value ...]`` into the three argument dataclasses.

    No arguments at all means the default job: the recipe ``recipes/example.yaml``. The launcher's
    defaults (``launch_defaults``) come before the recipe's flags, which come before the command line's.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = [DEFAULT_RECIPE]
    if argv and argv[0].endswith(RECIPE_SUFFIXES) and not argv[0].startswith("-"):
        argv = recipe_to_flags(argv[0]) + argv[1:]
    argv = launch_defaults() + argv
    parsed = _parse(argv)
    if parsed[1].has_validation and "--eval_on_start" not in argv:
        # With validation data, evaluate the base model first so the gain is visible (flags may override).
        parsed = _parse(["--eval_on_start", "true"] + argv)
    model_args, data_args, training_args = parsed
    if model_args.model_type == "cross-encoder":
        check_cross_encoder_options(data_args, training_args)
    evaluates = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    if not data_args.has_validation and (evaluates or training_args.load_best_model_at_end):
        raise ConfigError("--eval_strategy / --load_best_model_at_end need --validation_file (or pass "
                          "--eval_strategy no).")
    return parsed


def check_cross_encoder_options(data_args: DataArguments, training_args: EmbeddingTrainingArguments) -> None:
    """What a cross-encoder cannot do: options of the bi-encoder's in-batch loss and embeddings, and groups without
    negatives (its losses rank or classify each positive against its own hard negatives)."""
    bi_encoder_only = [name for name, used in (
        ("--gradcache_mini_batch_size", training_args.gradcache_mini_batch_size),
        ("--matryoshka_dims", training_args.matryoshka_dims),
        ("--ranking_directions", list(training_args.ranking_directions) != ["query_to_doc"]),
        ("--false_negative_margin", training_args.false_negative_margin is not None),
        ("--hardness_weighting", training_args.hardness_weighting != 0)) if used]
    if bi_encoder_only:
        raise ConfigError(f"{', '.join(bi_encoder_only)}: bi-encoder options; a cross-encoder scores each pair on its "
                          "own. Drop them, or train with --model_type bi-encoder.")
    if data_args.num_hard_negatives < 1:
        raise ConfigError(f"--model_type cross-encoder ({training_args.reranker_loss} loss) learns from each "
                          "query's hard negatives: --num_hard_negatives must be >= 1 (mine them with "
                          "`python -m data_prep.mine`).")


def _parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, EmbeddingTrainingArguments]:
    try:
        *parsed, unknown = build_parser().parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # raised by the dataclasses' __post_init__ checks
        raise ConfigError(str(error)) from None
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown}; `python finetune/train.py --help` lists them all.")
    return tuple(parsed)

"""Every recipe in finetune/recipes parses, says how to launch it, and trains two steps on the tiny model."""

import json
import re
from pathlib import Path

import pytest

from conftest import make_records, write_jsonl
from finetune import train
from finetune.training.config import parse_arguments

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "finetune" / "recipes").glob("*.yaml"))
TINY_OVERRIDES = ["--max_steps", "2", "--use_cpu", "true", "--bf16", "false", "--query_max_length", "16",
                  "--passage_max_length", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
                  "--report_to", "none", "--dataloader_num_workers", "0"]


def test_the_recipes_are_there():
    assert {path.name for path in RECIPES} >= {"example.yaml", "e5_large_nemo.yaml", "bge_base.yaml", "bge_small.yaml",
                                               "minilm_cpu.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_header_and_readme_state_launch_and_batch_arithmetic(recipe):
    """The comment header names how to launch the recipe and its effective batch, matching its values."""
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    _, data_args, training_args = parse_arguments([str(recipe), "--use_cpu", "true", "--bf16", "false"])
    if recipe.name != "example.yaml":  # the default job is launched without arguments
        launch = r"(accelerate launch --config_file accelerate_configs/\w+\.yaml|python) finetune/train\.py"
        assert re.search(launch + r"[\s\\#]*finetune/recipes/" + re.escape(recipe.name), header)
        batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
        assert f"1 x {batch} x {accumulation} = {batch * accumulation}" in header
        k = data_args.num_hard_negatives
        negatives = batch - 1 + k if training_args.hard_negatives_mode == "exclusive" else batch * (1 + k) - 1
        assert re.search(rf"Negatives each query sees.*\n?.*= {negatives}\b", header), negatives
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Recipes"):]
    assert f"`{recipe.name}`" in section[:section.index("\n## ", 1)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_trains_two_steps_on_the_tiny_model(recipe, tiny_bert, tmp_path):
    """Decoder recipes train on a tiny decoder of their family, the others on a tiny BERT."""
    from conftest import build_tiny_decoder

    family = next((name for name in ("qwen3", "llama") if name in recipe.stem), None)
    tiny = build_tiny_decoder(str(tmp_path / "decoder"), family) if family else tiny_bert
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(16, seed=31))
    validation_file = write_jsonl(tmp_path / "validation.jsonl", make_records(8, seed=32))
    output_dir = tmp_path / "out"
    model_args, data_args, training_args = parse_arguments([str(recipe), "--use_cpu", "true", "--bf16", "false"])
    metrics = train.main([str(recipe), "--model_name_or_path", tiny, "--train_file", train_file,
                          "--validation_file", validation_file, "--output_dir", str(output_dir), *TINY_OVERRIDES])
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics
    # The recipe's model settings reached the saved SentenceTransformer folder.
    prompts = json.loads((output_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": data_args.query_prefix, "document": data_args.passage_prefix}
    pooling = json.loads((output_dir / "1_Pooling" / "config.json").read_text())
    expected_pooling = model_args.pooling or ("lasttoken" if family else "mean")
    assert pooling[{"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "lasttoken": "pooling_mode_lasttoken"}[expected_pooling]] is True
    if model_args.attention:  # the recipe's attention reached the saved config
        saved = json.loads((output_dir / "config.json").read_text())
        assert saved["is_causal"] is (model_args.attention == "causal")
    assert (output_dir / "2_Normalize").is_dir() == (model_args.normalize is not False)
    card = (output_dir / "README.md").read_text()
    assert f"| Temperature | {training_args.temperature} " in card
    assert f"`{training_args.hard_negatives_mode}`" in card

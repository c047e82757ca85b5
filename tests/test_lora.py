"""LoRA adapters: only adapter weights change, the merged output equals the adapted model (and loads in
sentence-transformers without peft), resume is exact, 2 processes == 1 process, BERT and decoders alike."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_decoder, launch_two_processes
from finetune import train
from finetune.lora import LoraSettings
from finetune.modeling import EmbeddingModel

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["alpha beta gamma river", "python function returns list", "query document passage"]


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    return build_tiny_decoder(str(tmp_path_factory.mktemp("lora_qwen3")), "qwen3")


def run_args(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-2",
            "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu", "true", "--report_to", "none",
            "--dataloader_num_workers", "0", "--lora_r", "4", *extra]


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_qwen3"])
def test_only_adapters_train_and_the_merged_output_is_the_adapted_model(model, train_file, tmp_path, request):
    path = request.getfixturevalue(model)
    output_dir = tmp_path / "out"
    train.main(run_args(path, train_file, output_dir, "--max_steps", "3", "--save_steps", "100"))
    base, merged = load_file(str(Path(path) / "model.safetensors")), load_file(str(output_dir / "model.safetensors"))
    assert merged.keys() == base.keys()  # plain weights under the base model's names: no peft needed to load
    changed = [key for key in base if not torch.equal(base[key], merged[key])]
    assert changed and all(any(name in key for name in ("proj", "query", "key", "value", "dense")) for key in changed)
    assert not any("embed" in key or "norm" in key.lower() for key in changed)  # only adapted layers moved
    adapted = EmbeddingModel.from_pretrained(path, lora=LoraSettings(4, 8.0))
    adapted.load_encoder_weights(str(output_dir))  # the saved adapter on the unchanged base weights
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    from sentence_transformers import SentenceTransformer

    theirs = torch.from_numpy(SentenceTransformer(str(output_dir), device="cpu").encode(TEXTS))
    torch.testing.assert_close(adapted.encode(TEXTS), theirs, atol=1e-5, rtol=1e-4)


def test_resume_with_lora_is_exact(tiny_qwen3, train_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--max_steps", "4", "--save_steps", "2")
    train.main(run_args(tiny_qwen3, train_file, straight, *extra))
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train.main(run_args(tiny_qwen3, train_file, resumed, *extra))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert max((a[key] - b[key]).abs().max().item() for key in a) < 1e-6
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


def test_two_processes_equal_one_process_with_lora(tiny_bert_without_dropout, train_file, tmp_path):
    common = run_args(tiny_bert_without_dropout, train_file, tmp_path / "x", "--max_steps", "2", "--save_steps", "100",
                      "--lora_dropout", "0", "--gradient_checkpointing", "true")
    launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, "--output_dir", str(tmp_path / "two")])
    train.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert max((a[key] - b[key]).abs().max().item() for key in a) < 1e-5


def test_lora_options_are_checked():
    from finetune.config import ConfigError, parse_arguments

    with pytest.raises(ConfigError, match="--lora_r must be >= 1"):
        parse_arguments(["--use_cpu", "true", "--lora_r", "0"])
    with pytest.raises(ConfigError, match="need --lora_r"):
        parse_arguments(["--use_cpu", "true", "--lora_alpha", "16"])
    model_args, _, _ = parse_arguments(["--use_cpu", "true", "--lora_r", "8", "--lora_target_modules", "q_proj,v_proj"])
    assert model_args.lora == LoraSettings(8, 16.0, 0.05, ("q_proj", "v_proj"))


def test_all_linear_leaves_the_unused_pooler_alone(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert, lora=LoraSettings(4, 8.0, 0.0, ("all-linear",)))
    adapted = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapted and not any("pooler" in name for name in adapted)
    assert any("intermediate" in name for name in adapted)

"""LoRA adapters: only adapter weights change, the merged output equals the adapted model (and loads in
sentence-transformers without peft), the merge from a state dict equals peft's own, an adapter-only folder loads
in sentence-transformers on its base model, resume is exact, 2 processes == 1 process, BERT and decoders alike.
LoRA under DeepSpeed ZeRO-2/3: tests/test_deepspeed.py."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_two_processes
from finetune import train
from finetune.model.lora import LoraSettings, merge_lora_weights
from finetune.model.embedding_model import EmbeddingModel

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["alpha beta gamma river", "python function returns list", "query document passage"]


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


@pytest.mark.parametrize("form", ["merged", "adapter_only"])
def test_resume_with_lora_is_exact(form, tiny_qwen3, train_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--max_steps", "4", "--save_steps", "2", *(("--save_adapter_only", "true") if form == "adapter_only" else ()))
    train.main(run_args(tiny_qwen3, train_file, straight, *extra))
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train.main(run_args(tiny_qwen3, train_file, resumed, *extra))
    weights = "model.safetensors" if form == "merged" else "adapter_model.safetensors"
    a, b = load_file(str(straight / weights)), load_file(str(resumed / weights))
    assert a.keys() == b.keys()
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
    from finetune.training.config import ConfigError, parse_arguments

    with pytest.raises(ConfigError, match="--lora_r must be >= 1"):
        parse_arguments(["--use_cpu", "true", "--lora_r", "0"])
    with pytest.raises(ConfigError, match="need --lora_r"):
        parse_arguments(["--use_cpu", "true", "--lora_alpha", "16"])
    with pytest.raises(ConfigError, match="--save_adapter_only true needs --lora_r"):
        parse_arguments(["--use_cpu", "true", "--save_adapter_only", "true"])
    model_args, _, _ = parse_arguments(["--use_cpu", "true", "--lora_r", "4", "--save_adapter_only", "true"])
    assert model_args.lora == LoraSettings(4, 8.0, 0.05, None, save_adapter_only=True)
    model_args, _, _ = parse_arguments(["--use_cpu", "true", "--lora_r", "8", "--lora_target_modules", "q_proj,v_proj"])
    assert model_args.lora == LoraSettings(8, 16.0, 0.05, ("q_proj", "v_proj"))


def test_all_linear_leaves_the_unused_pooler_alone(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert, lora=LoraSettings(4, 8.0, 0.0, ("all-linear",)))
    adapted = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapted and not any("pooler" in name for name in adapted)
    assert any("intermediate" in name for name in adapted)


def with_trained_adapters(model: EmbeddingModel) -> EmbeddingModel:
    """Random adapter weights (peft starts B at zero, where every merge is a no-op)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_qwen3"])
def test_merge_from_a_state_dict_equals_peft_merge(model, request):
    path = request.getfixturevalue(model)
    settings = LoraSettings(4, 12.0, 0.0)  # scaling alpha/r = 3, unlike 1, alpha, 1/r or r/alpha
    lora_model = with_trained_adapters(EmbeddingModel.from_pretrained(path, lora=settings))
    state = lora_model.encoder_state_dict()  # keys as the Trainer hands them over (gathered under ZeRO-3)
    merged = merge_lora_weights(state, settings.scaling)
    reference = copy.deepcopy(lora_model.encoder).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert max((merged[key] - reference[key]).abs().max().item() for key in reference) < 1e-6
    base = load_file(str(Path(path) / "model.safetensors"))
    assert max((merged[key] - base[key]).abs().max().item() for key in base) > 1e-2  # the adapters moved weights
    incomplete = {key: value for key, value in state.items() if ".lora_B." not in key}
    with pytest.raises(ValueError, match="Incomplete LoRA layer"):
        merge_lora_weights(incomplete, settings.scaling)


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_qwen3"])
def test_adapter_only_folder_loads_in_sentence_transformers_on_its_base(model, train_file, tmp_path, request):
    from sentence_transformers import SentenceTransformer

    path = request.getfixturevalue(model)
    output_dir = tmp_path / "out"
    train.main(run_args(path, train_file, output_dir, "--max_steps", "2", "--save_steps", "2", "--query_prefix",
                        "query: ", "--save_adapter_only", "true"))
    for folder in (output_dir, output_dir / "checkpoint-2"):
        names = {entry.name for entry in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "1_Pooling", "2_Normalize", "tokenizer_config.json"} <= names
        # No full weights, and no config.json: transformers would take the folder for the base model itself.
        assert not names & {"model.safetensors", "model.safetensors.index.json", "config.json", "lora_adapter"}
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == path and config["r"] == 4 and config["lora_alpha"] == 8.0
    adapter = load_file(str(output_dir / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in key or ".lora_B." in key for key in adapter)

    ours = EmbeddingModel.from_pretrained(path, lora=LoraSettings(4, 8.0), query_prefix="query: ")
    ours.load_encoder_weights(str(output_dir))
    expected = ours.encode(TEXTS, prefix="query: ")
    ours.save_pretrained(str(tmp_path / "merged"))  # the same adapter, merged
    theirs = SentenceTransformer(str(output_dir), device="cpu").encode_query(TEXTS, convert_to_tensor=True)
    merged = SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode_query(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    unadapted = EmbeddingModel.from_pretrained(path).encode(TEXTS, prefix="query: ")
    assert (unadapted - expected).abs().max() > 1e-4  # the adapter trained and was put on the base


def test_sharding_engines_refuse_only_what_does_not_work():
    from finetune.training.distributed import check_sharding_support

    check_sharding_support(gradcache=False, lora=True, fsdp=False)  # run in tests/test_deepspeed.py
    with pytest.raises(ValueError, match="--lora_r is not supported with FSDP"):
        check_sharding_support(gradcache=False, lora=True, fsdp=True)
    check_sharding_support(gradcache=True, lora=True, fsdp=False)  # GradCache: tests/test_deepspeed.py
    with pytest.raises(ValueError, match="--gradcache_mini_batch_size is not supported with FSDP"):
        check_sharding_support(gradcache=True, lora=False, fsdp=True)

"""Every accelerate config parses; the DeepSpeed files validate with DeepSpeed's own config class."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
DEEPSPEED = sorted((ROOT / "accelerate_configs").glob("ds_*.json"))


def test_expected_configs_exist():
    names = {path.stem for path in CONFIGS}
    assert {"single_gpu", "multi_gpu", "multi_node", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload",
            "fsdp", "cpu_multi_process", "cpu_deepspeed_zero2", "cpu_deepspeed_zero3"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    if config.distributed_type.value == "DEEPSPEED":
        assert (ROOT / config.deepspeed_config["deepspeed_config_file"]).is_file()


class _SingleProcess:
    """The 'model parallel unit' DeepSpeedConfig asks for the data-parallel world size (1 here)."""

    def get_data_parallel_world_size(self):
        return 1


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_config_validates_after_auto_is_filled(path, precision, tiny_bert):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from finetune.training.config import parse_arguments
    from finetune.model.embedding_model import EmbeddingModel

    raw = json.loads(path.read_text())
    assert "auto" in json.dumps(raw)  # batch sizes, precision and clipping come from the training arguments
    _, _, args = parse_arguments(["--use_cpu", "true", "--per_device_train_batch_size", "16",
                                  "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5"])
    setattr(args, precision, True)  # only the precision flag differs; use_cpu forbids fp16 at parse time
    model = EmbeddingModel.from_pretrained(tiny_bert)  # before the ZeRO-3 config exists: no zero.Init here
    hf_config = HfTrainerDeepSpeedConfig(raw)
    try:
        hf_config.trainer_config_process(args)
        hf_config.trainer_config_finalize(args, model, num_training_steps=100)
    finally:
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(hf_config.config)
    config = DeepSpeedConfig(hf_config.config, mpu=_SingleProcess())
    assert config.train_micro_batch_size_per_gpu == 16 and config.gradient_accumulation_steps == 2
    assert config.gradient_clipping == 0.5
    assert (config.bfloat16_config.enabled if hasattr(config, "bfloat16_config") else config.bfloat16_enabled) == (
        precision == "bf16")


@pytest.mark.parametrize("model_fixture, block", [("tiny_bert", "BertLayer"), ("tiny_qwen3", "Qwen3DecoderLayer")])
def test_fsdp_config_wraps_the_models_own_block_class(model_fixture, block, request):
    """fsdp.yaml names no layer class: accelerate reads it from the model, so a decoder gets its decoder layers."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    from finetune.model.embedding_model import EmbeddingModel

    fsdp = load_config_from_file(str(ROOT / "accelerate_configs" / "fsdp.yaml")).fsdp_config
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=fsdp.get("fsdp_transformer_layer_cls_to_wrap"))
    model = EmbeddingModel.from_pretrained(request.getfixturevalue(model_fixture))
    plugin.set_auto_wrap_policy(model)
    wrapped = {type(module).__name__ for module in model.modules()
               if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0)}
    assert block in wrapped
    assert not wrapped & {"EmbeddingModel", "Linear", "Qwen3Attention", "BertSelfAttention"}

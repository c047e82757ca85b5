"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes train like plain DDP, and ZeRO-3's gathered output loads.

The same 2-step training runs three times with 2 processes: DDP (cpu_multi_process.yaml, the
independent reference), ZeRO-2 and ZeRO-3 (cpu_deepspeed_zero{2,3}.yaml). The DeepSpeed JSON files
have no "optimizer" section, so the Trainer hands DeepSpeed its own torch AdamW, which ZeRO steps on
its flat fp32 partitions: the update rule is the same in all three runs and only the order of the
gradient reductions differs. Gradient clipping is active (the gradient norm is above 1).

LoRA composes with both stages: the same 2 LoRA steps under DDP, ZeRO-2 and ZeRO-3 end at the same merged
weights (made from the state dict the Trainer gathers, finetune.model.lora.merge_lora_weights), and resuming from
DeepSpeed's own checkpoint is exact (the ZeRO-3 resumed run saves the adapter alone, --save_adapter_only).

GradCache composes with both stages too: 2 GradCache steps of 2 accumulated batches end where DDP + GradCache ends.

The first DeepSpeed launch on a machine compiles a small communication op (about 70 s, cached in
~/.cache/torch_extensions). The outputs are loaded here, in the test process: under ZeRO-3 any model
loaded inside the training run would be partitioned and loading it on one rank waits for the others.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_two_processes, make_records, write_jsonl
from finetune.training.config import ConfigError, launch_defaults
from finetune.model.embedding_model import EmbeddingModel

# Every run as users launch it, without --use_cpu: finetune.training.config.launch_defaults supplies what CPU needs.
RUNS = {"ddp": ("cpu_multi_process.yaml", []), "zero2": ("cpu_deepspeed_zero2.yaml", []),
        "zero3": ("cpu_deepspeed_zero3.yaml", [])}
TEXTS = ["alpha beta river", "python function returns list", "query document passage answer", "city"]
TOLERANCE = 1e-5
# LoRA runs: name -> (config, the run whose checkpoint-1 it resumes from, extra flags); one at a time, in this order.
LORA_RUNS = {"ddp": ("cpu_multi_process.yaml", None, []), "zero2": ("cpu_deepspeed_zero2.yaml", None, []),
             "zero3": ("cpu_deepspeed_zero3.yaml", None, []),
             "zero2_resumed": ("cpu_deepspeed_zero2.yaml", "zero2", []),
             "zero3_resumed": ("cpu_deepspeed_zero3.yaml", "zero3", ["--save_adapter_only", "true"])}
# Rank 16: every adapter matrix (16 x 32 at least) is larger than ZeRO-3's persistence threshold (10 x hidden size =
# 320 elements, ds_zero3.json's "auto"), so DeepSpeed partitions the adapters too; below it they stay whole on every
# process and a save from the live partitions could not be told from one from the gathered state.
LORA_R = 16
# GradCache runs (mini-batches of 3 texts, 2 accumulation steps): name -> config.
GRADCACHE_RUNS = {"ddp": "cpu_multi_process.yaml", "zero2": "cpu_deepspeed_zero2.yaml",
                  "zero3": "cpu_deepspeed_zero3.yaml"}
OPTIMIZER_SHARDS = {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
# DeepSpeed's own checkpoint files per stage prove it trained (accelerate can silently fall back to DDP).
DEEPSPEED_FILES = {"ddp": set(), "zero2": OPTIMIZER_SHARDS | {"mp_rank_00_model_states.pt"},
                   "zero3": OPTIMIZER_SHARDS | {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)}}


def deepspeed_files(output_dir: Path, step: int = 2) -> set[str]:
    folder = output_dir / f"checkpoint-{step}" / f"global_step{step}"
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


def common_args(model: str, folder: Path, *, learning_rate: str = "1e-3", save_steps: str = "2") -> list[str]:
    """The 2-step training every run below shares (its own train file in ``folder``)."""
    train_file = write_jsonl(folder / "train.jsonl", make_records(24, seed=1))
    return ["--model_name_or_path", model, "--train_file", train_file, "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", learning_rate,
            "--warmup_steps", "0", "--report_to", "none", "--save_steps", save_steps, "--logging_steps", "1",
            "--dataloader_num_workers", "0"]


def launch_each(folder: Path, common: list[str], runs: dict[str, tuple[str, str | None, list[str]]]
                ) -> dict[str, tuple[Path, str]]:
    """Launch ``runs`` (name -> (config, run whose checkpoint-1 it resumes from, extra flags)) one at a time on 2
    processes; returns each output folder and log."""
    results = {}
    for name, (config, resume_from, flags) in runs.items():
        output_dir = folder / name
        if resume_from:  # a run stopped after step 1: the checkpoint alone (DeepSpeed's files in global_step1/)
            shutil.copytree(folder / resume_from / "checkpoint-1", output_dir / "checkpoint-1")
        result = launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, *flags, "--output_dir",
                                       str(output_dir)], config=config)
        results[name] = (output_dir, result.stdout + result.stderr)
    return results


@pytest.fixture(scope="module")
def runs(tiny_bert_without_dropout, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Output folder and log of the same 2-step training under each entry of RUNS (one run at a time)."""
    folder = tmp_path_factory.mktemp("deepspeed")
    return launch_each(folder, common_args(tiny_bert_without_dropout, folder),
                       {name: (config, None, flags) for name, (config, flags) in RUNS.items()})


@pytest.fixture(scope="module")
def lora_runs(tiny_bert_without_dropout, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Output folder and log of the same 2 LoRA steps under each entry of LORA_RUNS (one run at a time)."""
    folder = tmp_path_factory.mktemp("deepspeed_lora")
    common = common_args(tiny_bert_without_dropout, folder, learning_rate="1e-2", save_steps="1")
    return launch_each(folder, [*common, "--lora_r", str(LORA_R), "--lora_dropout", "0"], LORA_RUNS)


@pytest.fixture(scope="module")
def gradcache_runs(tiny_bert_without_dropout, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Output folder and log of the same 2 GradCache steps (2 accumulated batches each) under each GRADCACHE_RUNS."""
    folder = tmp_path_factory.mktemp("deepspeed_gradcache")
    common = [*common_args(tiny_bert_without_dropout, folder), "--gradcache_mini_batch_size", "3",
              "--gradient_accumulation_steps", "2"]
    return launch_each(folder, common, {name: (config, None, []) for name, config in GRADCACHE_RUNS.items()})


def test_gradcache_under_zero2_and_zero3_ends_where_ddp_ends(gradcache_runs, tiny_bert_without_dropout):
    """GradCache's several backward passes per batch, accumulated over 2 batches per step, under ZeRO-2 and ZeRO-3
    (the engine's own backward off the accumulation boundary, then one step) == DDP + GradCache."""
    weights = {}
    for name, (output_dir, log) in gradcache_runs.items():
        assert "World size 2 x 4 queries per device" in log, name
        assert deepspeed_files(output_dir) == DEEPSPEED_FILES[name], name
        weights[name] = load_file(str(output_dir / "model.safetensors"))
    base = load_file(str(Path(tiny_bert_without_dropout) / "model.safetensors"))
    assert max((weights["ddp"][key] - base[key]).abs().max().item() for key in base) > 1e-4  # it trained
    for stage in ("zero2", "zero3"):
        assert max_difference(weights[stage], weights["ddp"]) < TOLERANCE, stage
    history = {name: [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
                      if "loss" in entry] for name, (output_dir, _) in gradcache_runs.items()}
    assert len(history["ddp"]) == 2
    for stage in ("zero2", "zero3"):
        assert [entry["loss"] for entry in history[stage]] == pytest.approx(
            [entry["loss"] for entry in history["ddp"]], abs=TOLERANCE), stage
        # AdamW and clipping barely see a constant factor on the gradients; the norm before clipping does.
        assert [entry["grad_norm"] for entry in history[stage]] == pytest.approx(
            [entry["grad_norm"] for entry in history["ddp"]], rel=1e-4), stage


def test_launch_defaults_name_gloo_only_for_deepspeed_on_several_cpu_processes(monkeypatch):
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch_defaults() == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_defaults() == ["--use_cpu", "true"]  # DDP on CPU: one gloo group, not 2 lone trainings
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_defaults() == []  # one process: nothing to count
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_defaults() == ["--ddp_backend", "gloo"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch_defaults() == []  # GPU launches are left alone
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=true turns DeepSpeed off"):
        launch_defaults()


def test_runs_use_two_processes_and_the_requested_zero_stage(runs):
    for name, (output_dir, log) in runs.items():
        assert "World size 2 x 4 queries per device" in log, name
        assert ("--ddp_backend gloo by default" in log) == (name != "ddp"), name
        assert ("--use_cpu true by default" in log) == (name == "ddp"), name
        assert deepspeed_files(output_dir) == DEEPSPEED_FILES[name], name


def test_zero3_output_loads_and_matches_zero2_and_ddp(runs, tiny_bert_without_dropout):
    from sentence_transformers import SentenceTransformer

    models = {name: SentenceTransformer(str(output_dir), device="cpu") for name, (output_dir, _) in runs.items()}
    # Stored under the standard names (transformers 5.24's ZeRO-3 path would write LayerNorm gamma/beta, see
    # modeling._load_encoder): our strict loader, used to resume and to reload the best checkpoint, accepts them.
    from safetensors.torch import load_file

    for name, (output_dir, _) in runs.items():
        stored = load_file(str(output_dir / "model.safetensors"))
        assert not [key for key in stored if key.endswith((".gamma", ".beta"))], name
        EmbeddingModel.from_pretrained(tiny_bert_without_dropout).load_encoder_weights(str(output_dir))
    weights = {name: model.state_dict() for name, model in models.items()}
    embeddings = {name: model.encode(TEXTS, convert_to_tensor=True) for name, model in models.items()}
    base = SentenceTransformer(tiny_bert_without_dropout, device="cpu").state_dict()
    assert max((weights["zero3"][key] - base[key]).abs().max().item() for key in base) > 1e-4  # it trained

    for first, second in [("zero3", "zero2"), ("zero3", "ddp"), ("zero2", "ddp")]:
        assert weights[first].keys() == weights[second].keys()
        weight_diff = max((weights[first][key] - weights[second][key]).abs().max().item() for key in weights[first])
        embedding_diff = (embeddings[first] - embeddings[second]).abs().max().item()
        assert weight_diff < TOLERANCE and embedding_diff < TOLERANCE, (first, second, weight_diff, embedding_diff)

    history = {name: json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
               for name, (output_dir, _) in runs.items()}
    losses = {name: [entry["loss"] for entry in entries if "loss" in entry] for name, entries in history.items()}
    assert len(losses["ddp"]) == 2
    assert losses["zero3"] == pytest.approx(losses["ddp"], abs=TOLERANCE)
    assert losses["zero2"] == pytest.approx(losses["ddp"], abs=TOLERANCE)


def test_lora_under_zero2_and_zero3_ends_where_ddp_ends(lora_runs, tiny_bert_without_dropout):
    from sentence_transformers import SentenceTransformer

    for name in ("ddp", "zero2", "zero3"):
        output_dir, log = lora_runs[name]
        assert "World size 2 x 4 queries per device" in log, name
        assert deepspeed_files(output_dir) == DEEPSPEED_FILES[name], name
    base = load_file(str(Path(tiny_bert_without_dropout) / "model.safetensors"))
    merged = {name: load_file(str(lora_runs[name][0] / "model.safetensors")) for name in ("ddp", "zero2", "zero3")}
    adapters = {name: load_file(str(lora_runs[name][0] / "lora_adapter" / "adapter_model.safetensors"))
                for name in ("ddp", "zero2", "zero3")}
    assert max_difference(merged["zero3"], base) > 1e-3  # plain weights under the base names, adapters folded in
    hidden_size = json.loads((Path(tiny_bert_without_dropout) / "config.json").read_text())["hidden_size"]
    assert min(tensor.numel() for tensor in adapters["ddp"].values()) > 10 * hidden_size  # partitioned under ZeRO-3
    embeddings = {name: SentenceTransformer(str(lora_runs[name][0]), device="cpu").encode(TEXTS, convert_to_tensor=True)
                  for name in ("ddp", "zero2", "zero3")}
    for name in ("zero2", "zero3"):
        # The gathered adapter, not this process's partition of it: every matrix whole.
        assert {key: value.shape for key, value in adapters[name].items()} == {
            key: value.shape for key, value in adapters["ddp"].items()}, name
        assert max_difference(merged[name], merged["ddp"]) < TOLERANCE, name
        assert max_difference(adapters[name], adapters["ddp"]) < TOLERANCE, name
        assert (embeddings[name] - embeddings["ddp"]).abs().max().item() < TOLERANCE, name


def test_lora_resumes_exactly_from_deepspeed_checkpoints(lora_runs):
    from sentence_transformers import SentenceTransformer

    for name in ("zero2_resumed", "zero3_resumed"):
        output_dir, log = lora_runs[name]
        assert f"Resuming from {output_dir / 'checkpoint-1'}" in log, name
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        assert [entry["step"] for entry in history if "loss" in entry] == [1, 2], name
    assert deepspeed_files(lora_runs["zero3_resumed"][0]) == DEEPSPEED_FILES["zero3"]
    straight, resumed = (load_file(str(lora_runs[name][0] / "model.safetensors")) for name in ("zero2", "zero2_resumed"))
    assert max_difference(straight, resumed) < 1e-6
    # The resumed ZeRO-3 run saved the adapter alone, from the gathered state dict: the straight run's adapter.
    adapter_only = lora_runs["zero3_resumed"][0]
    assert not (adapter_only / "model.safetensors").exists() and not (adapter_only / "config.json").exists()
    straight = load_file(str(lora_runs["zero3"][0] / "lora_adapter" / "adapter_model.safetensors"))
    assert max_difference(straight, load_file(str(adapter_only / "adapter_model.safetensors"))) < 1e-6
    vectors = {name: SentenceTransformer(str(lora_runs[name][0]), device="cpu").encode(TEXTS, convert_to_tensor=True)
               for name in ("zero3", "zero3_resumed")}
    assert (vectors["zero3"] - vectors["zero3_resumed"]).abs().max().item() < TOLERANCE

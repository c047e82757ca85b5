"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes train like plain DDP, and ZeRO-3's gathered output loads.

The same 2-step training runs three times with 2 processes: DDP (cpu_multi_process.yaml, the
independent reference), ZeRO-2 and ZeRO-3 (cpu_deepspeed_zero{2,3}.yaml). The DeepSpeed JSON files
have no "optimizer" section, so the Trainer hands DeepSpeed its own torch AdamW, which ZeRO steps on
its flat fp32 partitions: the update rule is the same in all three runs and only the order of the
gradient reductions differs. Gradient clipping is active (the gradient norm is above 1).

The first DeepSpeed launch on a machine compiles a small communication op (about 70 s, cached in
~/.cache/torch_extensions). The outputs are loaded here, in the test process: under ZeRO-3 any model
loaded inside the training run would be partitioned and loading it on one rank waits for the others.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, launch_two_processes, make_records, write_jsonl
from finetune.config import ConfigError, launch_defaults
from finetune.modeling import EmbeddingModel

# Every run as users launch it, without --use_cpu: finetune.config.launch_defaults supplies what CPU needs.
RUNS = {"ddp": ("cpu_multi_process.yaml", []), "zero2": ("cpu_deepspeed_zero2.yaml", []),
        "zero3": ("cpu_deepspeed_zero3.yaml", [])}
TEXTS = ["alpha beta river", "python function returns list", "query document passage answer", "city"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runs(tiny_bert_without_dropout, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Output folder and log of the same 2-step training under each entry of RUNS (one run at a time)."""
    folder = tmp_path_factory.mktemp("deepspeed")
    train_file = write_jsonl(folder / "train.jsonl", make_records(24, seed=1))
    common = ["--model_name_or_path", tiny_bert_without_dropout, "--train_file", train_file, "--max_steps", "2",
              "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
              "--warmup_steps", "0", "--report_to", "none", "--save_steps", "2", "--logging_steps", "1",
              "--dataloader_num_workers", "0"]
    results = {}
    for name, (config, flags) in RUNS.items():
        output_dir = folder / name
        result = launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, *flags, "--output_dir",
                                       str(output_dir)], config=config)
        results[name] = (output_dir, result.stdout + result.stderr)
    return results


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
        # DeepSpeed's own checkpoint files prove it trained (accelerate can silently fall back to DDP).
        step = output_dir / "checkpoint-2" / "global_step2"
        files = {path.name for path in step.iterdir()} if step.is_dir() else set()
        optimizer_shards = {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
        expected = {"ddp": set(),
                    "zero2": optimizer_shards | {"mp_rank_00_model_states.pt"},
                    "zero3": optimizer_shards | {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)}}
        assert files == expected[name], name


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

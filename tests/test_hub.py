"""Pushing to the Hub: exactly the SentenceTransformer folder and its card go up, the token stays secret.

The Hub is replaced by a local HTTP server on 127.0.0.1 (``tests/hub_stub.py``, http.server in a
thread) that answers huggingface_hub's upload API and records every request and committed file.
huggingface_hub reads HF_ENDPOINT when it is imported, so pushes run in a subprocess with
HF_ENDPOINT pointing at the stub; nothing reaches the network.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from conftest import make_records, write_jsonl
from finetune import train
from finetune.publishing.hub import HubPushError, model_files
from hub_stub import start_hub_stub

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_StubToken0123456789abcdefSECRET"
# What a pushed repo must hold: the model as save_pretrained writes it for the tiny BERT, and the card.
MODEL_FILES = {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
               "1_Pooling/config.json", "2_Normalize/config.json"}
# A --save_adapter_only model: the LoRA adapter in place of the HF weights and config.
ADAPTER_FILES = (MODEL_FILES - {"config.json", "model.safetensors"}) | {"adapter_config.json", "adapter_model.safetensors"}
TEXTS = ["alpha beta gamma river", "python function returns list"]


def tiny_run_args(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "1", "--max_steps", "2",
            "--save_steps", "1", "--logging_steps", "1", "--query_prefix", "query: ", "--use_cpu", "true",
            "--report_to", "none", "--dataloader_num_workers", "0", *extra]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory) -> Path:
    """A finished tiny run: model, card, checkpoints, metrics and trainer logs side by side. Read-only."""
    folder = tmp_path_factory.mktemp("trained")
    train_file = write_jsonl(folder / "train.jsonl", make_records(16, seed=3))
    validation_file = write_jsonl(folder / "validation.jsonl", make_records(8, seed=4))
    train.main(tiny_run_args(tiny_bert, train_file, folder / "out", "--validation_file", validation_file))
    return folder / "out"


@pytest.fixture
def hub():
    stub = start_hub_stub()
    yield stub
    stub.close()


def snapshot(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def hub_env(tmp_path, endpoint: str, token: str | None = TOKEN) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(ROOT))
    if token:
        env["HF_TOKEN"] = token
    return env


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_token_only_in_authorization_header(hub, result, *folders):
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes, "nothing was sent to the stub"
    for request in writes:
        assert request.headers.get("authorization") == f"Bearer {TOKEN}", request.path
    for request in hub.requests:
        assert TOKEN not in request.path and TOKEN.encode() not in request.body
        assert all(TOKEN not in value for key, value in request.headers.items() if key != "authorization")
    assert TOKEN not in result.stdout + result.stderr
    for folder in folders:
        for path in Path(folder).rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def assert_pushed_copy_is_the_model(files: dict[str, bytes], model_dir: Path, tmp_path) -> None:
    """Byte-identical to the local files, and loadable on its own with the same vectors."""
    for name, content in files.items():
        if name != "README.md":
            assert content == (model_dir / name).read_bytes(), name
    copy = tmp_path / "downloaded"
    for name, content in files.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(content)
    local = SentenceTransformer(str(model_dir), device="cpu").encode_query(TEXTS, convert_to_tensor=True)
    pushed = SentenceTransformer(str(copy), device="cpu").encode_query(TEXTS, convert_to_tensor=True)
    assert torch.allclose(local, pushed, atol=1e-6)


def test_model_files_are_the_model_and_card_only(trained, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained, folder)
    for stray in ("notes.txt", "optimizer.pt", "training_args.bin", "runs/events.out.tfevents.1", ".hidden.json",
                  "wandb/run/files/config.yaml"):
        (folder / stray).parent.mkdir(parents=True, exist_ok=True)
        (folder / stray).write_text("not part of the model")
    assert any(path.name.startswith("checkpoint-") for path in folder.iterdir())
    assert set(model_files(str(folder))) == MODEL_FILES
    (folder / "vocab.txt").write_text("[PAD]\n")  # other tokenizer layouts are part of the model
    assert "vocab.txt" in model_files(str(folder))
    (folder / "modules.json").unlink()
    with pytest.raises(HubPushError, match="not a complete SentenceTransformer model folder.*modules.json"):
        model_files(str(folder))


def test_push_command_uploads_exactly_the_model_and_card(trained, hub, tmp_path):
    before = snapshot(trained)
    result = run([sys.executable, "-m", "finetune.push_to_hub", str(trained), "--hub_model_id", "test-org/tiny-retriever",
                  "--private", "--commit_message", "First version"], hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 0, result.stderr
    assert "test-org/tiny-retriever" in result.stdout

    create = [r for r in hub.requests if r.path == "/api/repos/create"]
    assert len(create) == 1 and json.loads(create[0].body)["visibility"] == "private"
    assert [commit["summary"] for commit in hub.commits] == ["First version"]
    assert all(not commit["other"] for commit in hub.commits), "files went another way than inline"
    files = hub.files("test-org/tiny-retriever")
    assert set(files) == MODEL_FILES
    assert_pushed_copy_is_the_model(files, trained, tmp_path)
    # The card was re-rendered for the repo: its usage example loads the repo id.
    assert b'SentenceTransformer("test-org/tiny-retriever")' in files["README.md"]
    assert files["README.md"] == (trained / "README.md").read_bytes()
    assert {name: digest for name, digest in snapshot(trained).items() if name != "README.md"} == \
           {name: digest for name, digest in before.items() if name != "README.md"}
    assert_token_only_in_authorization_header(hub, result, trained, tmp_path / "hf_home")


def test_unreachable_hub_is_one_clear_error_and_the_model_is_untouched(trained, tmp_path):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    before = snapshot(trained)
    result = run([sys.executable, "-m", "finetune.push_to_hub", str(trained), "--hub_model_id", "test-org/x"],
                 hub_env(tmp_path, f"http://127.0.0.1:{closed_port}"))
    assert result.returncode == 2
    assert "error: Cannot create the Hub repository 'test-org/x': could not reach http://127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stderr + result.stdout
    assert snapshot(trained) == before


def test_training_with_push_to_hub_uploads_the_sentence_transformer_folder(tiny_bert, hub, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(16, seed=5))
    output_dir = tmp_path / "out"
    result = run([sys.executable, "finetune/train.py", *tiny_run_args(tiny_bert, train_file, output_dir),
                  "--push_to_hub", "true", "--hub_model_id", "test-org/trained", "--hub_private_repo", "true"],
                 hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "checkpoint-2").is_dir()
    paths = [r.path.split("?")[0] for r in hub.requests if r.method == "POST"]
    assert paths[0] == "/api/repos/create"  # created before training: no token / no access fails early
    assert paths.count("/api/models/test-org/trained/commit/main") == 1  # once, at the end; no checkpoint pushes
    files = hub.files("test-org/trained")
    assert set(files) == MODEL_FILES
    assert_pushed_copy_is_the_model(files, output_dir, tmp_path)
    assert b'SentenceTransformer("test-org/trained")' in files["README.md"]
    assert not (output_dir / "training_args.bin").exists()  # the Trainer's own Hub push did not run
    assert_token_only_in_authorization_header(hub, result, output_dir, tmp_path / "hf_home")


def test_failed_push_after_training_keeps_the_model_and_says_how_to_retry(tiny_bert, hub, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(16, seed=6))
    output_dir = tmp_path / "out"
    result = run([sys.executable, "finetune/train.py", *tiny_run_args(tiny_bert, train_file, output_dir),
                  "--push_to_hub", "true", "--hub_model_id", "readonly-org/model"], hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 2
    assert "may not write to 'readonly-org/model'" in result.stderr
    assert f"python -m finetune.push_to_hub {output_dir} --hub_model_id readonly-org/model" in result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stdout + result.stderr
    assert not hub.commits
    vectors = SentenceTransformer(str(output_dir), device="cpu").encode_query(TEXTS)
    assert vectors.shape == (2, 32) and (output_dir / "README.md").is_file()


def test_no_token_fails_before_training(tiny_bert, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(8, seed=7))
    with pytest.raises(HubPushError, match="No Hugging Face token found. Set HF_TOKEN"):
        train.main(tiny_run_args(tiny_bert, train_file, tmp_path / "out", "--push_to_hub", "true",
                                 "--hub_model_id", "test-org/x"))
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_push_of_lora_models_uploads_merged_weights_or_the_adapter_and_the_card_says_which(tiny_bert, hub, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(16, seed=8))
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    train.main(tiny_run_args(tiny_bert, train_file, merged_dir, "--lora_r", "4"))
    train.main(tiny_run_args(tiny_bert, train_file, adapter_dir, "--lora_r", "4", "--save_adapter_only", "true"))
    assert set(model_files(str(merged_dir))) == MODEL_FILES  # lora_adapter/ (kept for resuming) stays local
    assert set(model_files(str(adapter_dir))) == ADAPTER_FILES
    (adapter_dir / "adapter_model.safetensors").rename(tmp_path / "moved")
    with pytest.raises(HubPushError, match="missing adapter_model.safetensors"):
        model_files(str(adapter_dir))
    (tmp_path / "moved").rename(adapter_dir / "adapter_model.safetensors")

    for folder, repo_id in ((merged_dir, "test-org/tiny-merged"), (adapter_dir, "test-org/tiny-adapter")):
        result = run([sys.executable, "-m", "finetune.push_to_hub", str(folder), "--hub_model_id", repo_id],
                     hub_env(tmp_path, hub.endpoint))
        assert result.returncode == 0, result.stderr[-3000:]
    merged, adapter = hub.files("test-org/tiny-merged"), hub.files("test-org/tiny-adapter")
    assert set(merged) == MODEL_FILES and set(adapter) == ADAPTER_FILES
    assert_pushed_copy_is_the_model(adapter, adapter_dir, tmp_path)  # the adapter, put on its (local) base again
    merged_card, adapter_card = merged["README.md"].decode(), adapter["README.md"].decode()
    assert "| Weights | LoRA (r=4, alpha=8.0) merged into plain weights: loads without `peft` |" in merged_card
    assert f"| Weights | LoRA adapter (r=4, alpha=8.0) on base `{tiny_bert}`, no full weights" in adapter_card
    assert "pip install -U sentence-transformers peft" in adapter_card
    assert 'SentenceTransformer("test-org/tiny-adapter")' in adapter_card
    assert "LoRA adapter" not in merged_card and "peft\n" not in merged_card

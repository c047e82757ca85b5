"""--report_to wandb offline: the Trainer's WandbCallback logs config, loss, learning rate and throughput
into an offline run under WANDB_DIR, with the project, group and name given on the command line."""

import struct
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from conftest import make_records, write_jsonl
from finetune import train


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (wandb's LevelDB-style log: 7-byte header, 32 KiB blocks,
    each chunk = crc32 (4) + length (2, little endian) + kind (1: full, 2: first, 3: middle, 4: last))."""
    data, block, position = path.read_bytes(), 32768, 7
    records, pending = [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # block trailer padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_offline_wandb_run_has_project_group_config_and_metrics(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_PROJECT", "WANDB_RUN_GROUP"):  # set by the run; monkeypatch restores them afterwards
        monkeypatch.delenv(name, raising=False)
    train_file = write_jsonl(tmp_path / "train.jsonl", make_records(16, seed=21))
    train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(tmp_path / "out"),
                "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1", "--use_cpu", "true",
                "--report_to", "wandb", "--wandb_project", "sbert-tests", "--wandb_group", "sweep-7",
                "--run_name", "tiny-wandb", "--temperature", "0.03"])
    assert wandb.run is None  # the run was finished (and flushed) at the end of training

    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [log] = run_dir.glob("run-*.wandb")
    records = read_wandb_records(log)
    [run] = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.display_name) == ("sbert-tests", "sweep-7", "tiny-wandb")
    config = {update.key: update.value_json for record in records if record.WhichOneof("record_type") == "config"
              for update in record.config.update}
    assert config["temperature"] == "0.03" and config["wandb_project"] == '"sbert-tests"'
    history = [{item_key(item): item.value_json for item in record.history.item}
               for record in records if record.WhichOneof("record_type") == "history"]
    steps = [row for row in history if "train/loss" in row]
    assert [row["train/global_step"] for row in steps] == ["1", "2"]
    assert all(float(row["train/loss"]) > 0 and "train/learning_rate" in row for row in steps)
    # The objective's named components are logged with the loss (one objective: loss_ranking == loss).
    assert all(float(row["train/loss_ranking"]) == pytest.approx(float(row["train/loss"]), rel=1e-4) for row in steps)
    summary = {item_key(item) for record in records if record.WhichOneof("record_type") == "summary"
               for item in record.summary.update}
    assert {"train_samples_per_second", "train_loss"} <= summary  # throughput at the end of training

"""Crash safety: a run killed with SIGKILL resumes from its last complete checkpoint and ends where an
uninterrupted run ends; a checkpoint cut short is skipped."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from safetensors.torch import load_file

from conftest import kill_when
from finetune import train

ROOT = Path(__file__).resolve().parent.parent


def args(model, data, output_dir):
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
            "--max_steps", "120", "--save_steps", "10", "--save_total_limit", "2", "--logging_steps", "10",
            "--use_cpu", "true", "--report_to", "none", "--seed", "7"]


def max_weight_difference(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def test_sigkill_mid_run_then_same_command_resumes_to_the_same_weights(tiny_bert, train_file, tmp_path):
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    command = [sys.executable, str(ROOT / "finetune" / "train.py"), *args(tiny_bert, train_file, killed_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    returncode = kill_when(command, killed_dir / "checkpoint-30" / "checkpoint_complete.json", env)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_dir / "modules.json").exists()  # no final model yet

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    train.main(args(tiny_bert, train_file, straight_dir))
    assert max_weight_difference(killed_dir, straight_dir) < 1e-6


def test_checkpoint_without_completion_marker_is_skipped(tiny_bert, train_file, tmp_path, caplog):
    output_dir = tmp_path / "out"
    base = args(tiny_bert, train_file, output_dir)
    base[base.index("--max_steps") + 1] = "20"
    train.main(base)
    # Simulate a kill while checkpoint-20 was being written: no marker, a truncated weights file.
    (output_dir / "checkpoint-20" / "checkpoint_complete.json").unlink()
    weights = output_dir / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert train.last_complete_checkpoint(str(output_dir)).endswith("checkpoint-10")
    train.main(base)  # resumes from checkpoint-10 and trains steps 11..20 again
    assert "Skipping" in caplog.text and "checkpoint-20" in caplog.text
    assert len(load_file(str(weights))) > 0  # rewritten whole


def test_final_save_moves_modules_json_last(tmp_path):
    from finetune.training.checkpointing import move_into_place

    staging, output = tmp_path / "out" / ".saving", tmp_path / "out"
    (staging / "1_Pooling").mkdir(parents=True)
    for name in ("modules.json", "config.json", "1_Pooling/config.json"):
        (staging / name).write_text("new")
    (output / "1_Pooling").mkdir(exist_ok=True)
    (output / "1_Pooling" / "stale.json").write_text("old")
    (output / "modules.json").write_text("old")
    moved = []
    original = os.replace
    try:
        os.replace = lambda src, dst: (moved.append(Path(dst).name), original(src, dst))[1]
        move_into_place(str(staging), str(output), last="modules.json")
    finally:
        os.replace = original
    assert moved[-1] == "modules.json" and not staging.exists()
    assert (output / "modules.json").read_text() == "new" and not (output / "1_Pooling" / "stale.json").exists()


def test_the_last_complete_checkpoint_is_chosen_by_step_number(tmp_path):
    """checkpoint-10 comes after checkpoint-9 (by name, or by modification time here, it would come before it); an
    incomplete newer one is skipped, and so is a folder that only looks like a checkpoint."""
    from finetune.training.checkpointing import CHECKPOINT_COMPLETE, last_complete_checkpoint

    for age, step in enumerate((2, 10, 100, 9)):  # checkpoint-9 has the newest modification time
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 100:  # checkpoint-100 was cut short
            (tmp_path / f"checkpoint-{step}" / CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": step}))
        os.utime(tmp_path / f"checkpoint-{step}", (1_000_000 + age, 1_000_000 + age))
    (tmp_path / "checkpoint-99.old").mkdir()
    (tmp_path / "checkpoint-99.old" / CHECKPOINT_COMPLETE).write_text("{}")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert train.find_resume_checkpoint(SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None,
                                                        overwrite_output_dir=False)) == str(tmp_path / "checkpoint-10")

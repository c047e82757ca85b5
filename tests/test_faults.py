"""Faults at scale: a full disk while a checkpoint is written, a process killed in the middle of a step.

Each ends with a clear error, leaves the previous complete checkpoint resumable, and the same command then
ends where an uninterrupted run ends.
"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from finetune import train
from finetune.training.checkpointing import CHECKPOINT_COMPLETE, CheckpointWriteError, last_complete_checkpoint


def run_args(model, data, output_dir, max_steps=20):
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
            "--max_steps", str(max_steps), "--save_steps", "10", "--logging_steps", "10", "--use_cpu", "true",
            "--report_to", "none", "--seed", "7", "--dataloader_num_workers", "0"]


def max_weight_difference(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def no_space(real, target: str):
    """``real`` (a writer taking a path as its second argument), failing with ENOSPC for paths under ``target``."""
    def write(obj, path, *args, **kwargs):
        if target in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args, **kwargs)
    return write


@pytest.mark.parametrize("writer", ["optimizer", "weights"])
def test_a_full_disk_while_checkpointing_keeps_the_last_complete_checkpoint(writer, tiny_bert, train_file, tmp_path,
                                                                            monkeypatch):
    """ENOSPC while checkpoint-20 is written (its weights, or the optimizer state after them): a clear error, the
    partial checkpoint removed, checkpoint-10 complete; once there is space the same command resumes from it and
    ends at the weights of a run that never failed."""
    import transformers.modeling_utils

    output_dir, straight_dir = tmp_path / "out", tmp_path / "straight"
    if writer == "optimizer":
        monkeypatch.setattr(torch, "save", no_space(torch.save, "checkpoint-20"))
    else:
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                            no_space(transformers.modeling_utils.safe_save_file, "checkpoint-20"))
    with pytest.raises(CheckpointWriteError, match="no space left on device") as raised:
        train.main(run_args(tiny_bert, train_file, output_dir, max_steps=30))
    message = str(raised.value)
    assert "checkpoint-20" in message and "checkpoint-10 is complete and the same command resumes from it" in message
    assert not (output_dir / "checkpoint-20").exists()  # nothing half-written left to be taken for complete
    assert (output_dir / "checkpoint-10" / CHECKPOINT_COMPLETE).is_file()
    assert last_complete_checkpoint(str(output_dir)).endswith("checkpoint-10")
    assert not (output_dir / "model.safetensors").exists()

    monkeypatch.undo()  # space again
    train.main(run_args(tiny_bert, train_file, output_dir, max_steps=30))
    train.main(run_args(tiny_bert, train_file, straight_dir, max_steps=30))
    assert max_weight_difference(output_dir, straight_dir) < 1e-6


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """A 2-process launch whose output goes to ``log`` (a file: a pipe nobody reads while we wait could fill)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_multi_process.yaml"),
               str(ROOT / "finetune" / "train.py"), *args]
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finish(process: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for ``process`` (killing its process group after ``timeout`` s) and return its output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return log.read_text()


def worker_of_rank(launcher: subprocess.Popen, rank: int):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_a_process_killed_mid_step_stops_the_run_and_the_same_command_resumes(tiny_bert_without_dropout, train_file,
                                                                              tmp_path):
    """2 processes; rank 1 is SIGKILLed while training (after checkpoint-10): the launcher stops the run within a
    minute and names the failed rank; rerunning the command resumes from checkpoint-10 and ends at the weights of
    an uninterrupted 2-process run."""
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    common = [arg for arg in run_args(tiny_bert_without_dropout, train_file, killed_dir, max_steps=30)
              if arg not in ("--use_cpu", "true")]  # launch_defaults adds it for CPU processes
    log = tmp_path / "killed.log"
    launcher = launch(common, log)
    marker = killed_dir / "checkpoint-10" / CHECKPOINT_COMPLETE
    deadline = time.time() + 240
    while not marker.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim = worker_of_rank(launcher, 1)
    if not (marker.exists() and victim is not None and launcher.poll() is None):
        os.killpg(launcher.pid, signal.SIGKILL)
        raise AssertionError("no process to kill after checkpoint-10:\n" + log.read_text()[-3000:])
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        output = finish(launcher, log, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the other process did not stop within a minute after rank 1 was killed") from None
    assert time.time() - killed_at < 60 and launcher.returncode != 0
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output  # the launcher names the failed process
    assert not (killed_dir / "model.safetensors").exists()

    resumed = launch(common, tmp_path / "resumed.log")
    output = finish(resumed, tmp_path / "resumed.log", timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    assert "Resuming from" in output and "checkpoint-" in output
    straight_args = [arg if arg != str(killed_dir) else str(straight_dir) for arg in common]
    straight = launch(straight_args, tmp_path / "straight.log")
    output = finish(straight, tmp_path / "straight.log", timeout=300)
    assert straight.returncode == 0, output[-3000:]
    assert max_weight_difference(killed_dir, straight_dir) < 1e-6


def test_a_collective_broken_by_a_dead_peer_becomes_a_clear_error(tmp_path):
    """What a surviving process says: another process stopped, rerun the same command, resumed from where."""
    from finetune.training.checkpointing import mark_checkpoint_complete
    from finetune.training.distributed import PeerProcessError, peer_failure_message

    (tmp_path / "checkpoint-10").mkdir()
    mark_checkpoint_complete(str(tmp_path / "checkpoint-10"), 10)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:29362.")
    with pytest.raises(PeerProcessError, match="Another process of this run stopped .*rerun the same command: it "
                                               "resumes from .*checkpoint-10"):
        with peer_failure_message(str(tmp_path), world_size=2):
            raise gloo
    with pytest.raises(RuntimeError, match="Connection closed") as raised:  # one process: not about a peer
        with peer_failure_message(str(tmp_path), world_size=1):
            raise gloo
    assert not isinstance(raised.value, PeerProcessError)
    with pytest.raises(ValueError):  # other errors pass through untouched
        with peer_failure_message(str(tmp_path), world_size=2):
            raise ValueError("a bug")


def test_old_checkpoints_are_rotated_out_only_after_the_new_one_is_complete(tiny_bert, train_file, tmp_path,
                                                                             monkeypatch):
    """save_total_limit=1: a run stopped after checkpoint-20 was written but before it was marked complete must
    still have checkpoint-10 (the Trainer alone would have deleted it before the marker)."""
    from finetune.training import checkpointing

    output_dir = tmp_path / "out"
    real_mark = checkpointing.mark_checkpoint_complete

    def stop_before_marking_20(folder, step):
        if step == 20:
            raise KeyboardInterrupt("stopped between writing checkpoint-20 and marking it")
        real_mark(folder, step)

    monkeypatch.setattr(checkpointing, "mark_checkpoint_complete", stop_before_marking_20)
    with pytest.raises(KeyboardInterrupt):
        train.main([*run_args(tiny_bert, train_file, output_dir, max_steps=30), "--save_total_limit", "1"])
    assert (output_dir / "checkpoint-10" / CHECKPOINT_COMPLETE).is_file()
    assert last_complete_checkpoint(str(output_dir)).endswith("checkpoint-10")
    monkeypatch.undo()
    train.main([*run_args(tiny_bert, train_file, output_dir, max_steps=30), "--save_total_limit", "1"])
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-30"]  # rotation still works

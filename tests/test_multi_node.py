"""The multi-node path, exercised: two `accelerate launch --config_file accelerate_configs/multi_node.yaml
--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1` launchers on this host (one CPU process each, gloo)
train the same steps as one 2-process launch and end at the same weights."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import ROOT, launch_two_processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_of_one_process_each_equal_one_machine_of_two(tiny_bert_without_dropout, train_file, tmp_path):
    common = ["--model_name_or_path", tiny_bert_without_dropout, "--train_file", train_file,
              "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
              "--max_steps", "4", "--logging_steps", "1", "--report_to", "none", "--seed", "7",
              "--dataloader_num_workers", "0"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # On CPU the GPU launcher starts gloo processes only with ACCELERATE_USE_CPU (docs/scaling.md, multi-node).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    port, nodes_dir = free_port(), tmp_path / "two_machines"
    launchers, log_files = [], [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    for rank, log_file in enumerate(log_files):  # output to files: two pipes read one after the other could fill
        with open(log_file, "w") as handle:
            launchers.append(subprocess.Popen(
                [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / "multi_node.yaml"),
                 "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
                 "127.0.0.1", "--main_process_port", str(port), str(ROOT / "finetune" / "train.py"), *common,
                 "--output_dir", str(nodes_dir)], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True))
    try:
        for launcher in launchers:
            launcher.wait(timeout=300)
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    logs = [log_file.read_text() for log_file in log_files]
    for rank, (launcher, log) in enumerate(zip(launchers, logs)):
        assert launcher.returncode == 0, log[-3000:]
        assert "World size 2 x 4 queries per device" in log, rank  # one process group over both launchers
    one_machine_dir = tmp_path / "one_machine"
    launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, "--output_dir", str(one_machine_dir)])
    a, b = (load_file(str(folder / "model.safetensors")) for folder in (nodes_dir, one_machine_dir))
    base = load_file(str(Path(tiny_bert_without_dropout) / "model.safetensors"))
    assert max((a[key] - base[key]).abs().max().item() for key in base) > 1e-4  # it trained
    assert max((a[key] - b[key]).abs().max().item() for key in a) < 1e-6

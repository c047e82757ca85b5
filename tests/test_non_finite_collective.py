"""A non-finite loss on one process only: every process skips (or stops) together; none waits in a collective."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import launch_two_processes

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("cached", [True, False], ids=["gradcache", "plain"])
def test_one_process_non_finite_skips_the_step_everywhere(tiny_bert, train_file, tmp_path, cached):
    """Before the skip was decided collectively, process 1 left the step while process 0 waited in the
    gradient gather (GradCache) or in its backward: a hang until the launcher's timeout."""
    output_dir = tmp_path / "out"
    args = [str(HERE / "non_finite_script.py"), "--model_name_or_path", tiny_bert, "--train_file", train_file,
            "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--on_non_finite", "skip", "--use_cpu", "true", "--report_to", "none", "--logging_steps", "1",
            "--save_steps", "100", "--dataloader_num_workers", "0"]
    if cached:
        args += ["--gradcache_mini_batch_size", "3"]
    try:
        result = launch_two_processes(args, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the two processes hung on a non-finite loss of one of them")
    output = result.stdout + result.stderr
    assert "World size 2" in output
    assert output.count("Non-finite loss at step 2: skipping this batch") == 2  # both processes skipped it
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3

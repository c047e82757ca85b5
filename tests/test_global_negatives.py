"""Global in-batch negatives: 2 CPU processes with batch b equal 1 process with batch 2b."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_two_processes
from finetune import train

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("mode, cached", [("shared", False), ("exclusive", False), ("shared", True)])
def test_two_process_training_step_equals_one_process_double_batch(tiny_bert_without_dropout, train_file, tmp_path,
                                                                   mode, cached):
    """Two processes of batch 4 (plain, or GradCache in chunks of 3 texts) == one process of batch 8, plain."""
    common = ["--model_name_or_path", tiny_bert_without_dropout, "--train_file", train_file, "--max_steps", "2",
              "--num_hard_negatives", "2", "--learning_rate", "1e-3", "--warmup_steps", "0", "--report_to", "none",
              "--hard_negatives_mode", mode, "--save_steps", "100", "--logging_steps", "1", "--use_cpu", "true",
              "--dataloader_num_workers", "0"]
    cache = ["--gradcache_mini_batch_size", "3"] if cached else []
    two = launch_two_processes([str(ROOT / "finetune" / "train.py"), *common, "--per_device_train_batch_size", "4",
                                "--output_dir", str(tmp_path / "two"), *cache])
    assert "World size 2" in two.stdout + two.stderr
    train.main([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one")])
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    losses = [[e["loss"] for e in json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


@pytest.fixture(scope="module")
def two_process_result(tiny_bert_without_dropout, tmp_path_factory) -> dict:
    """What tests/global_negatives_script.py computed under 2 processes (one launch for the tests below)."""
    output = tmp_path_factory.mktemp("global_negatives") / "grads.pt"
    launch_two_processes([str(HERE / "global_negatives_script.py"), tiny_bert_without_dropout, str(output)])
    return torch.load(output, weights_only=True)


def test_gradients_of_global_and_local_backprop(tiny_bert_without_dropout, two_process_result):
    result = two_process_result
    from global_negatives_script import reference_gradients  # noqa: E402  (same file, run in one process)

    for backprop in ("global", "local"):
        expected_loss, expected_grads = reference_gradients(tiny_bert_without_dropout, backprop)
        assert result[f"{backprop}_loss"].item() == pytest.approx(expected_loss, abs=1e-6)
        torch.testing.assert_close(result[f"{backprop}_grads"], expected_grads, atol=1e-6, rtol=1e-5)
    assert (result["global_grads"] - result["local_grads"]).abs().max() > 1e-6  # the modes really differ


def test_query_to_query_alone_gathers_every_process_queries(tiny_bert_without_dropout, two_process_result):
    """query_to_query without doc_to_query: every process's queries are candidates, so 2 processes of 4 queries have
    the loss and gradients of 1 process of 8 (the same objective on the whole batch)."""
    from global_negatives_script import reference_objective  # noqa: E402

    expected_loss, expected_grads = reference_objective(tiny_bert_without_dropout, "query_to_query")
    assert two_process_result["query_to_query_loss"].item() == pytest.approx(expected_loss, abs=1e-5)
    torch.testing.assert_close(two_process_result["query_to_query_grads"], expected_grads, atol=1e-5, rtol=1e-4)


def test_a_positive_shared_across_processes_is_no_negative_of_the_other(tiny_bert_without_dropout,
                                                                         two_process_result):
    """Query 1 (process 0) and query 5 (process 1) have the same positive text: masked across the processes as in one
    process of 8, where masking it or not visibly changes the loss."""
    from global_negatives_script import reference_objective  # noqa: E402

    expected_loss, expected_grads = reference_objective(tiny_bert_without_dropout, "duplicate")
    unmasked_loss, _ = reference_objective(tiny_bert_without_dropout, "duplicate", with_keys=False)
    assert abs(expected_loss - unmasked_loss) > 1e-3  # the shared text matters on this batch
    assert two_process_result["duplicate_loss"].item() == pytest.approx(expected_loss, abs=1e-5)
    torch.testing.assert_close(two_process_result["duplicate_grads"], expected_grads, atol=1e-5, rtol=1e-4)

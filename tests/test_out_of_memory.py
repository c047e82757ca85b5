"""Out of GPU memory in a step (finetune.training.out_of_memory) and --bf16 on a GPU without bf16: clear errors, nothing lost."""

import pytest
import torch

from finetune.training import out_of_memory
from finetune import train
from finetune.training.arguments import check_precision_support
from finetune.training.trainer import EmbeddingTrainer
from test_train import run_args


def test_a_step_out_of_memory_names_the_batch_the_options_and_the_checkpoint_and_resumes(tiny_bert, train_file,
                                                                                         tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    original = EmbeddingTrainer.training_step

    def step_that_runs_out(self, *args, **kwargs):
        if self.state.global_step == 2:  # the third step, after checkpoint-2 was saved
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity "
                                         "of 79.19 GiB of which 1.02 GiB is free.")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingTrainer, "training_step", step_that_runs_out)
    with pytest.raises(out_of_memory.TrainingOutOfMemoryError) as caught:
        train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "4"))
    message = str(caught.value)
    assert "(tried to allocate 2.50 GiB)" in message
    assert "4 queries per device, each with 1 positive and 2 hard negative(s)" in message
    assert "--gradcache_mini_batch_size" in message and "--gradient_checkpointing true" in message
    assert "--lora_r 16" in message and "--passage_max_length" in message
    assert f"{output_dir / 'checkpoint-2'}, is unchanged: the same command resumes from it" in message
    monkeypatch.setattr(EmbeddingTrainer, "training_step", original)
    train.main(run_args(tiny_bert, train_file, output_dir, "--max_steps", "4"))
    assert (output_dir / "checkpoint-4").is_dir()


def test_the_cli_prints_the_out_of_memory_message_on_one_line_and_exits_2(monkeypatch, capsys):
    def out_of_memory_run(argv=None):
        raise out_of_memory.TrainingOutOfMemoryError("Out of memory on the device: ...")

    monkeypatch.setattr(train, "main", out_of_memory_run)
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: Out of memory on the device: ..."


def test_the_estimate_of_what_fits_scales_activations_with_the_batch():
    gib = 2**30
    # 80 GiB card, 10 GiB of weights and optimizer state, a batch of 64 that needed 90 + 10 GiB: activations 90 GiB
    # for 64 queries -> (0.9 * 80 - 10) / 90 * 64 = 44 queries
    assert out_of_memory.fitting_batch(64, 90 * gib, 10 * gib, 10 * gib, 80 * gib) == 44
    assert out_of_memory.fitting_batch(8, 20 * gib, 0, 80 * gib, 80 * gib) == 0  # the weights alone do not fit


def test_bf16_on_a_gpu_without_bf16_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match=r"--bf16 true: this GPU \(Tesla V100-SXM2-32GB, compute capability 7.0\) "
                                         r"has no bf16 support .* Use --fp16 true"):
        check_precision_support(bf16=True, use_cpu=False)
    check_precision_support(bf16=False, use_cpu=False)  # fp32 and fp16 are fine there
    check_precision_support(bf16=True, use_cpu=True)  # bf16 autocast on the CPU

"""The GPU lane: run with ``python -m pytest -m gpu tests/test_gpu.py`` on a CUDA machine (skipped elsewhere, so CI is
unchanged). Sized for a few minutes on one GPU: small random models with 64-dim heads (what the fused kernels take),
and one training step each of the default job, a LoRA decoder, GradCache, DeepSpeed ZeRO-2 and FSDP.

Tolerances: bf16 is compared with an fp32 padded reference. The padding-free bf16 forward (and its gradients) must be
no further from it than 2x the padded bf16 forward's own rounding error, plus 1e-2 relative: what counts is that
packing adds no error of its own, not that bf16 equals fp32.
"""

import copy
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, build_tiny_bert, build_tiny_decoder, make_records, write_jsonl
from finetune.model import attention_kernels
from finetune.model import packing
from finetune.model.embedding_model import EmbeddingModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU lane needs CUDA")]

BERT_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  max_position_embeddings=512)
QWEN3_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   max_position_embeddings=512)


@pytest.fixture(scope="module")
def gpu_bert(tmp_path_factory) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("gpu_bert")), **BERT_SHAPE)


@pytest.fixture(scope="module")
def gpu_qwen3(tmp_path_factory) -> str:
    return build_tiny_decoder(str(tmp_path_factory.mktemp("gpu_qwen3")), "qwen3", **QWEN3_SHAPE)


@pytest.fixture(autouse=True)
def fresh_kernels():
    attention_kernels.reset()
    attention_kernels.set_preference("auto")
    yield
    attention_kernels.set_preference("auto")


def texts(count=24, seed=0):
    records = make_records(count, seed=seed)
    return [record["question"] for record in records[: count // 2]] + [record["pos_doc"][0] for record in records]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-6)).item()


def forward_and_gradients(model, batch, autocast: bool):
    """Pooled embeddings and the gradients of a fixed projection of them (dropout off)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        embeddings = model(batch["input_ids"], batch["attention_mask"])
    projection = torch.linspace(-1, 1, embeddings.shape[1], device="cuda")
    (embeddings.float() @ projection).pow(2).sum().backward()
    return embeddings.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()
                                 if p.grad is not None}


@pytest.mark.parametrize("case, kernel", [("bert", "auto"), ("qwen3_causal", "auto"), ("qwen3_bidirectional", "auto"),
                                          ("bert", "torch_varlen")])
def test_padding_free_bf16_forward_and_gradients_equal_padded(case, kernel, gpu_bert, gpu_qwen3, caplog):
    if kernel == "flex" and attention_kernels.unavailable_reason("flex", torch.device("cuda"), torch.bfloat16, 64):
        pytest.skip("this torch has no FlexAttention")
    path = gpu_bert if case == "bert" else gpu_qwen3
    attention = {"qwen3_causal": "causal", "qwen3_bidirectional": "bidirectional"}.get(case)
    torch.manual_seed(0)
    reference = EmbeddingModel.from_pretrained(path, attention=attention).cuda().train()
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    padded = copy.deepcopy(reference)
    with caplog.at_level(logging.INFO, logger="finetune.model.packing"):
        packed = EmbeddingModel.from_pretrained(path, attention=attention, padding_free=True,
                                                attention_kernel=kernel).cuda().train()
        packed.load_state_dict(reference.state_dict())
        for module in packed.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        batch = packed.tokenizer(texts(), padding=True, truncation=True, max_length=128, return_tensors="pt").to("cuda")
        exact, exact_grads = forward_and_gradients(reference, batch, autocast=False)
        rounded, rounded_grads = forward_and_gradients(padded, batch, autocast=True)
        result, result_grads = forward_and_gradients(packed, batch, autocast=True)
    assert packed.position_rule is not None
    expected = kernel if kernel != "auto" else ("flash_attn" if attention_kernels._flash_attn_function() else
                                                "torch_varlen")
    assert f"Padding-free attention kernel: {expected} (cuda" in caplog.text, caplog.text
    assert not attention_kernels._failed, attention_kernels._failed
    assert relative_error(result, exact) <= 2 * relative_error(rounded, exact) + 1e-2
    names = sorted(exact_grads)
    flat = {which: torch.cat([grads[name].float().flatten() for name in names])
            for which, grads in (("exact", exact_grads), ("rounded", rounded_grads), ("result", result_grads))}
    assert relative_error(flat["result"], flat["exact"]) <= 2 * relative_error(flat["rounded"], flat["exact"]) + 1e-2
    for name in names:  # and no single weight's gradient points elsewhere
        cosine = torch.nn.functional.cosine_similarity(result_grads[name].float().flatten(),
                                                       exact_grads[name].float().flatten(), dim=0)
        assert cosine > 0.99 or exact_grads[name].abs().max() < 1e-6, (name, cosine.item())


def test_attention_dropout_runs_through_the_fused_kernel_and_replays(gpu_bert, monkeypatch):
    """BERT's attention dropout (0.1) in training: PyTorch's varlen_attn has none, so FlashVarlenFunction calls the
    ATen flash kernels with it. Same seed, same output and gradients (the backward replays the mask); another seed
    or no dropout, another output; gradients finite."""
    model = EmbeddingModel.from_pretrained(gpu_bert, padding_free=True, attention_kernel="torch_varlen").cuda().train()
    assert model.encoder.config.attention_probs_dropout_prob > 0
    calls = []
    original = attention_kernels.FlashVarlenFunction.apply
    monkeypatch.setattr(attention_kernels.FlashVarlenFunction, "apply",
                        lambda *args: calls.append(args[5]) or original(*args))
    batch = model.tokenizer(texts(), padding=True, return_tensors="pt").to("cuda")
    forward_and_gradients(model, batch, autocast=True)  # the first call checks the kernels (draws random numbers)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(forward_and_gradients(model, batch, autocast=True))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][name], runs[1][1][name]) for name in runs[0][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    assert all(torch.isfinite(gradient).all() for gradient in runs[0][1].values())
    assert calls and set(calls) == {pytest.approx(0.1)}, calls  # every layer of every run, with BERT's dropout


def test_fp32_on_cuda_encodes_length_grouped_padded_sub_batches(gpu_bert, caplog, monkeypatch):
    """No fused kernel takes fp32: the model encodes padded sub-batches (never the grouped-SDPA loop), same vectors."""
    padded = EmbeddingModel.from_pretrained(gpu_bert).cuda().eval()
    packed = EmbeddingModel.from_pretrained(gpu_bert, padding_free=True).cuda().eval()
    batch = packed.tokenizer(texts(), padding=True, return_tensors="pt").to("cuda")
    calls = []
    monkeypatch.setattr("finetune.model.embedding_model.encode_packed", lambda *args: calls.append(1) or packing.encode_packed(*args))
    with caplog.at_level(logging.WARNING, logger="finetune.model.embedding_model"), torch.no_grad():
        result = packed(batch["input_ids"], batch["attention_mask"])
        reference = padded(batch["input_ids"], batch["attention_mask"])
    assert not calls
    assert "padded sub-batches grouped by length" in caplog.text
    torch.testing.assert_close(result, reference, atol=1e-4, rtol=1e-4)


def test_the_chosen_kernel_on_this_gpu_is_fused():
    kernel = attention_kernels.chosen_kernel(torch.device("cuda"), torch.bfloat16, 64)
    assert kernel in ("flash_attn", "torch_varlen"), kernel


# ------------------------------------------------------------------------------------------- training steps
def train_flags(model, tmp_path, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", make_records(48, seed=5))
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", str(tmp_path / "out"),
            "--per_device_train_batch_size", "8", "--num_hard_negatives", "1", "--max_steps", "2",
            "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "0", "--report_to", "none",
            "--bf16", "true", "--passage_max_length", "128", *extra]


def logged_losses(output_dir) -> list[float]:
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("run", ["default", "gradcache", "lora_decoder"])
def test_one_training_step(run, gpu_bert, gpu_qwen3, tmp_path, caplog):
    from finetune import train

    extra = {"default": [], "gradcache": ["--gradcache_mini_batch_size", "4"],
             "lora_decoder": ["--lora_r", "8", "--gradient_checkpointing", "true"]}[run]
    model = gpu_qwen3 if run == "lora_decoder" else gpu_bert
    with caplog.at_level(logging.INFO):
        train.main(train_flags(model, tmp_path, *extra))
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert re.search(r"Padding-free attention kernel: (torch_varlen|flash_attn) \(cuda", caplog.text), caplog.text
    assert not attention_kernels._failed, attention_kernels._failed


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "fsdp.yaml"])
def test_one_training_step_sharded(config, gpu_bert, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / config), "--num_processes", "1", str(ROOT / "finetune" / "train.py"),
               *train_flags(gpu_bert, tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=80)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert (tmp_path / "out" / "modules.json").is_file()
    assert re.search(r"Padding-free attention kernel: (torch_varlen|flash_attn) \(cuda", result.stdout + result.stderr)


def test_flex_candidate_forward_and_gradients_equal_padded(gpu_bert, gpu_qwen3, caplog):
    """FlexAttention with a document mask, the candidate where no varlen kernel runs (last: it compiles)."""
    test_padding_free_bf16_forward_and_gradients_equal_padded("qwen3_causal", "flex", gpu_bert, gpu_qwen3, caplog)

"""Benchmark helpers that decide what a GPU run measures: the decoder shapes of benchmarks/llm_embedders.py."""

import importlib.util

import pytest
import torch
from transformers import Qwen3Config, Qwen3Model

from conftest import ROOT


def load_benchmark(name: str):
    """A benchmarks/ script as a module, without putting benchmarks/ on sys.path (its objectives.py and
    sharded_search.py would shadow finetune's modules for every later test)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llm_embedders = load_benchmark("llm_embedders")


def test_qwen3_0_6b_shape_is_a_valid_grouping():
    config = llm_embedders.decoder_config(1024, 28, 151936, 16000, eos_token_id=0)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size,
            config.vocab_size) == (16, 8, 128, 3072, 151936)
    with pytest.raises(ValueError, match="must be a multiple of key/value heads"):
        llm_embedders.decoder_config(1000, 2, 0, 100, eos_token_id=0)


def test_the_old_decoder_shape_reproduces_the_gpu_crash_and_the_new_one_runs():
    """The H200 crash ('size of tensor a (16) must match ... b (15)') came from the benchmark's config: hidden 1024
    gave 16 query heads over 1024 // 192 = 5 key/value heads (repeat_kv made 15 of them). One layer of each shape,
    padded, on this CPU."""
    input_ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    old = Qwen3Config(vocab_size=100, hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=16, num_key_value_heads=1024 // 192, head_dim=64)
    # SDPA with grouped-query support says so directly; transformers' repeat_kv path (the GPU's) failed on 16 vs 15
    with pytest.raises(RuntimeError, match=r"tensor a \(16\) must match the size of tensor b \(15\)|"
                                           r"key and value must divide the number of heads"):
        Qwen3Model(old)(input_ids=input_ids, attention_mask=mask)
    new = llm_embedders.decoder_config(1024, 1, 100, 100, eos_token_id=0)
    new.intermediate_size = 64
    hidden = Qwen3Model(new)(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (2, 7, 1024) and torch.isfinite(hidden).all()


def test_objectives_benchmark_with_seeds_reports_mean_and_sd_of_the_seeded_runs(monkeypatch, tmp_path):
    """--seeds: each fine-tune of the table is a finetune.seeds sweep; the row is the mean, with the sd beside it."""
    import statistics

    from finetune import seeds

    objectives = load_benchmark("objectives")
    finals = {"1": {"ndcg@10": 0.70, "mrr@10": 0.60, "recall@1": 0.50},
              "2": {"ndcg@10": 0.74, "mrr@10": 0.66, "recall@1": 0.52}}
    calls = []

    def fake_sweep(seed_list, argv, folder):
        calls.append((seed_list, folder))
        return {"runs": {seed: {"final": values} for seed, values in finals.items()}}

    monkeypatch.setattr(seeds, "sweep", fake_sweep)
    monkeypatch.setattr(objectives, "SEEDS", [1, 2])
    row = objectives.fine_tune(str(tmp_path / "run"), 40, "--temperature", "0.05")
    assert calls == [([1, 2], str(tmp_path / "run"))]
    assert row["ndcg@10"] == pytest.approx(0.72) and row["ndcg@10_sd"] == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert row["recall@1_sd"] == pytest.approx(statistics.stdev([0.50, 0.52]))

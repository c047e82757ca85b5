"""python -m finetune.interpolate (WiSE-FT): written folders against weights interpolated by hand, exact endpoints,
the tuned layout (dtype, shards, merged LoRA), one-line refusals, atomic writes, and the sweep's choice."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from finetune import interpolate, train
from finetune.model.embedding_model import EmbeddingModel

from conftest import build_tiny_bert, make_records, write_jsonl

TEXTS = ["alpha beta gamma river", "python function returns list", "query document passage", "city village castle"]


def save_tuned(model_path: str, folder: Path, *, seed: int = 1, dtype: torch.dtype | None = None) -> str:
    """A SentenceTransformer folder of ``model_path`` with every weight moved a little (a stand-in fine-tune)."""
    model = EmbeddingModel.from_pretrained(model_path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(str(folder))
    return str(folder)


def weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (single or sharded)."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def by_hand(base: str, tuned: str, alpha: float) -> dict[str, torch.Tensor]:
    """The reference: (1 - alpha) base + alpha tuned, in fp64, in the tuned dtype."""
    base_weights, tuned_weights = weights(base), weights(tuned)
    return {key: ((1 - alpha) * base_weights[key].double() + alpha * tuned_weights[key].double()).to(value.dtype)
            for key, value in tuned_weights.items()}


def encode_with(tuned: str, state_dict: dict[str, torch.Tensor]) -> np.ndarray:
    """The tuned SentenceTransformer with ``state_dict`` loaded into its transformer, encoding TEXTS."""
    model = SentenceTransformer(tuned, device="cpu")
    model[0].auto_model.load_state_dict(state_dict, strict=True)
    return model.encode(TEXTS, convert_to_numpy=True)


def run_cli(argv, monkeypatch, capsys) -> tuple[int, str]:
    """``python -m finetune.interpolate ARGV``'s exit code and stderr (what came before is dropped)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["finetune.interpolate", *argv])
    with pytest.raises(SystemExit) as exit_info:
        interpolate.cli()
    return exit_info.value.code, capsys.readouterr().err


def leftovers(parent: Path) -> list[str]:
    """Hidden staging folders that a write left beside its output."""
    return sorted(name for name in os.listdir(parent) if name.startswith("."))


@pytest.fixture(scope="module")
def tuned(tiny_bert, tmp_path_factory) -> str:
    return save_tuned(tiny_bert, tmp_path_factory.mktemp("tuned"))


def test_the_written_folder_loads_and_encodes_as_weights_interpolated_by_hand(tiny_bert, tuned, tmp_path):
    output_dir = tmp_path / "wise"
    interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--alpha", "0.3", "--output_dir", str(output_dir)])
    reference = by_hand(tiny_bert, tuned, 0.3)
    written = weights(output_dir)
    assert written.keys() == reference.keys()
    assert max((written[key] - reference[key]).abs().max().item() for key in reference) < 1e-6

    embeddings = SentenceTransformer(str(output_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(embeddings, encode_with(tuned, reference), atol=1e-6, rtol=0)
    for other in (weights(tiny_bert), weights(tuned)):  # neither input passes for the interpolation
        assert np.abs(embeddings - encode_with(tuned, other)).max() > 1e-3
    # The tuned model's files came along (prompts, pooling, normalisation), the record says what was written.
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "tokenizer.json",
                 "1_Pooling/config.json", "2_Normalize/config.json"):
        assert (output_dir / name).read_bytes() == (Path(tuned) / name).read_bytes(), name
    record = json.loads((output_dir / interpolate.RECORD_FILE).read_text())
    assert record["alpha"] == 0.3 and record["tuned"] == os.path.abspath(tuned)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_endpoints_are_the_inputs_bit_for_bit_and_the_tuned_dtype_is_kept(dtype, tiny_bert, tmp_path):
    tuned = save_tuned(tiny_bert, tmp_path / "tuned", seed=2, dtype=dtype)
    base_weights, tuned_weights = weights(tiny_bert), weights(tuned)
    outputs = {}
    for alpha in (0.0, 0.5, 1.0):
        interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--alpha", str(alpha),
                          "--output_dir", str(tmp_path / f"a{alpha}")])
        outputs[alpha] = weights(tmp_path / f"a{alpha}")
        assert all(tensor.dtype == dtype for tensor in outputs[alpha].values())
    for key, tuned_tensor in tuned_weights.items():
        assert torch.equal(outputs[1.0][key], tuned_tensor), key
        assert torch.equal(outputs[0.0][key], base_weights[key].to(dtype)), key
        # In between: computed in fp32, rounded once into the tuned dtype.
        expected = (0.5 * base_weights[key].float() + 0.5 * tuned_tensor.float()).to(dtype)
        assert torch.equal(outputs[0.5][key], expected), key


def test_a_sharded_tuned_folder_keeps_its_shards(tiny_bert, tmp_path):
    tuned = save_tuned(tiny_bert, tmp_path / "tuned", seed=3)
    model = EmbeddingModel.from_pretrained(tuned)
    os.remove(os.path.join(tuned, "model.safetensors"))
    model.encoder.save_pretrained(tuned, max_shard_size="20KB")
    shards = sorted(path.name for path in Path(tuned).glob("model-*.safetensors"))
    assert len(shards) > 1 and (Path(tuned) / "model.safetensors.index.json").is_file()

    output_dir = tmp_path / "wise"
    interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--alpha", "0.6", "--output_dir", str(output_dir)])
    assert sorted(path.name for path in output_dir.glob("*.safetensors")) == shards
    for shard in shards:  # every key stays in its shard
        assert load_file(str(output_dir / shard)).keys() == load_file(os.path.join(tuned, shard)).keys()
    reference = by_hand(tiny_bert, tuned, 0.6)
    written = weights(output_dir)
    assert max((written[key] - reference[key]).abs().max().item() for key in reference) < 1e-6
    np.testing.assert_allclose(SentenceTransformer(str(output_dir), device="cpu").encode(TEXTS),
                               encode_with(tuned, reference), atol=1e-6, rtol=0)


def test_a_merged_lora_fine_tune_interpolates_without_its_adapter_or_training_files(tiny_bert, train_file, tmp_path):
    tuned = tmp_path / "lora"
    train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(tuned),
                "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-2",
                "--warmup_steps", "0", "--max_steps", "2", "--save_steps", "2", "--use_cpu", "true",
                "--report_to", "none", "--dataloader_num_workers", "0", "--lora_r", "4"])
    assert (tuned / "lora_adapter").is_dir() and (tuned / "checkpoint-2").is_dir() and (tuned / "README.md").is_file()

    output_dir = tmp_path / "wise"
    interpolate.main(["--base", tiny_bert, "--tuned", str(tuned), "--alpha", "0.5", "--output_dir", str(output_dir)])
    reference = by_hand(tiny_bert, str(tuned), 0.5)
    assert any(not torch.equal(reference[key], weights(tiny_bert)[key]) for key in reference)  # LoRA moved weights
    np.testing.assert_allclose(SentenceTransformer(str(output_dir), device="cpu").encode(TEXTS),
                               encode_with(str(tuned), reference), atol=1e-6, rtol=0)
    names = {path.name for path in output_dir.iterdir()}
    assert not names & {"lora_adapter", "checkpoint-2", "README.md", "trainer_state.json", "all_results.json"}
    # The training's lengths and eval batch size come along: finetune.evaluate encodes every alpha alike.
    assert (output_dir / "training_run.json").read_bytes() == (tuned / "training_run.json").read_bytes()


def adapter_only_folder(folder: Path) -> str:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 32)},
              str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("case", ["more_layers", "other_shape", "adapter_only_base", "adapter_only_tuned",
                                  "alpha_above_one", "alpha_below_zero", "alpha_nan"])
def test_refusals_are_one_line_naming_both_folders(case, tiny_bert, tuned, tmp_path, monkeypatch, capsys):
    base, alpha, expected = tiny_bert, "0.5", []
    if case == "more_layers":
        base = build_tiny_bert(str(tmp_path / "deeper"), num_hidden_layers=3)
        expected = ["different weights", "'encoder.layer.2.", "only in --base"]
    elif case == "other_shape":
        base = build_tiny_bert(str(tmp_path / "wider"), intermediate_size=48)
        expected = ["different shapes", "'encoder.layer.0.intermediate.dense.bias': [48] in --base, [64] in --tuned"]
    elif case == "adapter_only_base":
        base = adapter_only_folder(tmp_path / "adapter")
        expected = ["LoRA adapter without model weights", "save merged weights"]
    elif case == "adapter_only_tuned":
        tuned = adapter_only_folder(tmp_path / "adapter")
        expected = ["--tuned", "LoRA adapter without model weights", "save merged weights"]
    else:
        alpha = {"alpha_above_one": "1.5", "alpha_below_zero": "-0.1", "alpha_nan": "nan"}[case]
        expected = [f"alpha must be within [0, 1], got {float(alpha)}"]
    output_dir = tmp_path / "wise"
    code, err = run_cli(["--base", base, "--tuned", tuned, "--alpha", alpha, "--output_dir", str(output_dir)],
                        monkeypatch, capsys)
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"error: cannot interpolate --base {base!r} and --tuned {tuned!r}: "), err
    for text in expected:
        assert text in err, err
    assert not output_dir.exists() and leftovers(tmp_path) == []


def test_a_recomputed_buffer_in_one_folder_only_is_no_difference_but_another_key_is(tiny_bert, tuned, tmp_path,
                                                                                     monkeypatch, capsys):
    """Old checkpoints (the packaged all-MiniLM-L6-v2) hold BERT's position_ids, which loading ignores."""
    base = tmp_path / "old_base"
    base.mkdir()
    (base / "config.json").write_bytes((Path(tiny_bert) / "config.json").read_bytes())
    tensors = weights(tiny_bert)
    save_file({**tensors, "embeddings.position_ids": torch.arange(128).unsqueeze(0)}, str(base / "model.safetensors"))
    interpolate.main(["--base", str(base), "--tuned", tuned, "--alpha", "0.5", "--output_dir", str(tmp_path / "ok")])
    assert weights(tmp_path / "ok").keys() == weights(tuned).keys()  # the tuned layout: no position_ids

    save_file({**tensors, "embeddings.extra.weight": torch.zeros(2)}, str(base / "model.safetensors"))
    code, err = run_cli(["--base", str(base), "--tuned", tuned, "--alpha", "0.5", "--output_dir",
                         str(tmp_path / "refused")], monkeypatch, capsys)
    assert code == 2 and "first differing key 'embeddings.extra.weight' (only in --base" in err, err


def test_a_failed_write_leaves_the_earlier_output_and_a_rerun_replaces_it(tiny_bert, tuned, tmp_path, monkeypatch,
                                                                          capsys):
    import safetensors.torch

    output_dir = tmp_path / "wise"
    interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--alpha", "0.2", "--output_dir", str(output_dir)])
    before = weights(output_dir)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", full_disk)
        with pytest.raises(OSError, match="No space left"):
            interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--alpha", "0.8", "--output_dir", str(output_dir)])
    assert all(torch.equal(before[key], tensor) for key, tensor in weights(output_dir).items())
    assert json.loads((output_dir / interpolate.RECORD_FILE).read_text())["alpha"] == 0.2
    assert leftovers(tmp_path) == []

    (tmp_path / ".wise.saving-4194303-0123abcd").mkdir()  # what a killed run (pid not running) leaves
    interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--alpha", "0.8", "--output_dir", str(output_dir)])
    assert json.loads((output_dir / interpolate.RECORD_FILE).read_text())["alpha"] == 0.8
    assert leftovers(tmp_path) == []
    # A folder that is not an earlier output is never replaced; nor is an input.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for target in (tmp_path / "other", Path(tuned)):
        code, err = run_cli(["--base", tiny_bert, "--tuned", tuned, "--alpha", "0.5", "--output_dir", str(target)],
                            monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and "--output_dir" in err, err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def alpha_of(folder: str, base: dict, tuned: dict) -> float:
    """Where the folder's weights lie on the line from base to tuned (least squares): the alpha it holds."""
    written = weights(folder)
    numerator = sum(((written[k] - base[k]) * (tuned[k] - base[k])).sum().item() for k in tuned)
    return numerator / sum(((tuned[k] - base[k]) ** 2).sum().item() for k in tuned)


DOMAIN_SCORES = {"rising": lambda a: 0.5 + 0.3 * a, "peak_at_half": lambda a: 0.5 + 0.3 * a - 0.3 * a ** 2,
                 "flat": lambda a: 0.5}


@pytest.mark.parametrize("sweep, limit, domain_shape, chosen", [
    ("0,0.25,0.5,0.75,1", 0.01, "rising", 0.25), ("0.25,0.5,0.75,1", 0.02, "rising", 0.5),
    ("0,0.25,0.5,0.75,1", 0.045, "rising", 0.75), ("0,0.5,1", 1.0, "rising", 1.0),
    ("0,0.25,0.5,0.75,1", 1.0, "peak_at_half", 0.5), ("0,0.25,0.5,0.75,1", 1.0, "flat", 0.0)])
def test_the_sweep_chooses_the_best_domain_alpha_within_the_general_limit(sweep, limit, domain_shape, chosen, tiny_bert,
                                                                          tuned, tmp_path, monkeypatch, capsys):
    """Scores made up from the weights each evaluated folder holds: the general score falls as 0.08 alpha^2 (drops
    0, 0.005, 0.02, 0.045, 0.08), so with a domain score rising to alpha 1 the limit picks a smaller alpha; without
    a binding limit the domain peak wins, and a tie goes to the smaller alpha."""
    import finetune.retrieval.evaluation

    base_weights, tuned_weights = weights(tiny_bert), weights(tuned)
    domain_file = write_jsonl(tmp_path / "domain.jsonl", make_records(4, seed=5))
    general_file = write_jsonl(tmp_path / "general.jsonl", make_records(6, seed=6))
    evaluated = []

    def made_up_scores(folder, dataset, **kwargs):
        alpha = round(alpha_of(folder, base_weights, tuned_weights), 6)
        general = len(dataset.queries) == 6
        evaluated.append((alpha, general))
        return {"ndcg@10": 0.8 - 0.08 * alpha ** 2 if general else DOMAIN_SCORES[domain_shape](alpha), "seconds": 0.0}
    monkeypatch.setattr(finetune.retrieval.evaluation, "evaluate_model", made_up_scores)

    output_dir = tmp_path / "wise"
    report = interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--sweep", sweep, "--data", domain_file,
                               "--general_data", general_file, "--max_general_drop", str(limit),
                               "--output_dir", str(output_dir)])
    alphas = sorted({0.0} | {float(a) for a in sweep.split(",")})
    assert sorted(evaluated) == sorted((a, g) for a in alphas for g in (False, True))  # each alpha's own weights
    assert report["chosen_alpha"] == chosen
    assert math.isclose(alpha_of(str(output_dir), base_weights, tuned_weights), chosen, abs_tol=1e-6)
    rows = {row["alpha"]: row for row in report["rows"]}
    assert [row["alpha"] for row in report["rows"]] == alphas
    for alpha, row in rows.items():
        assert math.isclose(row["general_drop"], 0.08 * alpha ** 2, abs_tol=1e-9)
        assert row["within_limit"] == (0.08 * alpha ** 2 <= limit + 1e-9)
    assert json.loads((output_dir / interpolate.REPORT_FILE).read_text()) == report
    assert (output_dir / interpolate.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(alphas)
    assert [line.split("|")[1].strip() for line in table[2:] if "<-" in line] == [f"{chosen:g}"]
    assert leftovers(tmp_path) == []


def test_the_sweep_evaluates_with_the_evaluate_stack(tiny_bert, tuned, tmp_path, capsys):
    """Real evaluations: alpha 1 scores as the tuned model, the chosen folder as the report says."""
    from finetune.retrieval.evaluation import evaluate_model
    from finetune.retrieval.sets import load_retrieval_set

    domain_file = write_jsonl(tmp_path / "domain.jsonl", make_records(12, seed=7))
    general_file = write_jsonl(tmp_path / "general.jsonl", make_records(12, seed=8))
    output_dir = tmp_path / "wise"
    report = interpolate.main(["--base", tiny_bert, "--tuned", tuned, "--sweep", "0.5,1", "--data", domain_file,
                               "--general_data", general_file, "--max_general_drop", "1", "--output_dir",
                               str(output_dir)])
    assert [row["alpha"] for row in report["rows"]] == [0.0, 0.5, 1.0]
    domain = load_retrieval_set([domain_file])
    last = report["rows"][-1]
    tuned_metrics = evaluate_model(tuned, domain)
    assert {k: v for k, v in last["domain"].items() if k != "seconds"} == \
        {k: v for k, v in tuned_metrics.items() if k != "seconds"}
    chosen = next(row for row in report["rows"] if row["alpha"] == report["chosen_alpha"])
    assert evaluate_model(str(output_dir), domain)["ndcg@10"] == chosen["domain"]["ndcg@10"]
    assert report["chosen_alpha"] == max(report["rows"], key=lambda row: (row["domain"]["ndcg@10"], -row["alpha"]))[
        "alpha"]  # a limit of 1 lets every alpha through
    assert "domain ndcg@10" in capsys.readouterr().out

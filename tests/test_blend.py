"""Blended training: dataset specs and their errors, the schedule (one dataset per block, weights, epochs),
per-dataset k, prompts, metrics and counts, 2 processes drawing alike, exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import kill_when, launch_two_processes, make_records, write_jsonl
from finetune import train
from finetune.data.blend import BlendedEpochSampler, BlendedTripletDataset, blend_weights, blocks_per_dataset
from finetune.training.config import ConfigError, parse_arguments

ROOT = Path(__file__).resolve().parent.parent


class Sized:
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def sampler(sizes, sampling="proportional", weights=None, block=4, seed=3):
    blend = BlendedTripletDataset([Sized(n) for n in sizes], [f"d{i}" for i in range(len(sizes))], sampling,
                                  weights or [])
    return BlendedEpochSampler(blend, block=block, seed=seed)


@pytest.fixture
def two_datasets(tmp_path):
    first = write_jsonl(tmp_path / "docs.jsonl", make_records(24, num_negatives=3, seed=1))
    second = write_jsonl(tmp_path / "faq.jsonl", make_records(12, num_negatives=3, seed=2))
    return first, second


# --------------------------------------------------------------------------------------------- specs
def test_specs_from_the_command_line_and_from_a_recipe(two_datasets, tmp_path):
    first, second = two_datasets
    _, data_args, _ = parse_arguments(["--use_cpu", "true", "--train_datasets", f"docs={first}:3", f"faq={second}"])
    assert [(s.name, s.files, s.weight) for s in data_args.train_specs] == [("docs", (first,), 3.0),
                                                                            ("faq", (second,), None)]
    recipe = tmp_path / "blend.yaml"
    recipe.write_text(f"""train_datasets:
  - name: docs
    files: [{first}]
    weight: 0.7
    query_prefix: "Instruct: find the docstring\\nQuery: "
  - {{name: faq, files: {second}, num_hard_negatives: 2, hard_negatives_mode: exclusive}}
dataset_sampling: weighted
use_cpu: true
""")
    _, data_args, _ = parse_arguments([str(recipe)])
    docs, faq = data_args.train_specs
    assert docs.query_prefix == "Instruct: find the docstring\nQuery: " and docs.weight == 0.7
    assert (faq.num_hard_negatives, faq.hard_negatives_mode, faq.files) == (2, "exclusive", (second,))


@pytest.mark.parametrize("values, message", [
    (["docs={first}", "docs={second}"], "duplicate dataset name"),
    (["docs={first}:0"], "weight must be a number > 0"),
    (["docs={first}:-2"], "weight must be a number > 0"),
    (["docs=/nowhere/x.jsonl"], "Data file not found"),
    (['{{"name": "docs", "files": "{first}", "wieght": 2}}'], "unknown key\\(s\\) \\['wieght'\\]"),
    (['{{"name": "docs"}}'], "'files' is missing"),
    (["just-a-path.jsonl"], "expected name=path"),
    (['{{"name": "docs", "files": "{first}", "hard_negatives_mode": "all"}}'], "hard_negatives_mode must be one of"),
])
def test_bad_specs_are_one_clear_error(two_datasets, values, message):
    first, second = two_datasets
    values = [value.format(first=first, second=second) for value in values]
    with pytest.raises(ConfigError, match=message):
        parse_arguments(["--use_cpu", "true", "--train_datasets", *values])


def test_train_file_and_train_datasets_exclude_each_other(two_datasets):
    first, second = two_datasets
    with pytest.raises(ConfigError, match="not both"):
        parse_arguments(["--use_cpu", "true", "--train_file", first, "--train_datasets", f"x={second}"])
    with pytest.raises(ConfigError, match="--dataset_temperature needs --dataset_sampling weighted"):
        parse_arguments(["--use_cpu", "true", "--train_datasets", f"x={second}", "--dataset_temperature", "2"])


# -------------------------------------------------------------------------------------------- schedule
def test_weighted_draws_match_the_weights_on_a_long_schedule():
    weights = blend_weights([40, 40, 40], [7, 2, 1], None)
    blend = sampler([40, 40, 40], "weighted", weights, block=4)
    drawn = Counter(d for epoch in range(100) for d in blend.schedule(epoch))
    total = sum(drawn.values())  # 100 epochs x 30 blocks
    for index, weight in enumerate(weights):  # tolerance: 4 standard deviations of a binomial share
        assert abs(drawn[index] / total - weight) < 4 * (weight * (1 - weight) / total) ** 0.5, (index, drawn)


def test_temperature_flattens_size_proportional_weights():
    assert blend_weights([100, 25], [None, None], 1.0) == pytest.approx([0.8, 0.2])
    assert blend_weights([100, 25], [None, None], 2.0) == pytest.approx([2 / 3, 1 / 3])


@pytest.mark.parametrize("sampling", ["proportional", "round_robin", "weighted"])
def test_every_block_and_every_process_batch_holds_one_dataset(sampling):
    blend = sampler([10, 7, 23], sampling, blend_weights([10, 7, 23], [1, 1, 1], None), block=6)  # 2 processes x 3
    blend.set_epoch(2)
    keys = list(blend)
    assert len(keys) == len(blend) and {epoch for epoch, _, _ in keys} == {2}
    batches = [keys[i:i + 3] for i in range(0, len(keys), 3)]  # per-device batches; process = batch index mod 2
    for step in range(0, len(batches), 2):
        datasets = {d for batch in batches[step:step + 2] for _, d, _ in batch}
        assert len(datasets) == 1, (step, batches[step:step + 2])
    assert keys == list(blend)  # a pure function of (seed, epoch): resume replays it


def test_what_an_epoch_is():
    proportional = sampler([10, 7, 23], block=4)
    keys = list(proportional)
    for d, size in enumerate([10, 7, 23]):  # every record at least once; blocks are completed from the next pass
        assert {i for _, dd, i in keys if dd == d} == set(range(size))
    assert Counter(proportional.schedule(0)) == {0: 3, 1: 2, 2: 6}
    assert proportional.schedule(0) != proportional.schedule(1)
    round_robin = sampler([10, 7, 23], "round_robin", block=4)
    assert round_robin.schedule(0) == [0, 1, 2, 0, 1, 2]  # until the smallest (2 blocks) is used up
    assert blocks_per_dataset(round_robin, 8) == [3, 3, 2]  # 6 blocks of epoch 0, 2 of epoch 1


def test_validation_batches_hold_one_dataset_each():
    from finetune.data.blend import BlendedEvalSampler

    blend = BlendedTripletDataset([Sized(5), Sized(2), Sized(9)], ["a", "b", "c"])
    keys = list(BlendedEvalSampler(blend, block=4))
    assert len(keys) % 4 == 0
    for start in range(0, len(keys), 4):
        assert len({d for _, d, _ in keys[start:start + 4]}) == 1
    assert {(d, i) for _, d, i in keys} == {(d, i) for d, n in enumerate([5, 2, 9]) for i in range(n)}


# ------------------------------------------------------------------------------------------- training
def blend_args(model, first, second, output_dir, *extra):
    return ["--model_name_or_path", model, "--output_dir", str(output_dir), "--use_cpu", "true", "--report_to", "none",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--warmup_steps", "0",
            "--logging_steps", "1", "--dataloader_num_workers", "0", "--num_hard_negatives", "1",
            "--train_datasets", json.dumps({"name": "docs", "files": first, "query_prefix": "search: "}),
            json.dumps({"name": "faq", "files": second, "num_hard_negatives": 3, "weight": 2}), *extra]


def test_blended_run_per_dataset_k_prompts_metrics_and_counts(tiny_bert, two_datasets, tmp_path):
    first, second = two_datasets
    val_a = write_jsonl(tmp_path / "val_a.jsonl", make_records(6, seed=8))
    val_b = write_jsonl(tmp_path / "val_b.jsonl", make_records(5, seed=9))
    output_dir = tmp_path / "out"
    metrics = train.main(blend_args(tiny_bert, first, second, output_dir, "--max_steps", "6",
                                    "--dataset_sampling", "weighted", "--per_device_eval_batch_size", "4",
                                    "--validation_datasets",  # another order, and one dataset not trained on
                                    json.dumps({"name": "faq", "files": val_b, "num_hard_negatives": 3}),
                                    f"docs={val_a}", f"extra={val_b}",
                                    "--metric_for_best_model", "faq_ndcg@10", "--load_best_model_at_end", "true",
                                    "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "3"))
    for name in ("ndcg@10", "mrr@10"):
        parts = [metrics[f"eval_{dataset}_{name}"] for dataset in ("docs", "faq", "extra")]
        assert metrics[f"eval_{name}"] == pytest.approx(sum(parts) / 3)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert all(entry["dataset_docs"] + entry["dataset_faq"] == pytest.approx(1.0) for entry in steps)
    assert all(entry["dataset_docs"] in (0.0, 1.0) for entry in steps)  # one dataset per step
    run = json.loads((output_dir / "training_run.json").read_text())
    seen = {entry["name"]: entry for entry in run["train_datasets"]}
    drawn_docs = sum(entry["dataset_docs"] for entry in steps)
    assert (seen["docs"]["batches"], seen["faq"]["batches"]) == (drawn_docs, 6 - drawn_docs)
    assert seen["docs"]["records"] == 4 * seen["docs"]["batches"] and seen["docs"]["query_prefix"] == "search: "
    card = (output_dir / "README.md").read_text()
    assert '| docs | docs.jsonl | "search: " | "" |' in card
    prompts = json.loads((output_dir / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "", "document": ""}  # the saved model keeps the default pair


def test_two_processes_draw_the_same_dataset_at_every_step(tiny_bert_without_dropout, two_datasets, tmp_path):
    first, second = two_datasets
    output_dir = tmp_path / "two"
    result = launch_two_processes([str(ROOT / "finetune" / "train.py"),
                                   *blend_args(tiny_bert_without_dropout, first, second, output_dir, "--max_steps", "4",
                                               "--dataset_sampling", "weighted", "--save_steps", "100")])
    assert "World size 2" in result.stdout + result.stderr
    steps = [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    # The shares are averaged over the processes: 0.5 would mean they drew different datasets.
    assert len(steps) == 4 and all(entry["dataset_docs"] in (0.0, 1.0) for entry in steps)


def test_sigkill_then_rerun_ends_at_the_same_weights(tiny_bert, two_datasets, tmp_path):
    first, second = two_datasets
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    extra = ("--max_steps", "60", "--save_steps", "10", "--logging_steps", "10", "--dataset_sampling", "weighted")
    command = [sys.executable, str(ROOT / "finetune" / "train.py"), *blend_args(tiny_bert, first, second, killed, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    returncode = kill_when(command, killed / "checkpoint-20" / "checkpoint_complete.json", env)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    train.main(blend_args(tiny_bert, first, second, straight, *extra))
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert max((a[key] - b[key]).abs().max().item() for key in a) < 1e-6


def test_dispatch_by_dataset_id_with_a_default():
    import torch

    from finetune.objectives.builtin import DatasetDispatch
    from finetune.objectives.base import EmbeddedBatch, ObjectiveOutput

    def constant(value):
        return lambda batch: ObjectiveOutput(torch.tensor(value))

    dispatch = DatasetDispatch({0: constant(1.0), 2: constant(3.0)}, ["docs", "faq", "extra"], default=constant(9.0),
                               logged=[0, 2])
    batch = EmbeddedBatch(torch.zeros(1, 2), torch.zeros(1, 2))
    for index, loss in [(0, 1.0), (2, 3.0), (1, 9.0), (None, 9.0)]:
        batch.dataset_index = index
        output = dispatch(batch)
        assert output.loss.item() == loss
        assert set(output.components) == {"dataset_docs", "dataset_extra"}


def test_blocks_seen_with_accumulation_across_epochs():
    from types import SimpleNamespace

    blend = sampler([8, 4], block=4)  # 3 blocks per epoch
    trainer = SimpleNamespace(_get_train_sampler=lambda dataset: blend, state=SimpleNamespace(global_step=3),
                              args=SimpleNamespace(gradient_accumulation_steps=2))
    dataset = BlendedTripletDataset([Sized(8), Sized(4)], ["a", "b"])
    # 2 updates per epoch (2 blocks, then the 1 left): 3 updates = 3 blocks of epoch 0 + 2 of epoch 1.
    seen = train.datasets_seen(trainer, dataset)
    expected = Counter(blend.schedule(0)) + Counter(blend.schedule(1)[:2])
    assert [entry["batches"] for entry in seen] == [expected[0], expected[1]] and sum(expected.values()) == 5


@pytest.mark.parametrize("temperature", [None, 2.0])
def test_blend_weights_from_the_command_line_reach_the_sampler(tiny_bert, two_datasets, tmp_path, temperature):
    """``name=path:weight`` and ``--dataset_sampling weighted`` (with and without ``--dataset_temperature``) are what
    the trainer's sampler draws by: the weights given (3 and the default 1), or the sizes^(1/T) instead."""
    from finetune.data.examples import TripletCollator
    from finetune.model.embedding_model import EmbeddingModel
    from finetune.training.trainer import EmbeddingTrainer
    from finetune.training.inputs import build_training_data, read_data

    first, second = two_datasets  # 24 and 12 records
    argv = ["--model_name_or_path", tiny_bert, "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
            "--report_to", "none", "--per_device_train_batch_size", "4", "--train_datasets", f"docs={first}:3",
            f"faq={second}", "--dataset_sampling", "weighted"]
    if temperature is not None:
        argv += ["--dataset_temperature", str(temperature)]
    _, data_args, training_args = parse_arguments(argv)
    model = EmbeddingModel.from_pretrained(tiny_bert)
    data = build_training_data(read_data(data_args, training_args), data_args, training_args, model.tokenizer)
    trainer = EmbeddingTrainer(model=model, args=training_args, train_dataset=data.train,
                               data_collator=TripletCollator(model.tokenizer), objective=data.objective)
    blend = trainer._get_train_sampler()
    expected = [0.75, 0.25] if temperature is None else [24 ** 0.5 / (24 ** 0.5 + 12 ** 0.5),
                                                          12 ** 0.5 / (24 ** 0.5 + 12 ** 0.5)]
    assert isinstance(blend, BlendedEpochSampler) and blend.sampling == "weighted"
    assert blend.weights == pytest.approx(expected)
    drawn = Counter(d for epoch in range(300) for d in blend.schedule(epoch))  # 300 epochs x 9 blocks
    total = sum(drawn.values())
    for index, weight in enumerate(expected):  # 4 standard deviations; sizes alone (2/3) or equal weights are out
        assert abs(drawn[index] / total - weight) < 4 * (weight * (1 - weight) / total) ** 0.5, (index, drawn)

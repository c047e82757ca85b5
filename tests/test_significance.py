"""Paired statistics (finetune.retrieval.significance) against independent computations, and the command's
comparison of two models: per-query file, differences, intervals, p-values, MTEB result files."""

import importlib.util
import itertools
import json
import math
import random
import sys

import numpy as np
import pytest
import scipy.stats

from finetune.retrieval.significance import (bootstrap_interval, bootstrap_means, compare_paired,
                                             sign_flip_p_value)


def exact_bootstrap_quantiles(values: list[float], tails: tuple[float, float]) -> list[float]:
    """The ideal bootstrap (every one of the n^n resamples once), by plain loops; quantiles interpolated linearly
    between order statistics, numpy's default."""
    n = len(values)
    means = sorted(sum(values[i] for i in picks) / n for picks in itertools.product(range(n), repeat=n))
    quantiles = []
    for tail in tails:
        position = tail * (len(means) - 1)
        below = math.floor(position)
        quantiles.append(means[below] + (position - below) * (means[min(below + 1, len(means) - 1)] - means[below]))
    return quantiles


def exact_sign_flip_p_value(values: list[float]) -> float:
    """Every one of the 2^n sign assignments once, by plain loops: the share whose |sum| reaches the observed."""
    observed = abs(sum(values))
    flips = list(itertools.product((1, -1), repeat=len(values)))
    return sum(abs(sum(s * v for s, v in zip(signs, values))) >= observed - 1e-12 for signs in flips) / len(flips)


def test_bootstrap_interval_converges_to_the_ideal_bootstrap():
    rng = random.Random(5)
    values = [rng.uniform(-0.5, 1.0) for _ in range(6)]  # 6^6 = 46656 resamples: enumerable
    spread = np.std(values) / math.sqrt(len(values))  # the bootstrap means' standard deviation
    for confidence in (0.95, 0.8):
        tails = ((1 - confidence) / 2, (1 + confidence) / 2)
        low, high = bootstrap_interval(values, samples=200_000, confidence=confidence, seed=1)
        expected_low, expected_high = exact_bootstrap_quantiles(values, tails)
        # Monte Carlo error of these quantiles at 200000 resamples: ~0.005 spread; a wrong level moves them ~0.3.
        assert low == pytest.approx(expected_low, abs=0.03 * spread)
        assert high == pytest.approx(expected_high, abs=0.03 * spread)


def test_bootstrap_interval_agrees_with_scipy():
    rng = np.random.default_rng(7)
    differences = rng.normal(0.05, 0.3, size=40)
    low, high = bootstrap_interval(differences, samples=100_000, confidence=0.95, seed=3)
    theirs = scipy.stats.bootstrap((differences,), np.mean, n_resamples=100_000, confidence_level=0.95,
                                   method="percentile", random_state=np.random.default_rng(11)).confidence_interval
    spread = differences.std() / math.sqrt(len(differences))
    assert low == pytest.approx(theirs.low, abs=0.04 * spread) and high == pytest.approx(theirs.high, abs=0.04 * spread)


def test_p_value_converges_to_the_exact_sign_flip_test_and_equals_scipy_exactly_enumerated():
    rng = random.Random(3)
    values = [rng.gauss(0.05, 0.4) for _ in range(12)]  # 2^12 = 4096 sign assignments: enumerable
    exact = exact_sign_flip_p_value(values)
    assert 0.02 < exact < 0.5  # a p-value in the interesting range
    # scipy enumerates the same 4096 assignments (fewer than n_resamples) for paired samples: a check of the loop.
    zeros = np.zeros(len(values))
    theirs = scipy.stats.permutation_test((np.array(values), zeros), lambda x, y, axis: np.mean(x - y, axis=axis),
                                          permutation_type="samples", n_resamples=10_000, vectorized=True).pvalue
    assert theirs == pytest.approx(exact, abs=1e-12)
    ours = sign_flip_p_value(values, permutations=200_000, seed=2)
    # Monte Carlo error at 200000 permutations: sqrt(p (1 - p) / R) < 0.0012.
    assert ours == pytest.approx(exact, abs=0.006)


def test_no_flip_reaching_the_observed_gives_the_smallest_p_value():
    differences = np.full(100, 0.25)  # only the two uniform flips (probability 2^-99) reach the observed sum
    assert sign_flip_p_value(differences, permutations=999, seed=0) == 1 / 1000
    assert sign_flip_p_value(differences, permutations=10_000, seed=0) == 1 / 10_001


def test_identical_models_give_no_difference_a_zero_interval_and_p_one():
    baseline = np.random.default_rng(0).random((50, 3))
    result = compare_paired(baseline, baseline.copy(), samples=2_000, permutations=2_000)
    assert result.difference.tolist() == [0.0, 0.0, 0.0]
    assert result.low.tolist() == [0.0, 0.0, 0.0] and result.high.tolist() == [0.0, 0.0, 0.0]
    assert result.p_value.tolist() == [1.0, 1.0, 1.0]


def test_a_clear_difference_is_significant_and_its_interval_excludes_zero():
    rng = np.random.default_rng(1)
    baseline = rng.random(80)
    candidate = np.clip(baseline + 0.1 + rng.normal(0, 0.1, 80), 0, 1)
    result = compare_paired(baseline, candidate)
    assert result.difference == pytest.approx(candidate.mean() - baseline.mean(), abs=1e-12)
    assert 0 < result.low < result.difference < result.high
    assert result.p_value < 0.05
    noise = compare_paired(baseline, np.clip(baseline + rng.normal(0, 0.1, 80), 0, 1))  # no real difference
    assert noise.low < 0 < noise.high and noise.p_value > 0.05


def test_deterministic_given_a_seed_whatever_the_chunk_size():
    rng = np.random.default_rng(4)
    baseline, candidate = rng.random((30, 2)), rng.random((30, 2))
    first = compare_paired(baseline, candidate, samples=3_000, permutations=3_000, seed=9)
    again = compare_paired(baseline, candidate, samples=3_000, permutations=3_000, seed=9, max_elements=7)
    for ours, theirs in zip(first, again):
        assert np.array_equal(ours, theirs)
    other = compare_paired(baseline, candidate, samples=3_000, permutations=3_000, seed=10)
    assert not np.array_equal(first.low, other.low) and not np.array_equal(first.p_value, other.p_value)


def test_metrics_share_the_resamples_and_each_column_is_its_own_one_metric_comparison():
    rng = np.random.default_rng(6)
    baseline, candidate = rng.random((25, 3)), rng.random((25, 3))
    together = compare_paired(baseline, candidate, samples=2_000, permutations=2_000, seed=5)
    for column in range(3):
        alone = compare_paired(baseline[:, column], candidate[:, column], samples=2_000, permutations=2_000, seed=5)
        assert together.difference[column] == pytest.approx(alone.difference, abs=1e-15)  # summed in another order
        assert [float(value[column]) for value in together[1:]] == list(alone[1:])
    # The resampled means are those of the drawn queries: a resample of one query repeated is that query's value.
    means = bootstrap_means(np.array([[1.0], [2.0]]), samples=500, seed=0)
    assert set(np.round(means[:, 0] * 2).tolist()) <= {2.0, 3.0, 4.0} and len(set(means[:, 0].tolist())) == 3


@pytest.mark.parametrize("call, message", [
    (lambda: compare_paired(np.zeros(3), np.zeros(4)), "equal shapes"),
    (lambda: compare_paired(np.zeros(0), np.zeros(0)), "Q >= 1"),
    (lambda: bootstrap_interval(np.zeros(3), confidence=1.0), "confidence"),
    (lambda: sign_flip_p_value(np.zeros(3), permutations=0), "permutations must be >= 1"),
    (lambda: sign_flip_p_value(np.array([0.0, np.nan])), "finite"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_command_compares_two_models_writes_per_query_lines_and_mteb_files(tiny_bert, tmp_path, capsys):
    from conftest import make_records, write_jsonl
    from finetune.evaluate import __main__ as evaluate
    from finetune.metrics.retrieval.retrieval import METRIC_NAMES
    from finetune.model.embedding_model import EmbeddingModel
    from finetune.retrieval.comparison import compare_to_first

    data = write_jsonl(tmp_path / "val.jsonl", make_records(15, seed=8))
    model_a, model_b = str(tmp_path / "a"), str(tmp_path / "b")
    EmbeddingModel.from_pretrained(tiny_bert, pooling="mean").save_pretrained(model_a)
    EmbeddingModel.from_pretrained(tiny_bert, pooling="cls").save_pretrained(model_b)
    per_query_file, output_json, mteb_folder = tmp_path / "per_query.jsonl", tmp_path / "m.json", tmp_path / "mteb"
    output = evaluate.main(["--model_name_or_path", model_a, model_b, "--data", data, "--output_json", str(output_json),
                            "--per_query_output", str(per_query_file), "--bootstrap_samples", "2000",
                            "--permutations", "2000", "--seed", "3", "--mteb_output_folder", str(mteb_folder)])
    printed = capsys.readouterr().out
    assert json.loads(output_json.read_text()) == output
    assert output.keys() == {model_a, model_b, "comparisons"}
    for model in (model_a, model_b):  # the per-model entries are as they were
        assert output[model].keys() == {*METRIC_NAMES, "ingroup_accuracy", "ingroup_mrr", "seconds"}

    lines = [json.loads(line) for line in per_query_file.read_text().splitlines()]
    assert len(lines) == 2 * 15 and [line["model"] for line in lines] == [model_a] * 15 + [model_b] * 15
    assert all(line.keys() == {"model", "query_id", "query", *METRIC_NAMES} for line in lines)
    per_query = {model: {line["query_id"]: {m: line[m] for m in METRIC_NAMES}
                         for line in lines if line["model"] == model} for model in (model_a, model_b)}
    for model in (model_a, model_b):
        for metric in METRIC_NAMES:  # the file's values average, in its order, to the printed metrics
            values = [values[metric] for values in per_query[model].values()]
            assert sum(values) / len(values) == output[model][metric]

    comparison = output["comparisons"][model_b]
    assert comparison["baseline"] == model_a and comparison["queries"] == 15 and comparison["seed"] == 3
    assert list(comparison["metrics"]) == list(METRIC_NAMES)
    for metric, values in comparison["metrics"].items():
        assert values["difference"] == pytest.approx(output[model_b][metric] - output[model_a][metric], abs=1e-12)
        assert values["low"] <= values["difference"] <= values["high"] and 0 < values["p_value"] <= 1
    assert any(values["difference"] != 0 for values in comparison["metrics"].values())  # the models do differ
    # Deterministic given the seed, and the per-query file holds all it takes to recompute the comparison.
    assert compare_to_first(per_query, samples=2000, permutations=2000, seed=3) == output["comparisons"]
    assert f"{model_b} - {model_a} (15 queries; paired bootstrap 95% interval" in printed
    assert "| metric     | difference | 95% interval" in printed

    for model in (model_a, model_b):  # MTEB result files: DIR/<model, "/" -> "__">/<data file's base name>.json
        result = json.loads((mteb_folder / model.strip("/").replace("/", "__") / "val.json").read_text())
        assert result.keys() == {"dataset_revision", "task_name", "mteb_version", "evaluation_time",
                                 "kg_co2_emissions", "scores"}
        assert result["task_name"] == "val" and result["evaluation_time"] == output[model]["seconds"]
        assert len(result["dataset_revision"]) == 64
        installed = importlib.util.find_spec("mteb") is not None
        assert (result["mteb_version"] is not None) == installed
        (scores,) = result["scores"]["test"]
        assert scores == {"ndcg_at_10": output[model]["ndcg@10"], "mrr_at_10": output[model]["mrr@10"],
                          "recall_at_1": output[model]["recall@1"], "recall_at_10": output[model]["recall@10"],
                          "recall_at_100": output[model]["recall@100"], "map_at_100": output[model]["map@100"],
                          "main_score": output[model]["ndcg@10"], "hf_subset": "default", "languages": ["eng-Latn"]}


def test_mteb_tasks_without_mteb_end_in_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    from finetune.evaluate import __main__ as evaluate

    monkeypatch.setitem(sys.modules, "mteb", None)  # not importable, installed or not
    monkeypatch.setattr(sys, "argv", ["finetune.evaluate", "--model_name_or_path", str(tmp_path / "no-model"),
                                      "--data", str(tmp_path / "no-data.jsonl"), "--mteb_tasks", "SciFact"])
    with pytest.raises(SystemExit) as exited:
        evaluate.cli()
    error = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(error.splitlines()) == 1
    assert error.startswith("error: --mteb_tasks needs the `mteb` package")


STUB_MTEB = '''
calls = []

class ResultCache:
    def __init__(self, cache_path=None):
        self.cache_path = cache_path

class _TaskResult:
    def __init__(self, name):
        self.task_name = name
    def get_score(self):
        return 0.25

class _ModelResult:
    def __init__(self, task_results):
        self.task_results = task_results

def get_tasks(tasks):
    return ["task " + name for name in tasks]

def evaluate(model, tasks, *, cache=None):
    calls.append((model, tasks, cache))
    return _ModelResult([_TaskResult(task.removeprefix("task ")) for task in tasks])
'''


def test_mteb_tasks_run_with_the_installed_package_on_each_model(tiny_bert, tmp_path, monkeypatch, capsys):
    """A stand-in ``mteb`` (the 2.x interface): each model goes to ``mteb.evaluate`` as a SentenceTransformer with
    its prompts, the named tasks with it, the output folder as its result cache; the main scores are printed."""
    from sentence_transformers import SentenceTransformer

    from conftest import make_records, write_jsonl
    from finetune.evaluate import __main__ as evaluate
    from finetune.model.embedding_model import EmbeddingModel

    (tmp_path / "stub" / "mteb").mkdir(parents=True)
    (tmp_path / "stub" / "mteb" / "__init__.py").write_text(STUB_MTEB)
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    monkeypatch.delitem(sys.modules, "mteb", raising=False)
    model = str(tmp_path / "model")
    EmbeddingModel.from_pretrained(tiny_bert, query_prefix="query: ").save_pretrained(model)
    data = write_jsonl(tmp_path / "val.jsonl", make_records(6, seed=9))
    evaluate.main(["--model_name_or_path", model, "--data", data, "--mteb_tasks", "SciFact", "NFCorpus",
                   "--mteb_output_folder", str(tmp_path / "mteb")])
    import mteb

    ((sent, tasks, cache),) = mteb.calls
    assert isinstance(sent, SentenceTransformer) and sent.prompts["query"] == "query: "
    assert tasks == ["task SciFact", "task NFCorpus"] and cache.cache_path == str(tmp_path / "mteb")
    printed = capsys.readouterr().out
    assert f"MTEB SciFact: main score 0.2500 ({model})" in printed and "MTEB NFCorpus: main score 0.2500" in printed

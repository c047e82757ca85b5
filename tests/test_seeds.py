"""python -m finetune.seeds: one recipe, several seeds; mean, sd and t-intervals checked against statistics/scipy."""

import json
import statistics
import subprocess
import sys

import pytest
from scipy import stats

from finetune import seeds as seeds_module


def test_summary_against_statistics_and_scipy():
    values = [0.71, 0.74, 0.69, 0.73]
    result = seeds_module.summary(values)
    assert result["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
    assert result["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=statistics.mean(values), scale=stats.sem(values))
    assert (result["low"], result["high"]) == pytest.approx((low, high), abs=1e-12)
    assert seeds_module.summary([0.5]) == {"mean": 0.5, "sd": 0.0, "low": 0.5, "high": 0.5, "n": 1}


def test_sweep_trains_each_seed_reports_gain_and_resumes(tiny_bert, train_file, validation_file, tmp_path,
                                                         monkeypatch):
    train_argv = ["--model_name_or_path", tiny_bert, "--train_file", train_file, "--validation_file", validation_file,
                  "--per_device_train_batch_size", "4", "--num_hard_negatives", "2", "--learning_rate", "1e-3",
                  "--max_steps", "3", "--save_steps", "3", "--use_cpu", "true", "--report_to", "none"]
    out = tmp_path / "sweep"
    result = seeds_module.main(["--output_dir", str(out), "--seeds", "3", "7", "--", *train_argv])
    finals = [json.loads((out / f"seed-{seed}" / "all_results.json").read_text())["eval_ndcg@10"] for seed in (3, 7)]
    assert finals[0] != finals[1]  # the seed reached the runs (new weights' init, data order)
    assert result["metrics"]["ndcg@10"]["mean"] == pytest.approx(statistics.mean(finals), abs=1e-12)
    assert result["metrics"]["ndcg@10"]["sd"] == pytest.approx(statistics.stdev(finals), abs=1e-12)
    base = result["base"]["ndcg@10"]
    assert result["gain"]["ndcg@10"]["mean"] == pytest.approx(statistics.mean(finals) - base, abs=1e-12)
    assert json.loads((out / "seeds.json").read_text())["metrics"] == result["metrics"]

    from finetune import train
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("a finished seed was trained again"))
    again = seeds_module.main(["--output_dir", str(out), "--seeds", "3", "7", "--", *train_argv])
    assert again["metrics"] == result["metrics"]


def test_refusals_are_one_line_with_exit_code_2(tmp_path):
    for argv in (["--output_dir", str(tmp_path), "--seeds", "1", "1"],
                 ["--output_dir", str(tmp_path), "--", "--seed", "3"]):
        result = subprocess.run([sys.executable, "-m", "finetune.seeds", *argv], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")

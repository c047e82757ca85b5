"""Train one recipe with several seeds and report what is signal and what is noise.

    python -m finetune.seeds --output_dir outputs/seeds --seeds 1 2 3 4 5 -- [recipe.yaml] [--flags ...]
    python -m finetune.seeds --output_dir outputs/seeds --num_seeds 5            # the default job, seeds 0..4

Everything after ``--`` is what ``finetune/train.py`` takes; each run gets ``--seed S`` (weights of new heads,
dropout and, unless ``--data_seed`` is given, the data order and the negatives drawn) and ``--output_dir
OUTPUT_DIR/seed-S``, one run after the other in this process. A finished run (its ``all_results.json``
exists) is read, not trained again, so an interrupted sweep resumes. The runs need validation data: the
metrics are each run's final evaluation, and the base model's are its evaluation before training (step 0).

For every metric it reports the mean, the standard deviation over seeds (n - 1) and a 95% t-interval of the mean;
and the same for the gain over the base model. Written to ``OUTPUT_DIR/seeds.json`` (atomically) and printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from finetune.metrics.retrieval.retrieval import METRIC_NAMES
from finetune.training.checkpointing import write_json_atomic

logger = logging.getLogger("finetune.seeds")
RESULTS_FILE = "seeds.json"


def summary(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """mean, sd (n - 1; 0 for one value), and the t-interval of the mean [low, high] (the mean itself for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1)) if n > 1 else 0.0
    if n > 1:
        from scipy import stats

        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    else:
        half = 0.0
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "n": n}


def run_metrics(output_dir: str) -> tuple[dict[str, float], dict[str, float]]:
    """(final, base) validation metrics of a finished run: ``all_results.json``'s eval_* and the step-0 evaluation."""
    with open(os.path.join(output_dir, "all_results.json"), encoding="utf-8") as handle:
        final = {name.removeprefix("eval_"): value for name, value in json.load(handle).items()
                 if name.startswith("eval_")}
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    base = next(({name.removeprefix("eval_"): value for name, value in entry.items() if name.startswith("eval_")}
                 for entry in history if entry.get("step") == 0 and "eval_ndcg@10" in entry), {})
    return final, base


def sweep(seeds: list[int], train_argv: list[str], output_dir: str) -> dict:
    """Train (or read) every seed's run; returns the per-seed metrics and their summaries."""
    from finetune import train

    runs = {}
    for seed in seeds:
        folder = os.path.join(output_dir, f"seed-{seed}")
        if not os.path.isfile(os.path.join(folder, "all_results.json")):
            logger.info("Seed %d: training into %s", seed, folder)
            train.main([*train_argv, "--seed", str(seed), "--output_dir", folder])
        else:
            logger.info("Seed %d: finished before, reading %s", seed, folder)
        final, base = run_metrics(folder)
        if "ndcg@10" not in final:
            raise ValueError(f"{folder} has no retrieval metrics: give the runs validation data (--validation_file).")
        runs[seed] = {"final": final, "base": base}
    names = [name for name in METRIC_NAMES if all(name in run["final"] for run in runs.values())]
    result = {"seeds": seeds, "train_argv": train_argv, "runs": {str(seed): run for seed, run in runs.items()},
              "metrics": {name: summary([run["final"][name] for run in runs.values()]) for name in names}}
    if all(name in run["base"] for run in runs.values() for name in names):
        result["base"] = {name: runs[seeds[0]]["base"][name] for name in names}
        result["gain"] = {name: summary([run["final"][name] - run["base"][name] for run in runs.values()])
                          for name in names}
    return result


def format_table(result: dict) -> str:
    """One row per metric: base, mean +- sd over seeds, the interval of the mean, the gain and its interval."""
    gain = result.get("gain", {})
    lines = [f"{len(result['seeds'])} seeds: {', '.join(map(str, result['seeds']))}",
             "| metric | base | mean | sd | 95% interval | gain | 95% interval of the gain |",
             "|---|---|---|---|---|---|---|"]
    for name, value in result["metrics"].items():
        base = result.get("base", {}).get(name)
        row_gain = gain.get(name)
        lines.append(f"| {name} | {'-' if base is None else f'{base:.4f}'} | {value['mean']:.4f} | {value['sd']:.4f} | "
                     f"[{value['low']:.4f}, {value['high']:.4f}] | "
                     + ("- | - |" if row_gain is None else
                        f"{row_gain['mean']:+.4f} | [{row_gain['low']:+.4f}, {row_gain['high']:+.4f}] |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m finetune.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True,
                        help="Parent folder: each seed trains into OUTPUT_DIR/seed-S; the summary is OUTPUT_DIR/seeds.json.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="The seeds to train with (default: 0..N-1).")
    parser.add_argument("--num_seeds", type=int, default=5, help="How many seeds when --seeds is not given (default 5).")
    args = parser.parse_args(own)
    seeds = args.seeds if args.seeds is not None else list(range(args.num_seeds))
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, at least one; got {seeds}.")
    if "--output_dir" in train_argv or "--seed" in train_argv:
        raise ValueError("Give --output_dir before '--' (the parent folder) and no --seed after it: each run gets "
                         "its own.")
    if not train_argv:  # the default job, as `python finetune/train.py` with no arguments runs it
        from finetune.training.config import DEFAULT_RECIPE

        train_argv = [DEFAULT_RECIPE]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = sweep(seeds, train_argv, args.output_dir)
    write_json_atomic(os.path.join(args.output_dir, RESULTS_FILE), result, indent=2)
    print(format_table(result))
    return result


def cli() -> None:
    from finetune.training.distributed import run_command

    run_command(main)


if __name__ == "__main__":
    cli()

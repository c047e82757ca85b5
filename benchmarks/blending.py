"""Blended training against single-dataset runs: per-dataset held-out metrics.

The bundled example data is split in two by the module a docstring belongs to (``a``-``m`` and
``n``-``z``: two "domains"), each half with its own instruction. Three fine-tunes of the default job's
settings (all-MiniLM-L6-v2, batch 16, 40 steps, seed 42): on the first half only, on the second half
only, and on both blended (--train_datasets, proportional sampling). Each is evaluated on both halves
of the validation set (--validation_datasets: eval_<name>_ndcg@10 and their mean).

    python benchmarks/blending.py [--output_dir outputs/blending] [--max_steps 40] [--sampling proportional]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil

from finetune import train
from finetune.training.arguments import EXAMPLE_TRAIN_FILE, EXAMPLE_VALIDATION_FILE
from finetune.training.checkpointing import write_json_atomic
from finetune.training.config import DEFAULT_RECIPE

INSTRUCTIONS = {"a_to_m": "Find the docstring (modules a-m): ", "n_to_z": "Find the docstring (modules n-z): "}


def split_by_module(source: str, folder: str) -> dict[str, str]:
    """Two seed files, by the first letter of the module that names each record's positive ("tarfile.TarFile...")."""
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    halves = {name: [] for name in INSTRUCTIONS}
    for record in records:
        halves["a_to_m" if record["pos_doc"][0][:1].lower() <= "m" else "n_to_z"].append(record)
    paths = {}
    for name, part in halves.items():
        paths[name] = os.path.join(folder, f"{os.path.basename(source).split('.')[0]}_{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in part)
    return paths


def spec(name: str, path: str) -> str:
    return json.dumps({"name": name, "files": path, "query_prefix": INSTRUCTIONS[name]})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/blending", help="Work folder (replaced).")
    parser.add_argument("--max_steps", type=int, default=40, help="Steps of each fine-tune (default 40).")
    parser.add_argument("--sampling", default="proportional", help="--dataset_sampling of the blended run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Train each run once per seed (python -m finetune.seeds) and report the mean (sd in "
                             "results.json). Default: one run each, the recipe's seed.")
    args = parser.parse_args(argv)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir)
    train_halves = split_by_module(EXAMPLE_TRAIN_FILE, args.output_dir)
    validation_halves = split_by_module(EXAMPLE_VALIDATION_FILE, args.output_dir)
    validation = ["--validation_datasets", *(spec(name, path) for name, path in validation_halves.items())]
    runs = {"a_to_m only": [spec("a_to_m", train_halves["a_to_m"])],
            "n_to_z only": [spec("n_to_z", train_halves["n_to_z"])],
            f"blended ({args.sampling})": [spec(name, path) for name, path in train_halves.items()]}
    results = {}
    keys = ("a_to_m_ndcg@10", "n_to_z_ndcg@10", "ndcg@10", "a_to_m_mrr@10", "n_to_z_mrr@10")
    for name, datasets in runs.items():
        argv = [DEFAULT_RECIPE, "--max_steps", str(args.max_steps), "--report_to", "none", "--eval_on_start", "false",
                "--train_datasets", *datasets, "--dataset_sampling", args.sampling, *validation]
        folder = os.path.join(args.output_dir, name.split()[0])
        if args.seeds:
            from finetune.seeds import summary, sweep

            seeded = sweep(args.seeds, argv, folder)["runs"].values()
            stats = {key: summary([run["final"][key] for run in seeded]) for key in keys}
            results[name] = {**{key: stats[key]["mean"] for key in keys},
                             **{f"{key}_sd": stats[key]["sd"] for key in keys}}
        else:
            metrics = train.main([*argv, "--output_dir", folder])
            results[name] = {key: metrics[f"eval_{key}"] for key in keys}
        write_json_atomic(os.path.join(args.output_dir, "results.json"), results, indent=2)
    sizes = {name: sum(1 for _ in open(path, encoding="utf-8")) for name, path in train_halves.items()}
    print(f"\ntraining records: {sizes}")
    print("\n| training data | nDCG@10 a-m | nDCG@10 n-z | mean nDCG@10 | MRR@10 a-m | MRR@10 n-z |\n|---|---|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {values['a_to_m_ndcg@10']:.4f} | {values['n_to_z_ndcg@10']:.4f} | {values['ndcg@10']:.4f} | "
              f"{values['a_to_m_mrr@10']:.4f} | {values['n_to_z_mrr@10']:.4f} |")
    return results


if __name__ == "__main__":
    main()

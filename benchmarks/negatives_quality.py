"""What hard negatives and false-negative filtering buy: three fine-tunes of the default job, held-out nDCG@10.

(a) in-batch negatives only (--num_hard_negatives 0); (b) negatives mined without the false-negative
filter (python -m data_prep.mine --max_score_ratio none); (c) the bundled, filtered negatives (0.95 x
positive). Same model, steps, batch and seed (finetune/recipes/example.yaml); evaluated on the bundled
validation set.

    python benchmarks/negatives_quality.py [--output_dir outputs/negatives-quality] [--max_steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from data_prep import mine
from finetune import train
from finetune.training.arguments import EXAMPLE_TRAIN_FILE, EXAMPLE_VALIDATION_FILE
from finetune.training.config import DEFAULT_RECIPE


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/negatives-quality", help="Work folder (replaced).")
    parser.add_argument("--max_steps", type=int, default=40, help="Steps of each fine-tune (default 40).")
    args = parser.parse_args(argv)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir)
    unfiltered = os.path.join(args.output_dir, "train_unfiltered.jsonl")
    mine.main(["--input", EXAMPLE_TRAIN_FILE, "--output", unfiltered, "--num_negatives", "5", "--range_max", "30",
               "--max_score_ratio", "none"])
    runs = {"(a) in-batch only": ["--num_hard_negatives", "0"],
            "(b) mined, unfiltered": ["--train_file", unfiltered],
            "(c) mined, filtered (bundled)": []}
    results = {}
    for name, extra in runs.items():
        folder = os.path.join(args.output_dir, name.split()[0].strip("()"))
        metrics = train.main([DEFAULT_RECIPE, "--output_dir", folder, "--max_steps", str(args.max_steps),
                              "--eval_on_start", "false", "--report_to", "none",
                              "--validation_file", EXAMPLE_VALIDATION_FILE, *extra])
        results[name] = {key: metrics.get(f"eval_{key}") for key in ("ndcg@10", "mrr@10", "recall@1", "loss")}
    print("\n| negatives | held-out nDCG@10 | MRR@10 | Recall@1 |\n|---|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {values['ndcg@10']:.4f} | {values['mrr@10']:.4f} | {values['recall@1']:.4f} |")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()

"""Benchmark: the teacher loop on the bundled data, against the plain fine-tune, over several seeds.

    python benchmarks/teacher_loop.py --work outputs/teacher-loop --seeds 0 1 2
    python benchmarks/teacher_loop.py --work outputs/teacher-loop --reranker outputs/reranker   # reuse a reranker

1. A cross-encoder trained on the training records (``finetune/train.py --model_type cross-encoder``, from the
   packaged MiniLM, 3 hard negatives, pairs of 32 + 128 tokens) into WORK/reranker, unless ``--reranker`` names one.
2. Its raw logits for every (question, document) of the training records: ``python -m data_prep.score``.
3. The default job over the seeds (``python -m finetune.seeds``), plain and with ``--distillation kl`` on the
   scored records (the only change), into WORK/plain and WORK/distilled.
Prints held-out nDCG@10 and MRR@10 per arm (mean, sd) and the per-seed paired gain with its 95% t-interval.
Reranking each arm's top 100 with the reranker is ``python -m finetune.evaluate --reranker`` (docs/rerankers.md).
Every step is skipped when its output exists, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "data_prep", "example_data", "train.jsonl.gz")
RERANKER_ARGS = ["--model_type", "cross-encoder", "--per_device_train_batch_size", "16", "--num_hard_negatives", "3",
                 "--query_max_length", "32", "--passage_max_length", "128", "--learning_rate", "5e-5",
                 "--warmup_steps", "0.1", "--logging_steps", "10", "--seed", "42", "--report_to", "none"]


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/teacher-loop", help="Folder for every step's output.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of both arms (default 0 1 2).")
    parser.add_argument("--reranker", default=None, help="A trained cross-encoder to use instead of training one.")
    parser.add_argument("--reranker_steps", type=int, default=60, help="Steps of the cross-encoder (default 60).")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.work)
    reranker = args.reranker or os.path.join(work, "reranker")
    if not os.path.isfile(os.path.join(reranker, "config.json")):
        run([sys.executable, "finetune/train.py", *RERANKER_ARGS, "--max_steps", str(args.reranker_steps),
             "--save_steps", str(args.reranker_steps), "--output_dir", reranker])
    scored = os.path.join(work, "train.scored.jsonl.gz")
    if not os.path.isfile(scored):
        run([sys.executable, "-m", "data_prep.score", "--teacher", reranker, "--input", TRAIN, "--output", scored,
             "--passage_max_length", "160", "--batch_size", "64"])
    seeds = [str(seed) for seed in args.seeds]
    run([sys.executable, "-m", "finetune.seeds", "--output_dir", os.path.join(work, "plain"), "--seeds", *seeds])
    run([sys.executable, "-m", "finetune.seeds", "--output_dir", os.path.join(work, "distilled"), "--seeds", *seeds,
         "--", os.path.join(ROOT, "finetune", "recipes", "example.yaml"), "--train_file", scored,
         "--distillation", "kl"])
    from finetune.seeds import summary

    arms = {arm: json.load(open(os.path.join(work, arm, "seeds.json"), encoding="utf-8")) for arm in ("plain", "distilled")}
    result = {}
    print("| metric | base | plain (mean ± sd) | distilled (mean ± sd) | paired gain | 95% interval |")
    print("|---|---|---|---|---|---|")
    for metric in ("ndcg@10", "mrr@10"):
        gain = summary([arms["distilled"]["runs"][s]["final"][metric] - arms["plain"]["runs"][s]["final"][metric]
                        for s in seeds])
        plain, distilled = arms["plain"]["metrics"][metric], arms["distilled"]["metrics"][metric]
        result[metric] = {"plain": plain, "distilled": distilled, "gain": gain}
        print(f"| {metric} | {arms['plain']['base'][metric]:.4f} | {plain['mean']:.4f} ± {plain['sd']:.4f} | "
              f"{distilled['mean']:.4f} ± {distilled['sd']:.4f} | {gain['mean']:+.4f} | "
              f"[{gain['low']:+.4f}, {gain['high']:+.4f}] |")
    return result


if __name__ == "__main__":
    main()

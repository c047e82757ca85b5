"""What the objectives buy on held-out data: Matryoshka sizes, distillation, in-batch directions.

Every run is the default job (finetune/recipes/example.yaml: packaged all-MiniLM-L6-v2, bundled example
data, same seed, batch and steps) with one change, evaluated on the bundled validation set.

- matryoshka: a plain fine-tune and a Matryoshka fine-tune (--matryoshka_dims 384,256,128,64), nDCG@10 of
  both (and of the base model) at 384/256/128/64 dimensions.
- distillation: a teacher (the default job trained --teacher_steps steps) scores the training set
  (python -m data_prep.score --teacher_type bi-encoder); students from the base model at equal steps:
  ranking only, ranking + KL, pure KL, pure MarginMSE (teacher temperature = the student's, 0.05).
- directions: query_to_doc alone vs all four directions.

    python benchmarks/objectives.py [--sections matryoshka,distillation,directions] [--max_steps 40]

Prints one Markdown table per section and writes OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

from data_prep import score
from finetune import train
from finetune.training.arguments import EXAMPLE_TRAIN_FILE, EXAMPLE_VALIDATION_FILE, default_model_path
from finetune.training.checkpointing import write_json_atomic
from finetune.training.config import DEFAULT_RECIPE
from finetune.retrieval.sets import load_retrieval_set
from finetune.retrieval.evaluation import score_embeddings

DIMS = (384, 256, 128, 64)
ALL_DIRECTIONS = "query_to_doc,doc_to_query,query_to_query,doc_to_doc"


SEEDS: list[int] | None = None  # --seeds: every fine-tune runs once per seed (finetune.seeds); tables show mean and sd


def fine_tune(folder: str, max_steps: int, *extra: str) -> dict:
    argv = [DEFAULT_RECIPE, "--max_steps", str(max_steps), "--eval_on_start", "false", "--report_to", "none",
            "--overwrite_output_dir", "true", "--validation_file", EXAMPLE_VALIDATION_FILE, *extra]
    keys = ("ndcg@10", "mrr@10", "recall@1")
    if SEEDS:
        from finetune.seeds import summary, sweep

        runs = sweep(SEEDS, argv, folder)["runs"].values()
        stats = {key: summary([run["final"][key] for run in runs]) for key in keys}
        return {**{key: stats[key]["mean"] for key in keys}, **{f"{key}_sd": stats[key]["sd"] for key in keys}}
    metrics = train.main([*argv, "--output_dir", folder])
    return {key: metrics.get(f"eval_{key}") for key in keys}


def ndcg_by_dimension(model_path: str, dims=DIMS) -> dict[int, float]:
    """nDCG@10 on the validation set at each size, from one encoding (prompts as saved; cosine re-normalises)."""
    from sentence_transformers import SentenceTransformer

    dataset = load_retrieval_set([EXAMPLE_VALIDATION_FILE])
    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = 128
    query_ids, doc_ids = list(dataset.queries), list(dataset.corpus)
    query_emb = model.encode_query([dataset.queries[q] for q in query_ids], convert_to_tensor=True).float()
    corpus_emb = model.encode_document([dataset.corpus[d] for d in doc_ids], convert_to_tensor=True).float()
    return {dim: score_embeddings(query_emb[:, :dim], corpus_emb[:, :dim], query_ids, doc_ids, dataset)["ndcg@10"]
            for dim in dims}


def matryoshka(work: str, max_steps: int) -> dict:
    runs = {"base model (no fine-tune)": None, "plain fine-tune": [],
            "Matryoshka fine-tune": ["--matryoshka_dims", ",".join(map(str, DIMS))]}
    results = {}
    for name, extra in runs.items():
        path = default_model_path()
        if extra is not None:
            path = os.path.join(work, name.split()[0].lower())
            fine_tune(path, max_steps, *extra)
        results[name] = ndcg_by_dimension(path)
    print("\n| model | " + " | ".join(f"nDCG@10 at {dim}" for dim in DIMS) + " |\n|---|" + "---|" * len(DIMS))
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{values[dim]:.4f}" for dim in DIMS) + " |")
    return results


def distillation(work: str, max_steps: int, teacher_steps: int) -> dict:
    teacher = os.path.join(work, "teacher")
    teacher_metrics = fine_tune(teacher, teacher_steps)
    scored = os.path.join(work, "train.scored.jsonl")
    score.main(["--teacher", teacher, "--teacher_type", "bi-encoder", "--input", EXAMPLE_TRAIN_FILE, "--output", scored,
                "--query_max_length", "32", "--passage_max_length", "128", "--batch_size", "64"])
    common = ["--train_file", scored, "--num_hard_negatives", "3", "--teacher_temperature", "0.05"]
    runs = {"ranking only": [], "ranking + KL": ["--distillation", "kl"],
            "pure KL": ["--distillation", "kl", "--ranking_weight", "0"],
            "pure MarginMSE": ["--distillation", "margin_mse", "--ranking_weight", "0"]}
    results = {f"teacher ({teacher_steps} steps, ranking)": teacher_metrics}
    for name, extra in runs.items():
        results[name] = fine_tune(os.path.join(work, name.replace(" ", "_").replace("+", "and")), max_steps,
                                  *common, *extra)
    _print_rows(results, "student (base model, equal steps)")
    return results


def directions(work: str, max_steps: int) -> dict:
    results = {"query_to_doc": fine_tune(os.path.join(work, "query_to_doc"), max_steps),
               "all four directions": fine_tune(os.path.join(work, "all_directions"), max_steps,
                                                "--ranking_directions", ALL_DIRECTIONS)}
    _print_rows(results, "directions")
    return results


def _print_rows(results: dict, label: str) -> None:
    print(f"\n| {label} | held-out nDCG@10 | MRR@10 | Recall@1 |\n|---|---|---|---|")
    for name, values in results.items():
        cells = [f"{values[key]:.4f}" + (f" ± {values[key + '_sd']:.4f}" if key + "_sd" in values else "")
                 for key in ("ndcg@10", "mrr@10", "recall@1")]
        print(f"| {name} | {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/objectives", help="Work folder (replaced).")
    parser.add_argument("--sections", default="matryoshka,distillation,directions",
                        help="Comma-separated sections to run (default: all three).")
    parser.add_argument("--max_steps", type=int, default=40, help="Steps of each fine-tune (default 40, the default job).")
    parser.add_argument("--teacher_steps", type=int, default=160, help="Steps of the distillation teacher (default 160).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="Train every fine-tune once per seed (python -m finetune.seeds) and report mean ± sd. "
                             "Default: one run each, the recipe's seed.")
    args = parser.parse_args(argv)
    global SEEDS
    SEEDS = args.seeds
    torch.manual_seed(0)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir)
    sections = {"matryoshka": lambda work: matryoshka(work, args.max_steps),
                "distillation": lambda work: distillation(work, args.max_steps, args.teacher_steps),
                "directions": lambda work: directions(work, args.max_steps)}
    results = {}
    for name in args.sections.split(","):
        results[name] = sections[name](os.path.join(args.output_dir, name))
        write_json_atomic(os.path.join(args.output_dir, "results.json"), results, indent=2)
    return results


if __name__ == "__main__":
    main()

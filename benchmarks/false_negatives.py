"""False negatives inside the loss, measured on training data with planted false negatives.

A copy of the bundled training set (data_prep/example_data/train.jsonl.gz) gets false negatives planted in a
share of its records (seeded): half of them get (a) a reworded copy of their positive among their hard
negatives (sentences reversed, the qualified name moved to the end: another text, so duplicate masking does
not catch it); the other half get (b) a sibling record, the same question with another wording of the answer
(the name and the first sentence only), each record's positive planted among the other's negatives: another
record's positive that answers the same question. Then the default job (finetune/recipes/example.yaml: packaged
all-MiniLM-L6-v2, batch 16, 40 steps, seed 42, one hard negative per query drawn from neg_doc) is trained on it
with and without the options, one run at a time, and evaluated on the bundled validation set (clean).

    python benchmarks/false_negatives.py                     # stats, then the three runs (each a default-job
                                                             # fine-tune: ~3 min on an idle 2-core CPU)
    python benchmarks/false_negatives.py --runs none         # only the planted data and its guide statistics

``--stats`` (on by default) first prints, for the base model on a sample of the planted training records, how far
below the positive's cosine each kind of candidate scores: what a --false_negative_margin separates (training
data only: the margin is not chosen on the held-out set). Prints a Markdown table; writes OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil

from finetune import train
from finetune.training.arguments import EXAMPLE_TRAIN_FILE, EXAMPLE_VALIDATION_FILE, default_model_path
from finetune.training.config import DEFAULT_RECIPE

RUNS = ("off", "masking", "masking+hardness")


def sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part]


def reworded(positive: str) -> str:
    """(a) The same content in another order: sentences reversed, the qualified name moved to the end."""
    name, colon, body = positive.partition(": ")
    if not colon:
        name, body = "", positive
    parts = sentences(body)
    body = " ".join(reversed(parts)) if len(parts) > 1 else body
    return f"{body} (from the documentation of {name})" if name else f"In other words: {body}"


def shortened(positive: str) -> str:
    """(b) Another answer to the same question: the name and the first sentence of the docstring only."""
    name, colon, body = positive.partition(": ")
    first = (sentences(body) or [body])[0]
    return f"{name} -- {first}" if colon else f"In short: {first}"


COPY, SIBLING, MINED = "planted (a) reworded copy", "planted (b) sibling's positive", "mined negative"


def plant(records: list[dict], share: float, seed: int) -> tuple[list[dict], dict, dict]:
    """A copy of ``records`` with false negatives planted in ``share`` of them (half copies, half siblings), its
    counts, and the kind of each planted (question, negative) pair."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(records)), round(share * len(records)))
    copies, siblings = set(chosen[: len(chosen) // 2]), set(chosen[len(chosen) // 2:])
    planted, added, kinds = [], [], {}
    for index, record in enumerate(records):
        record = json.loads(json.dumps(record))
        positive = record["pos_doc"][0]
        if index in copies:
            record["neg_doc"] = record["neg_doc"] + [reworded(positive)]
            kinds[record["question"], reworded(positive)] = COPY
        elif index in siblings:
            other = shortened(positive)
            added.append({"question": record["question"], "pos_doc": [other],
                          "neg_doc": record["neg_doc"] + [positive]})
            record["neg_doc"] = record["neg_doc"] + [other]
            kinds[record["question"], other] = kinds[record["question"], positive] = SIBLING
        planted.append(record)
    mixed = planted + added
    rng.shuffle(mixed)
    return mixed, {"records": len(mixed), "reworded_copies": len(copies), "sibling_pairs": len(siblings)}, kinds


def read_records(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def guide_statistics(records: list[dict], kinds: dict, sample: int, seed: int) -> dict:
    """Base model: positive's cosine minus each candidate's, by kind (planted copy, sibling's positive, mined)."""
    import torch

    from finetune.data.text import TextSide
    from finetune.model.embedding_model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(default_model_path())
    rng = random.Random(seed)
    chosen = rng.sample(records, min(sample, len(records)))
    with torch.no_grad():  # the default job's lengths: queries 32 tokens, documents 128
        queries = model.encode([record["question"] for record in chosen], TextSide("", 32))
        docs = model.encode([doc for record in chosen for doc in record["pos_doc"][:1] + record["neg_doc"]],
                            TextSide("", 128))
    gaps, start = {COPY: [], SIBLING: [], MINED: []}, 0
    for query, record in zip(queries, chosen):
        count = 1 + len(record["neg_doc"])
        cosines = torch.nn.functional.cosine_similarity(query[None], docs[start:start + count]).tolist()
        start += count
        for negative, cosine in zip(record["neg_doc"], cosines[1:]):
            gaps[kinds.get((record["question"], negative), MINED)].append(cosines[0] - cosine)
    summary = {}
    for kind, values in gaps.items():
        values.sort()
        if values:
            summary[kind] = {"count": len(values), "median_gap": values[len(values) // 2],
                             **{f"share_within_{m}": sum(v < m for v in values) / len(values)
                                for m in (0.0, 0.02, 0.05, 0.1)}}
    return summary


def fine_tune(folder: str, train_file: str, max_steps: int, *extra: str) -> dict:
    metrics = train.main([DEFAULT_RECIPE, "--output_dir", folder, "--train_file", train_file, "--max_steps",
                          str(max_steps), "--validation_file", EXAMPLE_VALIDATION_FILE, "--report_to", "none",
                          "--overwrite_output_dir", "true", *extra])
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
        logs = [entry for entry in json.load(handle)["log_history"] if "false_negatives_masked" in entry]
    masked = sum(entry["false_negatives_masked"] for entry in logs) / len(logs) if logs else None
    return {**{key: metrics.get(f"eval_{key}") for key in ("ndcg@10", "mrr@10", "recall@1")},
            "false_negatives_masked_per_step": masked}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/false-negatives", help="Work folder (replaced).")
    parser.add_argument("--share", type=float, default=0.5, help="Share of the records that get a planted false "
                                                                  "negative (default 0.5).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the planting (default 0).")
    parser.add_argument("--max_steps", type=int, default=40, help="Steps of each fine-tune (default 40).")
    parser.add_argument("--margin", type=float, default=0.0, help="--false_negative_margin of the runs with "
                                                                  "masking (default 0, GISTEmbed's; guide: self).")
    parser.add_argument("--hardness", type=float, default=10.0, help="--hardness_weighting of the last run "
                                                                     "(default 10: HCL's beta 0.5 at temperature 0.05).")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"Comma-separated runs out of {RUNS}, or 'none'.")
    parser.add_argument("--stats", type=int, default=300, help="Planted records sampled for the guide statistics "
                                                               "(0 = skip).")
    args = parser.parse_args(argv)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir)
    records, counts, kinds = plant(read_records(EXAMPLE_TRAIN_FILE), args.share, args.seed)
    planted_file = os.path.join(args.output_dir, "train_planted.jsonl")
    with open(planted_file, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    print(f"Planted data: {counts}")
    results = {"planting": {**counts, "share": args.share, "seed": args.seed}}
    if args.stats:
        results["guide_statistics"] = guide_statistics(records, kinds, args.stats, args.seed)
        print("\n| candidate (base model) | count | median cos(q, pos) - cos(q, c) | within 0 | 0.02 | 0.05 | 0.1 |")
        print("|---|---|---|---|---|---|---|")
        for kind, row in results["guide_statistics"].items():
            print(f"| {kind} | {row['count']} | {row['median_gap']:.3f} | " + " | ".join(
                f"{row[f'share_within_{m}']:.0%}" for m in (0.0, 0.02, 0.05, 0.1)) + " |")
    options = {"off": [], "masking": ["--false_negative_margin", str(args.margin)],
               "masking+hardness": ["--false_negative_margin", str(args.margin), "--hardness_weighting",
                                    str(args.hardness)]}
    runs = [] if args.runs == "none" else [name.strip() for name in args.runs.split(",")]
    for name in runs:
        results[name] = fine_tune(os.path.join(args.output_dir, name), planted_file, args.max_steps, *options[name])
        results[name]["options"] = " ".join(options[name]) or "(defaults)"
    if runs:
        print("\n| run (planted data) | options | held-out nDCG@10 | MRR@10 | Recall@1 | masked per step |")
        print("|---|---|---|---|---|---|")
        for name in runs:
            row = results[name]
            masked = "-" if row["false_negatives_masked_per_step"] is None else \
                f"{row['false_negatives_masked_per_step']:.1f}"
            print(f"| {name} | `{row['options']}` | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | "
                  f"{row['recall@1']:.4f} | {masked} |")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()

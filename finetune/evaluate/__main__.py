"""Evaluate SentenceTransformer-loadable models on a retrieval set; compare several side by side.

    python -m finetune.evaluate --model_name_or_path M [M2 ...] --data PATH [--output_json FILE]

PATH is a seed-format file/glob (queries = question, corpus = all pos_doc and neg_doc texts of the
file, qrels = pos_doc) or a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Models
are loaded with sentence-transformers itself, so any Hub id or local folder works, ours included;
their saved ``query``/``document`` prompts are applied as in training, and documents are ranked by
the similarity each model declares.

This folder has no ``__init__.py`` on purpose: ``accelerate launch finetune/train.py`` puts
``finetune/`` first on ``sys.path``, and a module named ``evaluate`` there would shadow the
``evaluate`` package; a folder without ``__init__.py`` never does (a regular package wins over a
namespace folder), while ``python -m finetune.evaluate`` still runs this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from finetune.checkpointing import write_json_atomic
from finetune.evaluation import METRIC_NAMES, evaluate_model, load_retrieval_set

logger = logging.getLogger("finetune.evaluate")


def format_table(results: dict[str, dict]) -> str:
    """Metrics as rows, models as columns; with two models a last column holds the difference."""
    names = list(results)
    header = ["metric"] + names + (["difference"] if len(names) == 2 else [])
    rows = []
    for metric in METRIC_NAMES:
        values = [results[name][metric] for name in names]
        row = [metric] + [f"{value:.4f}" for value in values]
        if len(names) == 2:
            row.append(f"{values[1] - values[0]:+.4f}")
        rows.append(row)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", nargs="+", required=True,
                        help="One or more SentenceTransformer-loadable models (Hub ids or folders).")
    parser.add_argument("--data", required=True, nargs="+",
                        help="Seed-format file(s)/glob(s), or one BEIR folder (corpus.jsonl, queries.jsonl, qrels/).")
    parser.add_argument("--split", default="test", help="BEIR qrels split, qrels/<split>.tsv (default: test).")
    parser.add_argument("--output_json", default=None, help="Also write the metrics as JSON to this file.")
    parser.add_argument("--batch_size", type=int, default=64, help="Encoding batch size (default 64).")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="Truncate texts to this many tokens (default: each model's own max_seq_length).")
    parser.add_argument("--truncate_dim", type=int, default=None,
                        help="Evaluate the embeddings cut to their first D dimensions (Matryoshka models; cosine "
                             "re-normalises). Default: the full embedding.")
    args = parser.parse_args(argv)
    if args.truncate_dim is not None and args.truncate_dim < 1:
        raise ValueError(f"--truncate_dim must be >= 1, got {args.truncate_dim}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    dataset = load_retrieval_set(args.data, split=args.split)
    logger.info("%d queries, %d documents", len(dataset.queries), len(dataset.corpus))
    results = {name: evaluate_model(name, dataset, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                                    truncate_dim=args.truncate_dim)
               for name in args.model_name_or_path}
    print(format_table(results))
    print(json.dumps(results, indent=2))
    if args.output_json:
        write_json_atomic(args.output_json, results, indent=2)
    return results


def cli() -> None:
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()

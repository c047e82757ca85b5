"""Build the bundled example data set from the docstrings of Python's standard library.

Each record pairs a docstring's summary line (the question) with the rest of that docstring,
prefixed by the object's qualified name (the positive document); hard negatives are mined with
the base model (the packaged all-MiniLM-L6-v2) from the training documents, dropping candidates
that score above 0.95 x the positive (``data_prep.mining``). The text is the Python Software
Foundation's, under the PSF License Agreement; records differ slightly between Python versions
(the committed files were built with CPython 3.11).

    python -m data_prep.build_example_data [--output_dir data_prep/example_data]
"""

from __future__ import annotations

import argparse
import ast
import logging
import random
import re
import sysconfig
from pathlib import Path

from tqdm.auto import tqdm

from data_prep.records import add_deprecated_alias

logger = logging.getLogger("data_prep.build_example_data")

SKIP_PARTS = {"test", "tests", "idle_test", "turtledemo", "ensurepip", "site-packages", "__phello__", "pydoc_data"}


def _clean(paragraph: str) -> str:
    return re.sub(r"\s+", " ", paragraph).strip()


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def docstring_pairs(stdlib: Path) -> list[dict]:
    """(question, document) pairs from every function/class docstring with a summary and a body."""
    pairs = []
    files = sorted(path for path in stdlib.rglob("*.py") if not SKIP_PARTS & set(path.relative_to(stdlib).parts))
    for path in tqdm(files, desc="Parsing stdlib"):
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        stack = [(tree, module)]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                name = f"{prefix}.{child.name}"
                stack.append((child, name))
                if child.name.startswith("_"):
                    continue
                doc = ast.get_docstring(child, clean=True)
                paragraphs = [_clean(p) for p in re.split(r"\n\s*\n", doc or "") if p.strip()]
                if len(paragraphs) == 1:  # one paragraph: its first sentence is the summary
                    paragraphs = re.split(r"(?<=[a-z)][.])\s+(?=[A-Z])", paragraphs[0], maxsplit=1)
                if len(paragraphs) < 2:
                    continue
                summary, body = paragraphs[0], " ".join(paragraphs[1:])
                if not 4 <= len(summary.split()) <= 40 or len(body.split()) < 8 or ">>>" in summary:
                    continue
                pairs.append({"question": summary, "document": f"{name}: {_truncate(body, 700)}"})
    return pairs


def deduplicate(pairs: list[dict]) -> list[dict]:
    seen_questions, seen_docs, unique = set(), set(), []
    for pair in pairs:
        question_key, doc_key = pair["question"].lower(), pair["document"].split(": ", 1)[1].lower()
        if question_key in seen_questions or doc_key in seen_docs:
            continue
        seen_questions.add(question_key)
        seen_docs.add(doc_key)
        unique.append(pair)
    return unique


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "example_data"),
                        help="Folder for train.jsonl.gz and validation.jsonl.gz (default: data_prep/example_data).")
    parser.add_argument("--model_name_or_path", default=None, help="Mining model (default: packaged all-MiniLM-L6-v2).")
    parser.add_argument("--num_validation", type=int, default=300, help="Held-out records (default 300); the rest is for training.")
    parser.add_argument("--num_hard_negatives", type=int, default=5, help="Mined negatives per record (default 5).")
    add_deprecated_alias(parser, "--num_negatives", "--num_hard_negatives", type=int)
    parser.add_argument("--seed", type=int, default=0, help="Shuffling seed (default 0).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from data_prep.mining import MiningSettings, mine_negatives
    from data_prep.records import write_jsonl
    from finetune.training.arguments import default_model_path
    from finetune.model.embedding_model import EmbeddingModel

    pairs = deduplicate(docstring_pairs(Path(sysconfig.get_paths()["stdlib"])))
    logger.info("%d unique docstring pairs", len(pairs))
    random.Random(args.seed).shuffle(pairs)
    splits = {"train": pairs[args.num_validation:], "validation": pairs[:args.num_validation]}
    model = EmbeddingModel.from_pretrained(args.model_name_or_path or default_model_path())
    train_docs = [pair["document"] for pair in splits["train"]]
    all_docs = train_docs + [pair["document"] for pair in splits["validation"]]
    doc_emb = model.encode(all_docs, batch_size=64)
    settings = MiningSettings(num_negatives=args.num_hard_negatives, range_max=200, max_score_ratio=0.95)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, split_pairs in splits.items():
        # Training negatives come from training documents only; validation ones from all documents.
        corpus = train_docs if split == "train" else all_docs
        offset = 0 if split == "train" else len(train_docs)
        query_emb = model.encode([pair["question"] for pair in split_pairs], batch_size=128)
        mined = mine_negatives(query_emb, doc_emb[:len(corpus)], [[offset + i] for i in range(len(split_pairs))],
                               corpus, settings)
        records = [{"question": pair["question"], "pos_doc": [pair["document"]],
                    "neg_doc": [corpus[index] for index, _ in result.kept]}
                   for pair, result in zip(split_pairs, mined)]
        # A positive the base model scores so low that every candidate passes 0.95 x its score
        # leaves no safe negative: such records are dropped rather than trained with false negatives.
        kept = [record for record in records if record["neg_doc"]]
        logger.info("%s: dropped %d records without a safe negative", split, len(records) - len(kept))
        records = kept
        write_jsonl(str(output_dir / f"{split}.jsonl.gz"), records)  # atomic; gzip mtime 0: byte-identical rebuilds
        logger.info("%s: %d records written to %s", split, len(records), output_dir / f"{split}.jsonl.gz")


if __name__ == "__main__":
    main()

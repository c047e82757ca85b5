"""Add a teacher's scores to every record (``pos_scores`` / ``neg_scores``), for distillation.

    python -m data_prep.score --teacher MODEL --input train.jsonl --output train.scored.jsonl \
        [--teacher_type cross-encoder|bi-encoder] [--batch_size 32] [--query_prefix P] [--passage_prefix P]
    accelerate launch -m data_prep.score ...     # several processes (GPUs) share the records

Teachers: ``cross-encoder`` (default): sentence-transformers' ``CrossEncoder`` scores each (question,
document) pair; the score is its raw logit (no sigmoid), the scale rerankers are distilled at.
``bi-encoder``: the cosine of the question's and the document's embeddings, encoded as training does
(``finetune.model.embedding_model.EmbeddingModel``, prompts and lengths as given), e.g. a fine-tuned model of ours.

Records are scored in blocks of ``--block_size``; every finished block is written atomically into
``OUTPUT.parts/`` (``finetune.retrieval.work_parts``). A rerun after a kill scores only the missing blocks (when the
settings are the same), and the output file is assembled atomically at the end, in input order, and the parts
removed. Under ``accelerate launch`` the processes share the missing blocks; the output equals one process's
(several machines need a file system they all see at OUTPUT.parts/).
Train with the result: ``--distillation kl`` or ``--distillation margin_mse``.
"""

from __future__ import annotations

import argparse
import logging
import shutil

import torch
from tqdm.auto import tqdm

from data_prep.records import json_line, run_cli, setup_logging
from finetune.training.checkpointing import atomic_write
from finetune.data.schema import (NEG_DOC, NEG_SCORES, POS_DOC, POS_SCORES, QUESTION, expand_data_files,
                                  normalize_record, read_records)
from finetune.data.text import TextSide
from finetune.retrieval.work_parts import PartsFolder, fingerprint, path_identity, process_state

logger = logging.getLogger("data_prep.score")

TEACHER_TYPES = ("cross-encoder", "bi-encoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--teacher", required=True, help="The teacher: a CrossEncoder (reranker) or an embedding model, Hub id or folder.")
    add("--input", required=True, nargs="+", help="Seed-format file(s) or glob(s) to score.")
    add("--output", required=True, help="Output JSON Lines file (.gz compresses): the records with pos_scores/neg_scores.")
    add("--teacher_type", default="cross-encoder", choices=TEACHER_TYPES,
        help="cross-encoder: raw logit of each (question, document) pair; bi-encoder: cosine of their embeddings. "
             "Default: cross-encoder.")
    add("--batch_size", type=int, default=32, help="Pairs (cross-encoder) or texts (bi-encoder) per forward pass. Default 32.")
    add("--query_prefix", default="", help="Prefix put before each question, e.g. 'query: ' for e5. Default: none.")
    add("--passage_prefix", default="", help="Prefix put before each document, e.g. 'passage: ' for e5. Default: none.")
    add("--query_max_length", type=int, default=64, help="Bi-encoder: max tokens of a question, as in training. Default 64.")
    add("--passage_max_length", type=int, default=256,
        help="Bi-encoder: max tokens of a document; cross-encoder: max tokens of a (question, document) pair. Default 256.")
    add("--block_size", type=int, default=1000,
        help="Records per block: the unit of work that is written, resumed and shared between processes. Default 1000.")
    add("--trust_remote_code", action="store_true", help="Allow the teacher's repo to run its own Python code.")
    return parser


class CrossEncoderTeacher:
    """Raw logits of sentence-transformers' CrossEncoder for (question, document) pairs."""

    def __init__(self, path: str, args, device: str):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(path, device=device, max_length=args.passage_max_length,
                                  trust_remote_code=args.trust_remote_code)
        self.query, self.document = TextSide(args.query_prefix), TextSide(args.passage_prefix)
        self.batch_size = args.batch_size

    def __call__(self, questions: list[str], documents: list[str]) -> list[float]:
        pairs = list(zip(self.query.prompted(questions), self.document.prompted(documents)))
        scores = self.model.predict(pairs, batch_size=self.batch_size, activation_fn=torch.nn.Identity(),
                                    show_progress_bar=False, convert_to_tensor=True)
        if scores.numel() != len(pairs):
            raise ValueError(f"The cross-encoder gives {scores.numel() // max(len(pairs), 1)} scores per pair; a teacher "
                             "needs one (a reranker with a single output).")
        return scores.float().reshape(len(pairs)).tolist()


class BiEncoderTeacher:
    """Cosine of question and document embeddings, tokenized as training does (``finetune.data.text``)."""

    def __init__(self, path: str, args, device: str):
        from finetune.model.embedding_model import EmbeddingModel

        self.model = EmbeddingModel.from_pretrained(path, trust_remote_code=args.trust_remote_code,
                                                    padding_free=True).to(device)
        self.query = TextSide(args.query_prefix, args.query_max_length)
        self.document = TextSide(args.passage_prefix, args.passage_max_length)
        self.batch_size = args.batch_size

    def __call__(self, questions: list[str], documents: list[str]) -> list[float]:
        row_of = {question: row for row, question in enumerate(dict.fromkeys(questions))}
        query_emb = self.model.encode(list(row_of), self.query, batch_size=self.batch_size)
        doc_emb = self.model.encode(documents, self.document, batch_size=self.batch_size)
        rows = torch.tensor([row_of[q] for q in questions], dtype=torch.long)
        cosine = torch.nn.functional.cosine_similarity(query_emb[rows], doc_emb, dim=-1)
        return cosine.tolist()


def score_block(records: list[dict], teacher) -> list[dict]:
    """The records with ``pos_scores``/``neg_scores`` from ``teacher(questions, documents) -> scores``."""
    questions, documents = [], []
    for record in records:
        for text in record[POS_DOC] + record[NEG_DOC]:
            questions.append(record[QUESTION])
            documents.append(text)
    scores = teacher(questions, documents)
    scored, start = [], 0
    for record in records:
        positives, negatives = len(record[POS_DOC]), len(record[NEG_DOC])
        scored.append({**record, POS_SCORES: scores[start:start + positives],
                       NEG_SCORES: scores[start + positives:start + positives + negatives]})
        start += positives + negatives
    return scored


def settings_fingerprint(args) -> str:
    """What the parts depend on: the input files' identity and every setting that changes a score."""
    files = [path_identity(path) for path in expand_data_files(args.input)]
    keys = ("teacher", "teacher_type", "query_prefix", "passage_prefix", "query_max_length", "passage_max_length",
            "block_size")
    return fingerprint(files, {key: getattr(args, key) for key in keys})


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    for name in ("batch_size", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    state = process_state()
    records = [normalize_record(record) for record in read_records(args.input)]  # validated before any model loads
    blocks = [records[start:start + args.block_size] for start in range(0, len(records), args.block_size)]
    parts = PartsFolder(f"{args.output}.parts", settings_fingerprint(args), state, ext=".jsonl")
    todo, done = parts.assign(len(blocks))
    logger.info("%d records in %d blocks, %d already scored; this process: %d blocks.", len(records), len(blocks),
                done, len(todo))
    if todo:
        device = str(state.device)
        teacher = (CrossEncoderTeacher if args.teacher_type == "cross-encoder" else BiEncoderTeacher)(
            args.teacher, args, device)
        for index in tqdm(todo, desc="Scoring", unit=" blocks", disable=not state.is_local_main_process):
            with atomic_write(parts.part(index)) as handle:
                for record in score_block(blocks[index], teacher):
                    handle.write(json_line(record))
    state.wait_for_everyone()
    if state.is_main_process:
        with atomic_write(args.output) as out:
            for index in range(len(blocks)):
                with open(parts.part(index), encoding="utf-8") as handle:
                    shutil.copyfileobj(handle, out)
        parts.remove()
        print(f"Scored {len(records):,} records with {args.teacher_type} {args.teacher}; wrote {args.output}.")
    state.wait_for_everyone()
    return {"records": len(records), "blocks": len(blocks), "output": args.output}


if __name__ == "__main__":
    run_cli(main)

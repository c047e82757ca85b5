"""Retrieval sets: queries, a corpus and relevance judgements, read from seed-format records or a BEIR folder.

Light on purpose (JSON and the standard library only): the data tools (``data_prep.convert``, ``data_prep.mine``)
read corpora and BEIR folders through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

Qrels = dict[str, dict[str, int]]  # query id -> {doc id: relevance}


@dataclass
class RetrievalSet:
    """Queries, corpus and relevance judgements; ``groups`` (query id, its negatives' doc ids) feed the in-group metric."""

    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # doc id -> text
    qrels: Qrels
    groups: list[tuple[str, list[str]]] = field(default_factory=list)

    def add_corpus_texts(self, texts: Iterable[str]) -> None:
        """Extra documents (distractors); texts already in the corpus are not added twice."""
        known = set(self.corpus.values())
        for text in texts:
            if text not in known:
                known.add(text)
                self.corpus[f"x{len(self.corpus)}"] = text


def retrieval_set_from_records(records: Iterable[dict]) -> RetrievalSet:
    """Seed-format records -> queries (question), corpus (all pos_doc and neg_doc texts, deduplicated), qrels (pos_doc).

    Records with the same question are merged (their positives all count as relevant).
    """
    queries: dict[str, str] = {}
    corpus_ids: dict[str, str] = {}
    qrels: Qrels = {}
    question_ids: dict[str, str] = {}
    groups: list[tuple[str, list[str]]] = []

    def doc_id(text: str) -> str:
        return corpus_ids.setdefault(text, f"d{len(corpus_ids)}")

    for record in records:
        qid = question_ids.setdefault(record["question"], f"q{len(question_ids)}")
        queries[qid] = record["question"]
        for text in record["pos_doc"]:
            qrels.setdefault(qid, {})[doc_id(text)] = 1
        negatives = [doc_id(text) for text in record.get("neg_doc", [])]
        if negatives:
            groups.append((qid, negatives))
    return RetrievalSet(queries, {did: text for text, did in corpus_ids.items()}, qrels, groups)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_beir_folder(folder: str, split: str = "test") -> RetrievalSet:
    """A BEIR folder: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv.

    Documents are "title text" when a title is present; only queries with qrels are kept.
    """
    qrels_path = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(qrels_path):
        raise FileNotFoundError(f"BEIR folder {folder!r} has no qrels/{split}.tsv (choose another --split).")
    qrels: Qrels = {}
    with open(qrels_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if line_number == 1 and not parts[-1].lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(parts) < 3:
                raise ValueError(f"{qrels_path}, line {line_number}: expected 'query-id<TAB>corpus-id<TAB>score'.")
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    corpus = {str(doc["_id"]): f"{doc.get('title', '')} {doc['text']}".strip()
              for doc in _read_jsonl(os.path.join(folder, "corpus.jsonl"))}
    queries = {str(query["_id"]): query["text"] for query in _read_jsonl(os.path.join(folder, "queries.jsonl"))
               if str(query["_id"]) in qrels}
    return RetrievalSet(queries, corpus, {qid: rels for qid, rels in qrels.items() if qid in queries})


def read_corpus_file(path: str) -> list[str]:
    """Extra corpus texts: JSON Lines with a "text" (and optional "title") field, or plain text, one per line."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                record = json.loads(line)
                line = f"{record.get('title', '')} {record['text']}".strip()
            texts.append(line)
    return texts


def load_retrieval_set(paths: list[str], split: str = "test", extra_corpus: list[str] | None = None) -> RetrievalSet:
    """A BEIR folder (one path that is a directory) or seed-format files/globs, plus extra corpus files."""
    from finetune.data.schema import read_records

    if len(paths) == 1 and os.path.isdir(paths[0]):
        dataset = load_beir_folder(paths[0], split)
    else:
        dataset = retrieval_set_from_records(read_records(paths))
    return with_extra_corpus(dataset, extra_corpus)


def with_extra_corpus(dataset: RetrievalSet, extra_corpus: list[str] | None) -> RetrievalSet:
    """``dataset`` with the documents of the extra corpus files (see ``read_corpus_file``) added."""
    for path in extra_corpus or []:
        dataset.add_corpus_texts(read_corpus_file(path))
    return dataset

"""Build the bundled general-domain evaluation set from WordNet 3.0 (Princeton University): a reverse dictionary.

Each record's question is a WordNet definition (a synset's gloss without its examples); its positive is the
synset's words followed by the gloss's usage examples ("dog, domestic dog, Canis familiaris: the dog barked all
night"); its negatives are up to three related synsets written the same way: sister terms (other hyponyms of the
synset's hypernyms) for nouns and verbs, the satellites of the same head and the antonyms for adjectives, the
antonyms for adverbs. Negatives sharing a word with the positive are left out (they could be right answers). A
synset is eligible when it is the most frequent sense of a word that the SemCor counts attest (WordNet's index
files list senses by frequency), its definition has at least four words and its gloss at least one example;
``--num_records`` of them are drawn with ``--seed``. Everyday English vocabulary, far from the Python
documentation of the example data: the general set of ``python -m finetune.interpolate --general_data``.

WordNet's database files come from Debian's ``wordnet-base`` package (``apt-get install wordnet-base``:
``/usr/share/wordnet/data.{noun,verb,adj,adv}`` and ``index.*``, WordNet 3.0); any WordNet 3.0 ``dict/`` folder
works (``--wordnet_dir``). License: WordNet 3.0 license (permissive; keep the notice below with copies).

    python -m data_prep.build_general_set [--wordnet_dir /usr/share/wordnet]
        [--output data_prep/example_data/general_wordnet.jsonl.gz] [--num_records 500] [--seed 0]

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE IS PROVIDED
"AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("data_prep.build_general_set")

PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
NUM_NEGATIVES = 3
_ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjective words: galore(ip)


@dataclass
class Synset:
    key: str  # "<pos letter><offset>": unique across the four data files
    words: list[str]
    definition: str
    examples: list[str]
    pointers: list[tuple[str, str]] = field(default_factory=list)  # (symbol, target key)

    def document(self) -> str:
        words = ", ".join(self.words)
        return f"{words}: {'; '.join(self.examples)}" if self.examples else words


def _key(offset: str, pos: str) -> str:
    return ("a" if pos == "s" else pos) + offset  # satellites live in data.adj under the adjective letter


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """'def one; def two; "example" - Author; "other"' -> ("def one; def two", ["example", "other"])."""
    definition, examples = [], []
    for part in (piece.strip() for piece in gloss.split(";")):
        if part.startswith('"'):
            example = part[1:].split('"', 1)[0].strip()
            if example:
                examples.append(example)
        elif part and not examples:  # text after the examples is an attribution, not definition
            definition.append(part)
    return "; ".join(definition), examples


def parse_data_line(line: str) -> Synset:
    """One synset of a ``data.<pos>`` file (format: wndb(5WN))."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, pos, word_count = fields[0], fields[2], int(fields[3], 16)
    words = [_ADJECTIVE_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(word_count)]
    at = 4 + 2 * word_count
    pointer_count = int(fields[at])
    pointers = [(fields[at + 1 + 4 * i], _key(fields[at + 2 + 4 * i], fields[at + 3 + 4 * i]))
                for i in range(pointer_count)]
    definition, examples = split_gloss(gloss.strip())
    return Synset(_key(offset, pos), list(dict.fromkeys(words)), definition, examples, pointers)


def read_synsets(wordnet_dir: Path) -> dict[str, Synset]:
    synsets = {}
    for pos in PARTS_OF_SPEECH:
        with open(wordnet_dir / f"data.{pos}", encoding="utf-8") as handle:
            for line in handle:
                if not line.startswith("  "):  # the license header's lines start with two spaces
                    synset = parse_data_line(line)
                    synsets[synset.key] = synset
    return synsets


def most_frequent_senses(wordnet_dir: Path) -> set[str]:
    """Keys of the synsets that are the first (most frequent) sense of a word with SemCor counts (``index.<pos>``:
    ``lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset...``)."""
    keys = set()
    for pos in PARTS_OF_SPEECH:
        with open(wordnet_dir / f"index.{pos}", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  "):
                    continue
                fields = line.split()
                pointer_count = int(fields[3])
                tagged, offsets = int(fields[5 + pointer_count]), fields[6 + pointer_count:]
                if tagged >= 1 and offsets:
                    keys.add(_key(offsets[0], fields[1]))
    return keys


def related(synset: Synset, synsets: dict[str, Synset]) -> list[str]:
    """Keys of the synsets a reader could confuse with this one (see the module docstring), sorted."""
    keys = set()
    for symbol, target in synset.pointers:
        if symbol in ("@", "@i"):  # a hypernym: its other hyponyms are sister terms
            keys.update(t for s, t in synsets[target].pointers if s in ("~", "~i"))
        elif symbol == "&" and synset.key[0] == "a":  # a satellite's head, or a head's satellites
            keys.add(target)
            keys.update(t for s, t in synsets[target].pointers if s == "&")
        elif symbol == "!":
            keys.add(target)
    keys.discard(synset.key)
    return sorted(keys)


def build_records(wordnet_dir: Path, num_records: int, seed: int) -> list[dict]:
    synsets = read_synsets(wordnet_dir)
    frequent = most_frequent_senses(wordnet_dir)
    eligible = sorted(key for key in frequent
                      if len(synsets[key].definition.split()) >= 4 and synsets[key].examples)
    logger.info("%d synsets, %d most frequent senses, %d eligible", len(synsets), len(frequent), len(eligible))
    rng = random.Random(seed)
    records, questions = [], set()
    for key in rng.sample(eligible, len(eligible)):
        synset = synsets[key]
        if synset.definition.lower() in questions:
            continue
        words = {word.lower() for word in synset.words}
        candidates = [synsets[k] for k in related(synset, synsets)
                      if not words & {word.lower() for word in synsets[k].words}]
        negatives = [candidate.document() for candidate in rng.sample(candidates, min(NUM_NEGATIVES, len(candidates)))]
        negatives = [text for text in dict.fromkeys(negatives) if text != synset.document()]
        if not negatives:
            continue
        questions.add(synset.definition.lower())
        records.append({"question": synset.definition, "pos_doc": [synset.document()], "neg_doc": negatives})
        if len(records) == num_records:
            break
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet_dir", default="/usr/share/wordnet",
                        help="WordNet 3.0 database folder (data.noun ... index.adv; default: Debian's wordnet-base).")
    parser.add_argument("--output", default=str(Path(__file__).parent / "example_data" / "general_wordnet.jsonl.gz"),
                        help="Seed-format JSONL file to write "
                             "(default: data_prep/example_data/general_wordnet.jsonl.gz).")
    parser.add_argument("--num_records", type=int, default=500, help="Records to draw (default 500).")
    parser.add_argument("--seed", type=int, default=0, help="Drawing seed (default 0).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    wordnet_dir = Path(args.wordnet_dir)
    if not (wordnet_dir / "data.noun").is_file():
        raise FileNotFoundError(f"--wordnet_dir {args.wordnet_dir!r} has no WordNet data.noun: install Debian's "
                                "wordnet-base (apt-get install wordnet-base) or give a WordNet 3.0 dict/ folder.")

    from data_prep.records import write_jsonl

    records = build_records(wordnet_dir, args.num_records, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_jsonl(args.output, records)  # atomic; gzip mtime 0: byte-identical rebuilds
    logger.info("%d records (%d documents) written to %s", len(records),
                len({text for record in records for text in record["pos_doc"] + record["neg_doc"]}), args.output)


if __name__ == "__main__":
    from data_prep.records import run_cli

    run_cli(main)

"""data_prep.build_general_set on a four-synset WordNet written here: what is eligible, how records read."""

import gzip
import json

from data_prep import build_general_set

LICENSE_LINE = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
DATA_NOUN = [
    "00000001 05 n 01 canine 0 004 ~ 00000002 n 0000 ~ 00000003 n 0000 ~ 00000004 n 0000 ~ 00000005 n 0000 | a "
    'mammal of the dog family; "canines hunt in packs"',
    "00000002 05 n 02 dog 0 domestic_dog 0 001 @ 00000001 n 0000 | a member of the genus Canis; kept by people; "
    '"the dog barked all night"; "dogs bark"',
    '00000003 05 n 01 wolf 0 001 @ 00000001 n 0000 | a wild carnivorous mammal of the dog family; "the wolf howled" '
    "- Anonymous",
    '00000004 05 n 02 fox 0 dog 0 001 @ 00000001 n 0000 | an alert carnivorous animal with a bushy tail; "a fox ran"',
    "00000005 05 n 01 jackal 0 001 @ 00000001 n 0000 | a wild dog of Africa and southern Asia that hunts at night",
]
# lemma pos synset_cnt p_cnt [ptr] sense_cnt tagsense_cnt offsets (most frequent sense first)
INDEX_NOUN = ["canine n 1 1 ~ 1 1 00000001", "dog n 2 1 @ 2 1 00000002 00000004", "domestic_dog n 1 1 @ 1 0 00000002",
              "fox n 1 1 @ 1 0 00000004", "jackal n 1 1 @ 1 1 00000005", "wolf n 1 1 @ 1 1 00000003"]


def write_wordnet(folder):
    for pos in build_general_set.PARTS_OF_SPEECH:
        for kind, lines in (("data", DATA_NOUN), ("index", INDEX_NOUN)):
            body = "".join(f"{line}  \n" for line in lines) if pos == "noun" else ""
            (folder / f"{kind}.{pos}").write_text(LICENSE_LINE + body)
    return folder


def test_records_pair_a_definition_with_words_and_examples_and_sister_terms_as_negatives(tmp_path):
    records = build_general_set.build_records(write_wordnet(tmp_path), num_records=10, seed=0)
    by_question = {record["question"]: record for record in records}
    # canine: no hypernym, so no negative; fox: not the first sense of an attested word; jackal: no example.
    assert sorted(by_question) == ["a member of the genus Canis; kept by people",
                                   "a wild carnivorous mammal of the dog family"]
    dog = by_question["a member of the genus Canis; kept by people"]
    assert dog["pos_doc"] == ["dog, domestic dog: the dog barked all night; dogs bark"]
    # Sister terms under canine; the fox synset also holds the word "dog", so it could be a right answer: left out.
    assert sorted(dog["neg_doc"]) == ["jackal", "wolf: the wolf howled"]
    wolf = by_question["a wild carnivorous mammal of the dog family"]
    assert wolf["pos_doc"] == ["wolf: the wolf howled"]  # the attribution after an example is not text
    assert sorted(wolf["neg_doc"]) == sorted(["dog, domestic dog: the dog barked all night; dogs bark",
                                              "fox, dog: a fox ran", "jackal"])


def test_the_command_writes_the_same_bytes_twice(tmp_path):
    wordnet = write_wordnet(tmp_path)
    outputs = [tmp_path / "first.jsonl.gz", tmp_path / "second.jsonl.gz"]
    for output in outputs:
        build_general_set.main(["--wordnet_dir", str(wordnet), "--output", str(output), "--num_records", "2"])
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    lines = gzip.decompress(outputs[0].read_bytes()).decode().splitlines()
    assert len(lines) == 2 and all(set(json.loads(line)) == {"question", "pos_doc", "neg_doc"} for line in lines)

"""Every kind of bad input gets one clear message naming the thing, the place and the fix."""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune import train
from finetune.training.config import ConfigError, parse_arguments
from finetune.model.embedding_model import EmbeddingModel, ModelLoadError
from finetune.data.schema import DataFormatError, check_record, find_problems
from finetune.training.trainer import NonFiniteError

BAD = Path(__file__).resolve().parent / "bad_inputs"

# file -> (location, field, words the message must contain)
EXPECTED = {
    "invalid_json.jsonl": ("line 2", None, "invalid JSON"),
    "question_not_string.jsonl": ("line 2", "question", "expected a string, got list"),
    "missing_pos_doc.jsonl": ("line 2", "pos_doc", "missing"),
    "missing_question.jsonl": ("line 2", "question", "missing"),
    "empty_pos_doc.jsonl": ("line 2", "pos_doc", "non-empty list"),
    "empty_question.jsonl": ("line 2", "question", "non-empty string"),
    "empty_document.jsonl": ("line 2", "pos_doc[1]", "non-empty string"),
    "pos_doc_is_string.jsonl": ("line 2", "pos_doc", "wrap it"),
    "neg_doc_numbers.jsonl": ("line 2", "neg_doc[0]", "expected a string, got int"),
    "record_not_object.jsonl": ("line 2", None, "expected a JSON object"),
    "pretty_printed_jsonl.jsonl": ("line 1", None, "one object per line"),
    "broken_json_array.json": ("line 2", None, "not one JSON array"),
    "empty_file.jsonl": ("file", None, "holds no records"),
    "not_utf8.jsonl": ("byte", None, "not valid UTF-8"),
    "truncated_gzip.jsonl.gz": ("file", None, "cannot be read"),
}


def test_every_bad_input_file_has_an_expectation():
    assert sorted(path.name for path in BAD.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_message(name):
    location, field, words = EXPECTED[name]
    path = str(BAD / name)
    problems = find_problems([path])
    assert problems, f"{name}: no problem found"
    problem = problems[0]
    assert problem.file == path and problem.location.startswith(location) and problem.field == field
    assert words in problem.message


@pytest.mark.parametrize("name", ["missing_pos_doc.jsonl", "not_utf8.jsonl", "pretty_printed_jsonl.jsonl"])
def test_train_stops_with_the_same_message_before_loading_a_model(name, tmp_path, monkeypatch):
    monkeypatch.setattr(EmbeddingModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataFormatError, match=EXPECTED[name][2]):
        train.main(["--train_file", str(BAD / name), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                                             max_size=4), max_leaves=12)
records = st.one_of(json_values, st.fixed_dictionaries(
    {}, optional={"question": json_values | st.text(), "pos_doc": json_values | st.lists(st.text(), max_size=3),
                  "neg_doc": json_values | st.lists(st.text(), max_size=3)}))


@settings(max_examples=300, deadline=None)
@given(records)
def test_validator_accepts_valid_records_or_names_the_bad_field(record):
    problems = check_record(record)
    valid = (isinstance(record, dict) and isinstance(record.get("question"), str) and record["question"].strip()
             and isinstance(record.get("pos_doc"), list) and record["pos_doc"]
             and all(isinstance(t, str) and t.strip() for t in record["pos_doc"])
             and isinstance(record.get("neg_doc", []), list)
             and all(isinstance(t, str) and t.strip() for t in record.get("neg_doc", [])))
    assert (problems == []) == bool(valid)
    for field, message in problems:
        assert message
        if isinstance(record, dict):
            assert field is not None and field.split("[")[0] in ("question", "pos_doc", "neg_doc")


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*Hub model id"):
        EmbeddingModel.from_pretrained(str(tmp_path / "no-such-model"))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="the local folder.*no loadable model"):
        EmbeddingModel.from_pretrained(str(tmp_path))


def test_model_without_tokenizer(tiny_bert, tmp_path):
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_bert) / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        EmbeddingModel.from_pretrained(str(tmp_path))


def test_output_dir_that_cannot_be_written(train_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(train.OutputDirError, match="cannot be written"):
        train.main(["--train_file", train_file, "--output_dir", str(blocker / "out"), "--use_cpu", "true"])
    assert blocker.read_text() == "x"


def test_global_batch_must_divide():
    with pytest.raises(ConfigError, match="not divisible by processes x per-device batch = 1 x 32"):
        parse_arguments(["--global_batch_size", "48", "--use_cpu", "true"])
    _, _, args = parse_arguments(["--global_batch_size", "128", "--use_cpu", "true"])
    assert args.gradient_accumulation_steps == 4


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_stops_or_skips(tiny_bert, train_file, tmp_path, monkeypatch, policy):
    from finetune.objectives import builtin as trainer_module  # where the ranking loss is called

    calls = {"n": 0}
    real_loss = trainer_module.ranking_loss

    def loss_that_explodes_at_step_2(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * math.inf if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer_module, "ranking_loss", loss_that_explodes_at_step_2)
    argv = ["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(tmp_path / "o"),
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
            "--on_non_finite", policy, "--logging_steps", "1"]
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="at step 2.*temperature"):
            train.main(argv)
    else:
        train.main(argv)
        state = json.loads((tmp_path / "o" / "trainer_state.json").read_text())
        weights = EmbeddingModel.from_pretrained(str(tmp_path / "o")).encoder.embeddings.word_embeddings.weight
        assert torch.isfinite(weights).all() and state["global_step"] == 3

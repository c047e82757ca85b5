"""A saved model loaded by sentence-transformers gives the training code's vectors, prompts included."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

from finetune import train
from finetune.model.embedding_model import EmbeddingModel

QUERIES = ["alpha beta gamma", "python function returns list of tokens", "river"]
DOCUMENTS = ["mountain forest ocean desert valley city", "query document passage answer", "omega"]


def assert_parity(model: EmbeddingModel, folder: str, query_prefix: str, passage_prefix: str):
    st = SentenceTransformer(folder, device="cpu")
    for texts, prefix, prompt_name in [(QUERIES, query_prefix, "query"), (DOCUMENTS, passage_prefix, "document")]:
        ours = model.encode(texts, prefix=prefix)
        theirs = torch.from_numpy(st.encode(texts, prompt_name=prompt_name))
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-5
    torch.testing.assert_close(torch.from_numpy(st.encode_query(QUERIES)), model.encode(QUERIES, prefix=query_prefix),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), ("lasttoken", True)])
def test_saved_folder_loads_with_sentence_transformers(tiny_bert, tmp_path, pooling, normalize):
    model = EmbeddingModel.from_pretrained(tiny_bert, pooling=pooling, normalize=normalize,
                                           query_prefix="query: ", document_prefix="passage: ", max_seq_length=64)
    model.save_pretrained(str(tmp_path))
    assert_parity(model, str(tmp_path), "query: ", "passage: ")
    reloaded = EmbeddingModel.from_pretrained(str(tmp_path))
    assert (reloaded.pooling, reloaded.normalize) == (pooling, normalize)


def test_left_padded_lasttoken_model(tiny_bert_left_padded, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny_bert_left_padded, pooling="lasttoken", normalize=True)
    model.save_pretrained(str(tmp_path))
    assert_parity(model, str(tmp_path), "", "")


def test_trained_output_and_checkpoint_match_sentence_transformers(tiny_bert, train_file, tmp_path):
    output_dir = tmp_path / "out"
    train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(output_dir),
                "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1", "--use_cpu", "true",
                "--query_prefix", "query: ", "--passage_prefix", "passage: ", "--learning_rate", "1e-3",
                "--report_to", "none"])
    config = json.loads((output_dir / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "document": "passage: "}
    for folder in (output_dir, output_dir / "checkpoint-1"):
        assert_parity(EmbeddingModel.from_pretrained(str(folder)), str(folder), "query: ", "passage: ")


def test_packaged_minilm_matches_sentence_transformers():
    from finetune.training.arguments import default_model_path

    path = default_model_path()
    model = EmbeddingModel.from_pretrained(path)
    assert (model.pooling, model.normalize) == ("mean", True)
    st = SentenceTransformer(path, device="cpu")
    ours = model.encode(["A man is eating food.", "A man is eating a piece of bread."])
    torch.testing.assert_close(ours, torch.from_numpy(st.encode(["A man is eating food.",
                                                                 "A man is eating a piece of bread."])), atol=1e-5, rtol=0)
    assert float(ours[0] @ ours[1]) == pytest.approx(0.7553, abs=1e-3)

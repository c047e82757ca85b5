"""Decoder LLMs as embedders: last-token pooling over an appended EOS, left padding, a pad token; the saved
folder gives sentence-transformers the same vectors; training runs end to end."""

import torch

from finetune.model.embedding_model import EmbeddingModel

QUERIES = ["alpha beta gamma", "python function returns list of tokens", "river"]
DOCUMENTS = ["mountain forest ocean desert valley city castle bridge", "query document passage answer", "omega"]


def test_decoder_defaults(tiny_decoder):
    model = EmbeddingModel.from_pretrained(tiny_decoder)
    tokenizer = model.tokenizer
    assert (model.pooling, model.normalize, tokenizer.padding_side) == ("lasttoken", True, "left")
    assert tokenizer.pad_token == tokenizer.eos_token
    batch = tokenizer(QUERIES, padding=True, return_tensors="pt")
    assert (batch["input_ids"][:, -1] == tokenizer.eos_token_id).all()  # every text ends with EOS, padding on the left
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
    truncated = tokenizer(DOCUMENTS[0], truncation=True, max_length=4)["input_ids"]
    assert len(truncated) == 4 and truncated[-1] == tokenizer.eos_token_id  # EOS survives truncation


def test_embedding_is_the_eos_state_and_padding_does_not_change_it(tiny_decoder):
    model = EmbeddingModel.from_pretrained(tiny_decoder, normalize=False).eval()
    together = model.encode(QUERIES, batch_size=3)
    alone = torch.cat([model.encode([text]) for text in QUERIES])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)  # left padding leaves each vector as it is
    ids = model.tokenizer(QUERIES[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        last_state = model.encoder(input_ids=ids).last_hidden_state[0, -1]
    torch.testing.assert_close(together[1], last_state, atol=1e-5, rtol=1e-4)


def test_saved_decoder_loads_in_sentence_transformers_with_the_same_vectors(tiny_decoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(tiny_decoder, query_prefix="Instruct: find the text\nQuery: ",
                                           max_seq_length=64)
    model.save_pretrained(str(tmp_path))
    st = SentenceTransformer(str(tmp_path), device="cpu")
    for texts, prefix, prompt_name in [(QUERIES, "Instruct: find the text\nQuery: ", "query"), (DOCUMENTS, "", "document")]:
        ours = model.encode(texts, prefix=prefix)
        theirs = torch.from_numpy(st.encode(texts, prompt_name=prompt_name))
        assert (ours - theirs).abs().max().item() < 1e-5
    reloaded = EmbeddingModel.from_pretrained(str(tmp_path))  # our own loader: same defaults, EOS not appended twice
    assert reloaded.pooling == "lasttoken"
    assert reloaded.tokenizer("x")["input_ids"].count(reloaded.tokenizer.eos_token_id) == 1


def test_decoder_trains_end_to_end(tiny_decoder, train_file, tmp_path):
    from finetune import train

    output_dir = tmp_path / "out"
    before = EmbeddingModel.from_pretrained(tiny_decoder).encode(QUERIES)
    metrics = train.main(["--model_name_or_path", tiny_decoder, "--train_file", train_file, "--output_dir",
                          str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "4",
                          "--learning_rate", "1e-3", "--use_cpu", "true", "--report_to", "none",
                          "--gradcache_mini_batch_size", "3"])
    assert metrics["train_loss"] > 0
    after = EmbeddingModel.from_pretrained(str(output_dir)).encode(QUERIES)
    assert (after - before).abs().max() > 1e-4


def test_a_tokenizer_that_ends_texts_with_its_own_special_token_is_left_alone(tmp_path):
    """Qwen3-Embedding's tokenizer appends <|endoftext|> while its eos_token is <|im_end|>: no second end token."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from conftest import build_tiny_decoder
    from finetune.model.decoders import prepare_decoder_tokenizer

    folder = build_tiny_decoder(str(tmp_path / "qwen"), "qwen3")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>"})
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", end)])
    prepare_decoder_tokenizer(tokenizer)
    ids = tokenizer("alpha beta")["input_ids"]
    assert ids[-1] == end and tokenizer.eos_token_id not in ids


def test_bidirectional_attention_trains_and_is_saved(tiny_qwen3, train_file, tmp_path):
    """--attention bidirectional: a token sees the ones after it, in training (padding-free, mean pooling) and in
    the saved model (is_causal false in config.json, so AutoModel and sentence-transformers load it the same)."""
    import json

    from transformers import AutoModel

    from finetune import train

    output_dir = tmp_path / "out"
    train.main(["--model_name_or_path", tiny_qwen3, "--train_file", train_file, "--output_dir", str(output_dir),
                "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                "--use_cpu", "true", "--report_to", "none", "--attention", "bidirectional", "--pooling", "mean"])
    assert json.loads((output_dir / "config.json").read_text())["is_causal"] is False
    encoder = AutoModel.from_pretrained(str(output_dir)).eval()
    ids = torch.tensor([[11, 12, 13, 14]])
    changed = torch.tensor([[11, 12, 13, 15]])
    with torch.no_grad():
        first = encoder(input_ids=ids).last_hidden_state[0, 0]
        first_changed = encoder(input_ids=changed).last_hidden_state[0, 0]
    assert (first - first_changed).abs().max() > 1e-4  # the first token saw the last one
    reloaded = EmbeddingModel.from_pretrained(str(output_dir), padding_free=True)
    assert (reloaded.pooling, reloaded.position_rule) == ("mean", "sequence")
    assert reloaded.encoder.config.is_causal is False  # the checkpoint's own attention is kept by default


def test_attention_option_is_checked(tiny_bert, tiny_qwen3):
    import pytest

    from finetune.training.arguments import ModelArguments

    with pytest.raises(ValueError, match="--attention must be one of"):
        ModelArguments(attention="sideways")
    with pytest.raises(ValueError, match="--attention causal applies to decoder LLMs"):
        EmbeddingModel.from_pretrained(tiny_bert, attention="causal")
    assert EmbeddingModel.from_pretrained(tiny_bert, attention="bidirectional").pooling == "mean"
    causal = EmbeddingModel.from_pretrained(tiny_qwen3, attention="causal")
    assert causal.encoder.config.is_causal is True


def test_evaluate_gives_a_raw_decoder_what_training_gives_it(tiny_decoder):
    """finetune.evaluate on a decoder folder without SentenceTransformer files: EOS, left padding, last-token
    pooling (sentence-transformers alone would mean-pool it), so its vectors are the ones training sees."""
    from finetune.retrieval.embedder import load_sentence_transformer

    ours = EmbeddingModel.from_pretrained(tiny_decoder).encode(DOCUMENTS)
    theirs = load_sentence_transformer(tiny_decoder).encode(DOCUMENTS, convert_to_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)

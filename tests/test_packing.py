"""Padding-free encoding (finetune.model.packing) against the encoder's own padded forward."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from finetune.model import packing
from finetune.model.embedding_model import EmbeddingModel
from finetune.model.packing import enable_padding_free


def random_batch(batch_size=11, seq_len=17, vocab=200, seed=0, padding_side="right"):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=generator)
    lengths[0] = seq_len
    positions = torch.arange(seq_len)[None]
    if padding_side == "right":
        mask = (positions < lengths[:, None]).long()
    else:
        mask = (positions >= seq_len - lengths[:, None]).long()
    input_ids = torch.randint(5, vocab, (batch_size, seq_len), generator=generator) * mask
    return input_ids, mask


def tiny_encoder(kind: str, dropout: float = 0.0):
    torch.manual_seed(0)
    common = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, max_position_embeddings=64)
    if kind == "bert":
        return BertModel(BertConfig(**common), add_pooling_layer=False)
    return RobertaModel(RobertaConfig(pad_token_id=1, **common), add_pooling_layer=False)


def masked(states, mask):
    return states * mask[..., None]


def test_pack_and_unpack_round_trip_keeps_real_tokens_in_order():
    input_ids, mask = random_batch(padding_side="left")
    packed_ids, position_ids, layout = packing.pack(input_ids, mask, "row")
    assert packed_ids.shape == (1, int(mask.sum()))
    assert packed_ids[0].tolist() == input_ids[mask.bool()].tolist()
    # BERT numbers positions by their index in the padded row, left padding included.
    assert position_ids[0].tolist() == torch.arange(17).expand(11, 17)[mask.bool()].tolist()
    restored = packing.unpack(packed_ids[0, :, None].float(), layout)[..., 0]
    assert torch.equal(restored.long(), input_ids * mask)
    # every packed token appears exactly once over the attention groups
    slots = torch.cat([group.gather[group.real_slots] for group in layout.groups])
    assert sorted(slots.tolist()) == list(range(packed_ids.shape[1]))
    assert torch.equal(slots[layout.restore], torch.arange(packed_ids.shape[1]))


def test_roberta_positions_count_real_tokens_from_padding_idx():
    input_ids, mask = random_batch(padding_side="right")
    _, position_ids, _ = packing.pack(input_ids, mask, "count", padding_idx=1)
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    expected = RobertaEmbeddings.create_position_ids_from_input_ids(torch.where(mask.bool(), input_ids, 1), 1)
    assert position_ids[0].tolist() == expected[mask.bool()].tolist()


@pytest.mark.parametrize("kind, padding_side", [("bert", "right"), ("bert", "left"), ("roberta", "right")])
def test_packed_forward_and_gradients_equal_padded(kind, padding_side):
    padded_model = tiny_encoder(kind)
    packed_model = copy.deepcopy(padded_model)
    rule = enable_padding_free(packed_model)
    assert rule == packing.PADDING_FREE_MODEL_TYPES[kind]
    input_ids, mask = random_batch(padding_side=padding_side, seed=3)
    if kind == "roberta":
        input_ids = torch.where(mask.bool(), input_ids.clamp(min=2), 1)
    padded_model.train(), packed_model.train()  # dropout is 0: train mode must still agree
    reference = masked(padded_model(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask)
    result = packing.encode_packed(packed_model, input_ids, mask, rule)
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(reference)
    (reference * weights).sum().backward()
    (result * weights).sum().backward()
    for (name, a), (_, b) in zip(padded_model.named_parameters(), packed_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_attention_is_per_sequence():
    """A token must not see other sequences: changing one row leaves the others' states unchanged."""
    model = tiny_encoder("bert")
    rule = enable_padding_free(model)
    input_ids, mask = random_batch(seed=5)
    before = packing.encode_packed(model, input_ids, mask, rule)
    changed = input_ids.clone()
    changed[0, :5] = 7
    after = packing.encode_packed(model, changed, mask, rule)
    torch.testing.assert_close(after[1:], before[1:], atol=1e-6, rtol=0)
    assert (after[0] - before[0]).abs().max() > 1e-3


def test_unsupported_model_falls_back_to_padded():
    encoder = tiny_encoder("bert")
    encoder.config.model_type = "not-a-known-encoder"
    assert enable_padding_free(encoder) is None
    assert encoder.config._attn_implementation != packing.PACKED_ATTENTION


def test_a_disagreeing_packed_forward_is_refused(monkeypatch, caplog):
    """The load-time self-check keeps the padded path when the packed one gives other results."""
    encoder = tiny_encoder("bert")
    original = encoder.config._attn_implementation
    real_encode = packing.encode_packed

    def broken(*args, **kwargs):
        return real_encode(*args, **kwargs) + 1.0

    monkeypatch.setattr("finetune.model.packing.encode_packed", broken)
    assert enable_padding_free(encoder) is None
    assert encoder.config._attn_implementation == original
    assert "disagrees" in caplog.text


def test_padding_free_model_matches_sentence_transformers(tiny_bert, tmp_path):
    """Embeddings of the padding-free EmbeddingModel == SentenceTransformer's encode of the saved folder."""
    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(tiny_bert, padding_free=True)
    assert model.position_rule == "row"
    texts = ["alpha beta", "a much longer text about rivers mountains and forests in the valley", "x"]
    ours = model.encode(texts)
    model.save_pretrained(str(tmp_path / "saved"))
    config_text = (tmp_path / "saved" / "config.json").read_text()
    assert packing.PACKED_ATTENTION not in config_text  # the saved model is an ordinary one
    theirs = SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def tiny_decoder_model(family: str, directory: str, attention: str):
    from conftest import build_tiny_decoder
    from transformers import AutoModel

    model = AutoModel.from_pretrained(build_tiny_decoder(directory, family))
    model.config.is_causal = attention == "causal"
    return model


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("family", ["qwen3", "llama", "mistral"])
def test_packed_decoder_forward_and_gradients_equal_padded(family, attention, tmp_path):
    """Rotary positions restart per sequence, the mask stays inside each one, grouped-query attention (4 query,
    2 key/value heads): left-padded batch, padded forward vs packed, values and gradients."""
    padded_model = tiny_decoder_model(family, str(tmp_path), attention)
    packed_model = copy.deepcopy(padded_model)
    assert enable_padding_free(packed_model) == "sequence"
    assert packed_model.config.num_key_value_heads < packed_model.config.num_attention_heads
    input_ids, mask = random_batch(padding_side="left", seed=4, vocab=200)
    padded_model.train(), packed_model.train()
    reference = masked(padded_model(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask)
    result = packing.encode_packed(packed_model, input_ids, mask, "sequence")
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(reference)
    (reference * weights).sum().backward()
    (result * weights).sum().backward()
    for (name, a), (_, b) in zip(padded_model.named_parameters(), packed_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5 * a.grad.abs().max().item(), rtol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_packed_decoder_keeps_its_attention_direction(attention, tmp_path):
    """Causal: changing a row's last token leaves its earlier tokens alone; bidirectional: it changes them.
    Other rows never change."""
    model = tiny_decoder_model("qwen3", str(tmp_path), attention)
    rule = enable_padding_free(model)
    input_ids, mask = random_batch(seed=6, vocab=200, padding_side="left")
    before = packing.encode_packed(model, input_ids, mask, rule)
    changed = input_ids.clone()
    changed[0, -1] = 7 if input_ids[0, -1] != 7 else 8
    after = packing.encode_packed(model, changed, mask, rule)
    torch.testing.assert_close(after[1:], before[1:], atol=1e-6, rtol=0)
    earlier_change = (after[0, :-1] - before[0, :-1]).abs().max().item()
    assert (earlier_change < 1e-6) if attention == "causal" else (earlier_change > 1e-3)


def test_packed_decoder_builds_no_mask_over_the_pack(tmp_path, monkeypatch):
    """transformers would build an (N, N) mask for the packed row; the packed forward must not ask for one."""
    model = tiny_decoder_model("llama", str(tmp_path), "causal")
    rule = enable_padding_free(model)
    input_ids, mask = random_batch(seed=7, vocab=200, padding_side="left")
    calls = []
    real_mask = packing.packed_or_sdpa_mask

    def counting(*args, **kwargs):
        result = real_mask(*args, **kwargs)
        calls.append(result)
        return result

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, packing.PACKED_ATTENTION, counting)
    packing.encode_packed(model, input_ids, mask, rule)
    assert calls and all(result is None for result in calls)
    model(input_ids=input_ids, attention_mask=mask)  # a padded call still gets its padding mask
    assert calls[-1] is not None


def test_a_sliding_window_shorter_than_the_texts_keeps_padded_batches(tmp_path):
    model = tiny_decoder_model("mistral", str(tmp_path), "causal")
    model.config.sliding_window = 16
    assert enable_padding_free(model, max_length=64) is None
    assert enable_padding_free(model, max_length=16) == "sequence"


def test_padding_free_decoder_matches_sentence_transformers(tmp_path):
    """Bidirectional Llama, mean pooling, padding-free: our encode == SentenceTransformer(saved folder), even for
    a batch without padding (where transformers skips the mask and relies on is_causal)."""
    from conftest import build_tiny_decoder
    from sentence_transformers import SentenceTransformer

    folder = build_tiny_decoder(str(tmp_path / "base"), "llama")
    model = EmbeddingModel.from_pretrained(folder, padding_free=True, attention="bidirectional", pooling="mean")
    assert model.position_rule == "sequence"
    texts = ["alpha beta", "a much longer text about rivers mountains and forests in the valley", "x"]
    model.save_pretrained(str(tmp_path / "saved"))
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    for batch in (texts, texts[:1]):
        torch.testing.assert_close(model.encode(batch), st.encode(batch, convert_to_tensor=True), atol=1e-5,
                                   rtol=1e-4)


def test_decoder_positions_restart_at_zero_for_each_packed_sequence():
    input_ids, mask = random_batch(padding_side="left", seed=8)
    _, position_ids, _ = packing.pack(input_ids, mask, "sequence")
    expected = [position for length in mask.sum(dim=1).tolist() for position in range(length)]
    assert position_ids[0].tolist() == expected


def reference_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                     causal):
    """flash-attn's varlen contract, (N, H, d) tensors and cumulative lengths, as a loop of SDPA calls."""
    import torch.nn.functional as F

    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == max_seqlen_k
    assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    outputs = []
    for start, end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        outputs.append(F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=causal, scale=softmax_scale, enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(outputs)


def use_stand_in_kernel(monkeypatch, name, **functions):
    """Make ``name`` the kernel ``attention_kernels.attend`` picks on this CPU, with stand-in library functions
    (``flash_attn_function=``, ``torch_varlen_function=``) for the ones that need CUDA."""
    from finetune.model import attention_kernels

    attention_kernels.reset()
    monkeypatch.setattr(attention_kernels, "candidates", lambda device: (name,))
    monkeypatch.setattr(attention_kernels, "unavailable_reason", lambda *args: None)
    for function, stand_in in functions.items():
        monkeypatch.setattr(attention_kernels, f"_{function}", lambda stand_in=stand_in: stand_in)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_the_flash_varlen_branch_gets_the_packs_sequence_boundaries(attention, tmp_path, monkeypatch):
    """Where flash-attn is installed (CUDA) the pack goes to its varlen kernel; here a loop with the same contract
    stands in for it, so the arguments the branch passes (cumulative lengths, max length, causal) are checked."""
    padded_model = tiny_decoder_model("qwen3", str(tmp_path), attention)
    packed_model = copy.deepcopy(padded_model).eval()
    padded_model.eval()
    rule = enable_padding_free(packed_model)
    use_stand_in_kernel(monkeypatch, "flash_attn", flash_attn_function=reference_varlen)
    input_ids, mask = random_batch(padding_side="left", seed=9, vocab=200)
    with torch.no_grad():
        reference = masked(padded_model(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask)
        result = packing.encode_packed(packed_model, input_ids, mask, rule)
    torch.testing.assert_close(result, reference, atol=1e-5, rtol=1e-5)


def test_compiled_padding_free_model_compiles_a_few_graphs_not_one_per_batch(tiny_bert):
    """--torch_compile with padding-free encoding: packing and the per-sequence attention stay out of the graph,
    the encoder's layers see (1, N) tensors with N dynamic, so new packed lengths reuse the compiled graphs;
    the vectors equal the eager model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = EmbeddingModel.from_pretrained(tiny_bert, padding_free=True).eval()
    compiled = torch.compile(model)
    graphs = []
    with torch.no_grad():
        for seed, (batch_size, seq_len) in enumerate([(8, 12), (8, 17), (6, 23), (10, 9), (8, 31), (12, 14)]):
            input_ids, mask = random_batch(batch_size, seq_len, vocab=200, seed=seed)
            torch.testing.assert_close(compiled(input_ids, mask), model(input_ids, mask), atol=1e-5, rtol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] > 0 and graphs[-1] == graphs[2], graphs  # nothing new compiled after the first new lengths


def test_padding_free_with_gradient_checkpointing_equals_padded(tiny_qwen3):
    """A checkpointed layer is recomputed in the backward pass, after the forward's packed layout was put away; the
    layout travels as a keyword (the lengths), so the recomputation is the same packed forward."""
    torch.manual_seed(0)
    padded = EmbeddingModel.from_pretrained(tiny_qwen3)
    packed = EmbeddingModel.from_pretrained(tiny_qwen3, padding_free=True)
    packed.gradient_checkpointing_enable({"use_reentrant": False})
    padded.train(), packed.train()
    texts = ["alpha beta gamma", "a longer text about rivers and mountains and the sea", "x"]
    batch = packed.tokenizer(texts, padding=True, return_tensors="pt")
    other = packed.tokenizer(texts[:2], padding=True, return_tensors="pt")
    packed_emb = packed(batch["input_ids"], batch["attention_mask"])
    packed(other["input_ids"], other["attention_mask"])  # another forward in between, as queries then documents
    padded_emb = padded(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(packed_emb, padded_emb, atol=1e-5, rtol=1e-5)
    packed_emb.sum().backward()
    padded_emb.sum().backward()
    for (name, a), (_, b) in zip(padded.named_parameters(), packed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5 * a.grad.abs().max().item(), rtol=1e-5, msg=name)

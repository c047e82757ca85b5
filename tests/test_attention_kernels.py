"""The packed attention kernels (finetune.model.attention_kernels): each against grouped SDPA, the choice among them, the
check that drops a disagreeing kernel, and one host read per packed forward. The CUDA-only kernels run here through
stand-ins with their library's contract; tests/test_gpu.py runs the real ones on a GPU."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from finetune.model import attention_kernels
from finetune.model import packing
from finetune.model.embedding_model import EmbeddingModel
from test_packing import random_batch, reference_varlen, use_stand_in_kernel


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    attention_kernels.reset()
    attention_kernels.set_preference("auto")
    yield
    attention_kernels.reset()
    attention_kernels.set_preference("auto")


def packed_inputs(heads=4, kv_heads=2, head_dim=16, seed=0):
    """Packed q (N, H, d), k/v (N, H_kv, d) of 9 sequences of mixed length, and their layout."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 12, 7, 7, 3, 16, 2, 9])
    layout = packing.attention_layout(lengths)
    tokens = int(lengths.sum())
    q = torch.randn(tokens, heads, head_dim, generator=generator)
    k, v = (torch.randn(tokens, kv_heads, head_dim, generator=generator) for _ in range(2))
    return q, k, v, layout


def loop_reference(q, k, v, layout, causal):
    """Attention of each sequence alone (SDPA on its slice): the definition every kernel must meet."""
    outputs = []
    for start, end in zip(layout.cu_seqlens[:-1].tolist(), layout.cu_seqlens[1:].tolist()):
        outputs.append(F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(outputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["grouped_sdpa", "flex"])
def test_cpu_kernels_equal_attention_of_each_sequence_alone(kernel, causal):
    """grouped SDPA (the CPU kernel) and FlexAttention's document mask (forward only on a CPU), GQA included."""
    q, k, v, layout = packed_inputs()
    with torch.no_grad():
        result = attention_kernels.KERNEL_FUNCTIONS[kernel](q, k, v, layout, dropout=0.0, scale=None, causal=causal)
    torch.testing.assert_close(result, loop_reference(q, k, v, layout, causal), atol=1e-5, rtol=1e-5)


def varlen_attn_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch >= 2.10's varlen_attn signature: causal as window_size (-1, 0), GQA refused unless enable_gqa."""
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError("Expect query and key/value to have the same number of heads")
    return reference_varlen(query, key, value, cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k, max_seqlen_q=max_q,
                            max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale, causal=tuple(window_size) == (-1, 0))


def varlen_attn_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    """torch 2.9's signature: an is_causal keyword, no scale and no GQA flag."""
    return reference_varlen(query, key, value, cu_seqlens_q=cu_seq_q, cu_seqlens_k=cu_seq_k, max_seqlen_q=max_q,
                            max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=None, causal=is_causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("signature", [varlen_attn_new, varlen_attn_old])
def test_torch_varlen_passes_causality_and_gqa_in_either_signature(signature, causal, monkeypatch):
    use_stand_in_kernel(monkeypatch, "torch_varlen", torch_varlen_function=signature)
    q, k, v, layout = packed_inputs()
    with torch.no_grad():
        result = attention_kernels.attend(q, k, v, layout, dropout=0.0, scale=None, causal=causal)
    torch.testing.assert_close(result, loop_reference(q, k, v, layout, causal), atol=1e-5, rtol=1e-5)
    assert ("torch_varlen", q.dtype, causal, True, "cpu") in attention_kernels._verified


def test_a_kernel_that_disagrees_is_dropped_and_grouped_sdpa_answers(monkeypatch, caplog):
    """A stand-in flash kernel that ignores causality: the first causal call compares it with grouped SDPA, drops it
    with a warning naming the difference, and the result is still right."""
    def ignores_causal(q, k, v, **kwargs):
        return reference_varlen(q, k, v, **{**kwargs, "causal": False})

    use_stand_in_kernel(monkeypatch, "flash_attn", flash_attn_function=ignores_causal)
    monkeypatch.setattr(attention_kernels, "unavailable_reason",
                        lambda kernel, *args: attention_kernels._failed.get(kernel))
    q, k, v, layout = packed_inputs()
    with caplog.at_level(logging.WARNING, logger="finetune.model.packing"), torch.no_grad():
        bidirectional = attention_kernels.attend(q, k, v, layout, dropout=0.0, scale=None, causal=False)
        causal = attention_kernels.attend(q, k, v, layout, dropout=0.0, scale=None, causal=True)
    torch.testing.assert_close(bidirectional, loop_reference(q, k, v, layout, False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal, loop_reference(q, k, v, layout, True), atol=1e-5, rtol=1e-5)
    assert "flash_attn" in attention_kernels._failed
    assert "flash_attn dropped: disagrees with grouped SDPA (relative difference" in caplog.text


def test_a_kernel_that_raises_is_dropped(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    use_stand_in_kernel(monkeypatch, "flash_attn", flash_attn_function=broken)
    q, k, v, layout = packed_inputs()
    with caplog.at_level(logging.WARNING, logger="finetune.model.packing"), torch.no_grad():
        result = attention_kernels.attend(q, k, v, layout, dropout=0.0, scale=None, causal=False)
    torch.testing.assert_close(result, loop_reference(q, k, v, layout, False), atol=1e-5, rtol=1e-5)
    assert "RuntimeError: FlashAttention only supports Ampere GPUs or newer." in caplog.text


def test_kernel_choice_by_device_and_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_kernels.candidates(cpu) == ("grouped_sdpa",)
    assert attention_kernels.candidates(cuda) == ("flash_attn", "torch_varlen", "flex")
    assert "fp16/bf16" in attention_kernels.unavailable_reason("torch_varlen", cuda, torch.float32, 64)
    assert "CUDA only" in attention_kernels.unavailable_reason("torch_varlen", cpu, torch.bfloat16, 64)
    assert "head size 320" in attention_kernels.unavailable_reason("torch_varlen", cuda, torch.bfloat16, 320)
    assert attention_kernels.unavailable_reason("torch_varlen", cuda, torch.bfloat16, 64) is None  # torch >= 2.9
    # fp32 on CUDA: no fused kernel, so the model encodes padded sub-batches instead of the grouped-SDPA loop
    assert not attention_kernels.fused_kernel_available(cuda, torch.float32, 64)
    assert attention_kernels.fused_kernel_available(cuda, torch.bfloat16, 64)
    assert attention_kernels.chosen_kernel(cuda, torch.bfloat16, 64) in ("flash_attn", "torch_varlen")
    assert attention_kernels.chosen_kernel(cpu, torch.float32, 64) == "grouped_sdpa"


def test_a_named_kernel_that_cannot_run_here_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="--attention_kernel must be one of"):
        attention_kernels.set_preference("xformers")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            attention_kernels.set_preference("flash_attn")
    attention_kernels.set_preference("torch_varlen")
    q, k, v, layout = packed_inputs()
    with torch.no_grad():  # off CUDA (the load-time check) grouped SDPA answers whatever is named
        result = attention_kernels.attend(q, k, v, layout, dropout=0.0, scale=None, causal=False)
    torch.testing.assert_close(result, loop_reference(q, k, v, layout, False), atol=1e-5, rtol=1e-5)
    q_half = q.to(torch.bfloat16)  # on CUDA a named kernel that cannot run is an error, not a silent fallback
    monkeypatch.setattr(attention_kernels, "candidates", lambda device: ("torch_varlen",))
    with pytest.raises(RuntimeError, match="--attention_kernel torch_varlen cannot run here: it runs on CUDA only"):
        attention_kernels.attend(q_half, k.to(torch.bfloat16), v.to(torch.bfloat16), layout, dropout=0.0, scale=None,
                                 causal=False)


def test_the_option_is_checked_when_parsed():
    from finetune.training.config import ConfigError, parse_arguments

    with pytest.raises(ConfigError, match="--attention_kernel must be one of"):
        parse_arguments(["--attention_kernel", "fastest"])


class HostReads:
    """Counts the calls that read a tensor back to the host (each one a synchronisation on a GPU)."""

    NAMES = ("tolist", "item", "__bool__", "nonzero", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.calls = []
        self.paused = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counting(tensor, *args, _name=name, _original=original, **kwargs):
                if not self.paused:
                    self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)


def test_a_packed_forward_reads_the_host_once_with_a_fused_kernel(tiny_bert, monkeypatch):
    """The layout is built once per forward: the B lengths are read back once, never per layer (2 layers here),
    and the fused kernel needs no grouping; grouped SDPA reads nothing more either."""
    model = EmbeddingModel.from_pretrained(tiny_bert, padding_free=True).eval()
    reads = None

    def kernel(*args, **kwargs):  # the stand-in's own host reads are not the project's
        if reads is not None:
            reads.paused = True
        try:
            return reference_varlen(*args, **kwargs)
        finally:
            if reads is not None:
                reads.paused = False

    use_stand_in_kernel(monkeypatch, "flash_attn", flash_attn_function=kernel)
    input_ids, mask = random_batch(8, 13, vocab=200, seed=3)
    with torch.no_grad():
        model(input_ids, mask)  # the first call checks the kernel against grouped SDPA (reads its difference)
        reads = HostReads(monkeypatch)
        model(input_ids, mask)
    assert reads.calls == ["tolist"], reads.calls


def test_gradient_checkpointing_recomputation_finds_its_forwards_layout(tiny_qwen3, monkeypatch):
    """Queries then documents, then the backward pass recomputes both: each layer finds its own pack's layout
    (no rebuild, so no extra host read) and the gradients equal the padded model's."""
    torch.manual_seed(0)
    padded = EmbeddingModel.from_pretrained(tiny_qwen3)
    packed = EmbeddingModel.from_pretrained(tiny_qwen3, padding_free=True)
    packed.gradient_checkpointing_enable({"use_reentrant": False})
    padded.gradient_checkpointing_enable({"use_reentrant": False})
    use_stand_in_kernel(monkeypatch, "flash_attn", flash_attn_function=reference_varlen)
    queries = packed.tokenizer(["alpha beta", "a longer text about rivers and the sea", "x"], padding=True,
                               return_tensors="pt")
    documents = packed.tokenizer(["one", "two words", "three words here", "and four words here"], padding=True,
                                 return_tensors="pt")
    rebuilt = []
    original = packing.attention_layout
    monkeypatch.setattr(packing, "attention_layout", lambda *args: rebuilt.append(1) or original(*args))
    losses = []
    for model in (packed, padded):
        model.train()
        query_emb = model(queries["input_ids"], queries["attention_mask"])
        doc_emb = model(documents["input_ids"], documents["attention_mask"])
        loss = (query_emb @ doc_emb.T).logsumexp(dim=1).sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert len(rebuilt) == 2  # one layout per forward (queries, documents), none rebuilt by the recomputation
    for (name, a), b in zip(packed.named_parameters(), padded.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_qwen3"])
def test_length_grouped_sub_batches_equal_the_padded_forward(fixture, request):
    """The CUDA fallback without a fused kernel: padded sub-batches of similar length, cut to their columns
    (right-padded BERT keeps column 0; left-padded decoders drop leading padding): same embeddings and gradients."""
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    padded = EmbeddingModel.from_pretrained(path).train()
    grouped = copy.deepcopy(padded)
    grouped.position_rule = "row" if fixture == "tiny_bert" else "sequence"
    grouped._packs_on = lambda device: False
    for model in (padded, grouped):
        model.encoder.config.hidden_dropout_prob = model.encoder.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    texts = ["one", "two words", "a much longer text about rivers mountains and the sea and more", "three words here",
             "x y", "and four words here", "alpha", "beta gamma delta epsilon zeta eta theta"]
    batch = padded.tokenizer(texts, padding=True, return_tensors="pt")
    results = []
    for model in (padded, grouped):
        embeddings = model(batch["input_ids"], batch["attention_mask"])
        embeddings.pow(2).sum(dim=1).mul(torch.arange(8.0)).sum().backward()
        results.append(embeddings.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(grouped.named_parameters(), padded.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)

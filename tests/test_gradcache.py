"""GradCache gives the plain loss's values and gradients, dropout included."""

import contextlib

import pytest
import torch

from conftest import make_trainer
from finetune.training.gradcache import backward_through_chunks, embed_without_graph
from finetune.model.embedding_model import EmbeddingModel


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("mode", ["shared", "exclusive"])
def test_cached_equals_plain_when_one_chunk_holds_the_batch(tiny_bert, tmp_path, mode):
    """Dropout on: with one chunk per side, the RNG stream is consumed exactly as in the plain step."""
    trainer, model, batch = make_trainer(tiny_bert, tmp_path / "p", hard_negatives_mode=mode)
    torch.manual_seed(5)
    plain_loss = trainer.training_step(model, batch).item()
    plain = gradients(model)
    cached_trainer, cached_model, _ = make_trainer(tiny_bert, tmp_path / "c", hard_negatives_mode=mode,
                                                   gradcache_mini_batch_size=1000)
    torch.manual_seed(5)
    cached_loss = cached_trainer.training_step(cached_model, batch).item()
    assert model.training and cached_model.training  # dropout active in both
    assert cached_loss == pytest.approx(plain_loss, abs=1e-6)
    torch.testing.assert_close(gradients(cached_model), plain, atol=1e-6, rtol=1e-5)


def test_cached_small_chunks_equal_chunked_forward_with_graph(tiny_bert, tmp_path):
    """Dropout on, chunks of 5 texts: the replayed RNG gives the same masks as the first pass, so the cached
    gradient equals back-propagating the loss of the first pass's own embeddings."""
    trainer, model, batch = make_trainer(tiny_bert, tmp_path / "c", gradcache_mini_batch_size=5)
    torch.manual_seed(9)
    cached_loss = trainer.training_step(model, batch).item()
    cached = gradients(model)

    reference, ref_model, _ = make_trainer(tiny_bert, tmp_path / "r")
    ref_model.train()
    torch.manual_seed(9)
    chunks = lambda ids, mask: torch.cat([ref_model(ids[i:i + 5], mask[i:i + 5]) for i in range(0, len(ids), 5)])  # noqa: E731
    query_emb = chunks(batch["query_input_ids"], batch["query_attention_mask"])
    doc_emb = chunks(batch["doc_input_ids"], batch["doc_attention_mask"])
    loss = reference.objective_loss(query_emb, doc_emb, batch, training=True)
    loss.backward()
    assert cached_loss == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(cached, gradients(ref_model), atol=1e-6, rtol=1e-5)
    # Without the replay the masks would differ: a sanity check that dropout is really on.
    model.zero_grad()
    torch.manual_seed(10)
    trainer.training_step(model, batch)
    assert (gradients(model) - cached).abs().max() > 1e-6


def test_rng_stream_continues_as_after_the_first_pass(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert).train()
    ids, mask = torch.randint(5, 50, (6, 7)), torch.ones(6, 7, dtype=torch.long)
    torch.manual_seed(1)
    embeddings, chunks = embed_without_graph(model, ids, mask, 2)
    after_first_pass = torch.get_rng_state()
    backward_through_chunks(model, chunks, torch.ones_like(embeddings), backward=lambda t: t.backward(),
                            no_sync=contextlib.nullcontext)
    assert torch.equal(torch.get_rng_state(), after_first_pass)


def test_gradcache_trains_end_to_end(tiny_bert, train_file, tmp_path):
    from finetune import train

    metrics = train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir",
                          str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "8",
                          "--gradcache_mini_batch_size", "4", "--use_cpu", "true", "--report_to", "none"])
    assert metrics["train_loss"] > 0 and (tmp_path / "out" / "modules.json").is_file()


def test_a_skipped_step_moves_the_optimizer_as_the_plain_skipped_step(tiny_bert_without_dropout, train_file, tmp_path,
                                                                      monkeypatch):
    """A non-finite loss at step 2 of 3 (``--on_non_finite skip``): the GradCache step still back-propagates zero
    gradients, as the plain step's zero loss does, so AdamW steps on them (its moments decay, the update goes on)
    and both paths end at the same weights. AdamW's epsilon is raised to 1e-4: with the default 1e-8 a weight whose
    gradient is ~1e-8 moves by ~lr on rounding noise alone (Adam divides by the gradient's own size), and plain
    and cached gradients differ by such noise (2e-5 apart once in CI); a missing step still moves weights ~1e-3."""
    import json
    import math

    from safetensors.torch import load_file

    from finetune.objectives import builtin as objectives
    from finetune import train

    real_loss, calls = objectives.ranking_loss, {"n": 0}

    def loss_that_explodes_at_step_2(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * math.inf if calls["n"] == 2 else loss

    monkeypatch.setattr(objectives, "ranking_loss", loss_that_explodes_at_step_2)
    weights = {}
    for name, extra in (("plain", []), ("cached", ["--gradcache_mini_batch_size", "3"])):
        calls["n"] = 0
        output_dir = tmp_path / name
        train.main(["--model_name_or_path", tiny_bert_without_dropout, "--train_file", train_file, "--output_dir",
                    str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                    "--warmup_steps", "0", "--on_non_finite", "skip", "--logging_steps", "1", "--save_steps", "100",
                    "--use_cpu", "true", "--report_to", "none", "--dataloader_num_workers", "0",
                    "--adam_epsilon", "1e-4", *extra])
        assert calls["n"] == 3  # one loss per step, the second one skipped
        logged = [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
        assert [e["step"] for e in logged] == [1, 2, 3]
        weights[name] = load_file(str(output_dir / "model.safetensors"))
    worst = max((weights["plain"][key] - weights["cached"][key]).abs().max().item() for key in weights["plain"])
    assert worst < 1e-5, f"the skipped GradCache step and the plain one end {worst} apart"

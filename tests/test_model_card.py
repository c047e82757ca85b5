"""The model card written at the end of training: Hub metadata, a usage example that runs, the run's facts."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from conftest import make_records, write_jsonl
from finetune import train
from finetune.training.arguments import HUB_MINILM, default_model_path
from finetune.model.lora import LoraSettings
from finetune.publishing.model_card import hub_repo_id, write_model_card
from finetune.model.embedding_model import EmbeddingModel
from finetune.publishing.sharing import _base_model_id

REQUIRED_TAGS = {"sentence-transformers", "sentence-similarity", "feature-extraction"}


@pytest.fixture(scope="module")
def run_dir(tiny_bert, tmp_path_factory) -> Path:
    """A 3-step tiny run with validation (so metrics before and after) and e5-style prefixes."""
    folder = tmp_path_factory.mktemp("card")
    train_file = write_jsonl(folder / "train.jsonl", make_records(20, seed=11))
    validation_file = write_jsonl(folder / "validation.jsonl", make_records(8, seed=12))
    train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--validation_file", validation_file,
                "--output_dir", str(folder / "out"), "--per_device_train_batch_size", "4", "--num_hard_negatives", "2",
                "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", "--temperature", "0.02",
                "--hard_negatives_mode", "exclusive", "--query_prefix", "query: ", "--passage_prefix", "passage: ",
                "--use_cpu", "true", "--report_to", "none", "--dataloader_num_workers", "0"])
    return folder / "out"


def split_card(text: str) -> tuple[dict, str]:
    match = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, "the card must start with YAML front matter between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def python_block(body: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_card_metadata_is_what_the_hub_expects(run_dir):
    metadata, _ = split_card((run_dir / "README.md").read_text())
    assert metadata["library_name"] == "sentence-transformers"
    assert metadata["pipeline_tag"] == "sentence-similarity"
    assert REQUIRED_TAGS <= set(metadata["tags"]) and "dataset_size:20" in metadata["tags"]
    assert "base_model" not in metadata  # a local folder is not a Hub id
    final = json.loads((run_dir / "all_results.json").read_text())
    [entry] = metadata["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "information-retrieval"
    assert result["dataset"]["name"] == "validation.jsonl"
    values = {metric["type"]: metric["value"] for metric in result["metrics"]}
    assert values["ndcg_at_10"] == pytest.approx(final["eval_ndcg@10"], abs=1e-4)
    assert values["mrr_at_10"] == pytest.approx(final["eval_mrr@10"], abs=1e-4)
    assert not any(name.startswith("loss") or "runtime" in name for name in values)


def test_card_usage_example_runs_and_gives_the_models_vectors(run_dir):
    write_model_card(str(run_dir), repo_id="test-org/tiny-e5")
    _, body = split_card((run_dir / "README.md").read_text())
    code = python_block(body)
    assert 'SentenceTransformer("test-org/tiny-e5")' in code
    namespace = {}
    exec(code.replace('"test-org/tiny-e5"', repr(str(run_dir))), namespace)  # noqa: S102 - our own card

    model = SentenceTransformer(str(run_dir), device="cpu")
    queries, documents = namespace["queries"], namespace["documents"]
    assert torch.allclose(torch.as_tensor(namespace["query_embeddings"]),
                          torch.as_tensor(model.encode_query(queries)), atol=1e-6)
    # ... which are the training code's vectors: prompts "query: " / "passage: " applied.
    ours = EmbeddingModel.from_pretrained(str(run_dir))
    assert torch.allclose(torch.as_tensor(namespace["query_embeddings"]), ours.encode(queries, prefix="query: "), atol=1e-5)
    assert torch.allclose(torch.as_tensor(namespace["document_embeddings"]),
                          ours.encode(documents, prefix="passage: "), atol=1e-5)


def test_card_reports_data_loss_options_evaluation_and_curve(run_dir):
    write_model_card(str(run_dir))
    _, body = split_card((run_dir / "README.md").read_text())
    assert "| Training records | 20 (train.jsonl) |" in body
    assert "| Validation records | 8 (validation.jsonl) |" in body
    assert "| Temperature | 0.02 (scale 50.0) |" in body
    assert "| Hard-negative mode | `exclusive`" in body
    assert "| Hard negatives per query | 2 |" in body
    assert "| Candidates per query | 6 (1 positive, 5 negatives), from 4 queries |" in body  # B + k = 4 + 2
    assert "| `learning_rate` | `0.001` |" in body and "| `max_steps` | `3` |" in body
    assert "output_dir" not in body and "report_to" not in body
    # Before (evaluation at step 0 = the base model) and after, from trainer_state.json and all_results.json.
    state = json.loads((run_dir / "trainer_state.json").read_text())
    start = next(entry for entry in state["log_history"] if entry["step"] == 0 and "eval_ndcg@10" in entry)
    final = json.loads((run_dir / "all_results.json").read_text())
    assert f"| nDCG@10 | {start['eval_ndcg@10']:.4f} | {final['eval_ndcg@10']:.4f} |" in body
    assert f"| validation loss | {start['eval_loss']:.4f} | {final['eval_loss']:.4f} |" in body
    # Training curve: one row per logged step.
    losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
    assert sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert re.search(rf"^\| {step} \| [\d.]+ \| {loss:.4f} \|", body, flags=re.M), step
    assert not list(run_dir.glob(".README.md.*"))  # written atomically, no temporary left behind


def test_card_batch_arithmetic_with_several_processes(run_dir, tmp_path):
    """8 processes x 4 queries x 2 accumulation steps; exclusive scoring over the gathered positives."""
    folder = tmp_path / "model"
    shutil.copytree(run_dir, folder)
    run = json.loads((folder / "training_run.json").read_text())
    run.update(world_size=8, per_device_train_batch_size=4, gradient_accumulation_steps=2, num_hard_negatives=4,
               hard_negatives_mode="exclusive", global_in_batch_negatives=True)
    (folder / "training_run.json").write_text(json.dumps(run))
    _, body = split_card(Path(write_model_card(str(folder))).read_text())
    assert "| Batch | 4 queries per device x 8 process(es) x 2 accumulation step(s) = 64 |" in body
    assert "| Candidates per query | 36 (1 positive, 35 negatives), from 32 queries of all processes |" in body


def test_card_shows_a_saved_retrieval_comparison(run_dir, tiny_bert):
    """`python -m finetune.evaluate ... --output_json OUT/retrieval_metrics.json` output lands in the card."""
    comparison = {tiny_bert: {"ndcg@10": 0.5, "mrr@10": 0.4, "seconds": 3.0},
                  str(run_dir): {"ndcg@10": 0.75, "mrr@10": 0.625, "seconds": 3.0}}
    (run_dir / "retrieval_metrics.json").write_text(json.dumps(comparison))
    try:
        write_model_card(str(run_dir))
        metadata, body = split_card((run_dir / "README.md").read_text())
    finally:
        (run_dir / "retrieval_metrics.json").unlink()
    assert "| metric | base model | this model |" in body
    assert "| nDCG@10 | 0.5000 | 0.7500 |" in body and "seconds" not in body
    values = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert values == {"ndcg_at_10": 0.75, "mrr_at_10": 0.625}


def test_card_reads_past_the_comparisons_of_a_saved_retrieval_comparison(run_dir, tiny_bert):
    """With two models the file also holds "comparisons" (paired differences): not a model, not a column of its
    own, but this model's difference, interval and p-value beside the values (issue 23: the card shows the
    before/after difference with its interval)."""
    models = {tiny_bert: {"ndcg@10": 0.5, "seconds": 3.0}, str(run_dir): {"ndcg@10": 0.75, "seconds": 3.0}}
    comparisons = {str(run_dir): {"baseline": tiny_bert, "metrics": {
        "ndcg@10": {"difference": 0.25, "low": 0.125, "high": 0.375, "p_value": 0.01}}}}
    cards = []
    try:
        for content in (models, {**models, "comparisons": comparisons}):
            (run_dir / "retrieval_metrics.json").write_text(json.dumps(content))
            write_model_card(str(run_dir))
            cards.append((run_dir / "README.md").read_text())
    finally:
        (run_dir / "retrieval_metrics.json").unlink()
    assert "| nDCG@10 | 0.5000 | 0.7500 |" in cards[0] and "interval" not in cards[0]
    assert "| nDCG@10 | 0.5000 | 0.7500 | +0.2500 | [+0.1250, +0.3750] | 0.0100 |" in cards[1]
    assert "comparisons" not in cards[1]


def test_card_without_evaluation_and_with_hub_ids(tiny_bert, tmp_path):
    cache = tmp_path / "hub" / "datasets--acme--qa-triplets" / "snapshots" / "abc123"
    cache.mkdir(parents=True)
    train_file = write_jsonl(cache / "train.jsonl", make_records(12, seed=13))
    output_dir = tmp_path / "out"
    train.main(["--model_name_or_path", tiny_bert, "--train_file", train_file, "--output_dir", str(output_dir),
                "--per_device_train_batch_size", "4", "--max_steps", "1", "--use_cpu", "true", "--report_to", "none"])
    metadata, body = split_card((output_dir / "README.md").read_text())
    assert metadata["datasets"] == ["acme/qa-triplets"]
    assert "model-index" not in metadata and "No evaluation results were saved" in body
    assert hub_repo_id("/x/hub/models--BAAI--bge-small-en-v1.5/snapshots/0123") == "BAAI/bge-small-en-v1.5"
    assert hub_repo_id("intfloat/e5-large-unsupervised") == "intfloat/e5-large-unsupervised"
    assert hub_repo_id(str(output_dir)) is None
    assert _base_model_id(default_model_path()) == HUB_MINILM  # the packaged MiniLM's card names its Hub id


def test_card_says_whether_lora_is_merged_or_an_adapter_on_its_base(run_dir, tiny_bert, tmp_path):
    """Written for folders saved by LoRA models (the card reads only files; training is tested elsewhere)."""
    folders = {}
    for adapter_only in (False, True):
        folders[adapter_only] = tmp_path / ("adapter" if adapter_only else "merged")
        model = EmbeddingModel.from_pretrained(tiny_bert, lora=LoraSettings(4, 8.0, save_adapter_only=adapter_only),
                                               query_prefix="query: ", document_prefix="passage: ")
        model.save_pretrained(str(folders[adapter_only]))
        shutil.copy(run_dir / "training_run.json", folders[adapter_only])
        write_model_card(str(folders[adapter_only]), repo_id="test-org/tiny-lora")
    metadata, body = split_card((folders[False] / "README.md").read_text())
    assert "| Weights | LoRA (r=4, alpha=8.0) merged into plain weights: loads without `peft` |" in body
    assert "lora" in metadata["tags"] and "peft" not in metadata["tags"]

    metadata, body = split_card((folders[True] / "README.md").read_text())
    assert {"peft", "lora"} <= set(metadata["tags"])
    assert f"| Weights | LoRA adapter (r=4, alpha=8.0) on base `{tiny_bert}`, no full weights" in body
    assert "| Architecture | BertModel, 2 layers |" in body and "| Embedding dimension | 32 |" in body  # base's config
    assert "pip install -U sentence-transformers peft" in body and "named by a local path" in body
    namespace = {}
    exec(python_block(body).replace('"test-org/tiny-lora"', repr(str(folders[True]))), namespace)  # noqa: S102
    reference = SentenceTransformer(str(folders[False]), device="cpu").encode_query(namespace["queries"])
    assert torch.allclose(torch.as_tensor(namespace["query_embeddings"]), torch.as_tensor(reference), atol=1e-5)

    # A Hub id as base: linked, no local-path warning, the architecture from the adapter config.
    config_path = folders[True] / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "acme/tiny-base"}))
    _, body = split_card(Path(write_model_card(str(folders[True]))).read_text())
    assert "on base [acme/tiny-base](https://huggingface.co/acme/tiny-base), no full weights" in body
    assert "named by a local path" not in body and "| Architecture | BertModel |" in body
    _, body = split_card((run_dir / "README.md").read_text())
    assert "| Weights |" not in body and "peft" not in body  # a full fine-tune's card is as before

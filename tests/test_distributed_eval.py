"""Two real CPU processes (gloo) give the same retrieval metrics as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_records, write_jsonl
from finetune.retrieval.evaluation import evaluate_retrieval
from finetune.retrieval.sets import load_retrieval_set
from finetune.model.embedding_model import EmbeddingModel

HERE = Path(__file__).resolve().parent


def test_two_process_metrics_equal_one_process(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", make_records(13, seed=7))  # odd sizes: uneven shards
    output = tmp_path / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    result = subprocess.run([accelerate, "launch", "--config_file",
                             str(Path(__file__).resolve().parent.parent / "accelerate_configs" / "cpu_multi_process.yaml"),
                             str(HERE / "distributed_eval_script.py"), tiny_bert, data, str(output)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(output.read_text())
    assert two["world_size"] == 2
    assert two["per_rank"][0] == two["per_rank"][1]  # every rank sees the full result

    model = EmbeddingModel.from_pretrained(tiny_bert)
    one = evaluate_retrieval(lambda t: model.encode(t, batch_size=4), lambda t: model.encode(t, batch_size=4),
                             load_retrieval_set([data]))
    for name, value in one.items():
        assert two["per_rank"][0][name] == pytest.approx(value, abs=1e-6), name


def test_evaluate_command_on_two_processes_equals_one_process(tiny_bert, tmp_path):
    """``accelerate launch -m finetune.evaluate``: shards and query blocks shared, the same shards and metrics."""
    from conftest import launch_two_processes
    from finetune.evaluate import __main__ as evaluate

    data = write_jsonl(tmp_path / "val.jsonl", make_records(13, seed=7))  # 13 queries, 52 documents
    model = str(tmp_path / "model")
    EmbeddingModel.from_pretrained(tiny_bert, query_prefix="query: ").save_pretrained(model)
    common = ["--model_name_or_path", model, "--data", data, "--batch_size", "3", "--shard_size", "8",
              "--query_block_size", "4", "--keep_shards"]
    one = evaluate.main([*common, "--output_json", str(tmp_path / "one.json")])
    result = launch_two_processes(["-m", "finetune.evaluate", *common, "--output_json", str(tmp_path / "two.json")])
    logs = result.stdout + result.stderr
    for expected in ("Process 0 of 2: 52 texts in 7 shards of 8, 0 already encoded; encoding 4 shards here",
                     "Process 1 of 2: 52 texts in 7 shards of 8, 0 already encoded; encoding 3 shards here",
                     "Process 0 of 2: 13 queries in 4 blocks of 4, 0 already searched; searching 2 blocks here",
                     "Process 1 of 2: 13 queries in 4 blocks of 4, 0 already searched; searching 2 blocks here"):
        assert expected in logs
    two = json.loads((tmp_path / "two.json").read_text())
    assert one[model]["ingroup_mrr"] > 0
    assert {k: v for k, v in two[model].items() if k != "seconds"} == {k: v for k, v in one[model].items() if k != "seconds"}
    shards = sorted((tmp_path / "one.json.parts" / "model-0" / "corpus").glob("shard-*.npy"))
    assert len(shards) == 7
    for path in shards:
        assert (tmp_path / "two.json.parts" / "model-0" / "corpus" / path.name).read_bytes() == path.read_bytes()

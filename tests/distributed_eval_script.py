"""Run under 2 processes by tests/test_distributed_eval.py: retrieval metrics, the encoding batches shared.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_eval_script.py MODEL DATA OUT
"""

import json
import sys

import torch
from accelerate import PartialState

from finetune.training.distributed import end_process_group, world
from finetune.retrieval.evaluation import evaluate_retrieval
from finetune.retrieval.sets import load_retrieval_set
from finetune.model.embedding_model import EmbeddingModel


def main(model_path: str, data_path: str, output_path: str) -> None:
    state = PartialState(backend="gloo")
    rank, size = world()
    assert size == 2, f"expected 2 processes, got {size}"
    torch.set_num_threads(1)
    model = EmbeddingModel.from_pretrained(model_path)
    dataset = load_retrieval_set([data_path])
    encode = lambda texts: model.encode(texts, batch_size=4)  # noqa: E731
    metrics = evaluate_retrieval(encode, encode, dataset, device=torch.device("cpu"))
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, metrics)
    if state.is_main_process:
        with open(output_path, "w", encoding="utf-8") as handle:
            json.dump({"world_size": size, "per_rank": gathered}, handle)
    end_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

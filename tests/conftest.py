"""Shared fixtures and helpers: a tiny BERT built offline, small seed-format data files, a 2-process launcher.

Environment settings come first: thread oversubscription makes tiny models 10x slower, and
nothing may reach the Hugging Face Hub.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river mountain forest ocean desert valley city village castle bridge "
         "python function returns list string number file socket thread queue parser token model query "
         "document passage answer question search index vector embedding train batch loss").split()


def make_sentences(count: int, seed: int = 0, length: tuple[int, int] = (4, 14)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*length))) for _ in range(count)]


def make_records(count: int, num_negatives: int = 3, seed: int = 0) -> list[dict]:
    """Seed-format records with distinct random texts (a positive shares words with its question)."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        positive = f"{question} {' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))} doc{index}"
        negatives = [f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))} neg{index}_{n}"
                     for n in range(num_negatives)]
        records.append({"question": question, "pos_doc": [positive], "neg_doc": negatives})
    return records


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)


def build_tiny_bert(directory: str, padding_side: str = "right", **shape) -> str:
    """A 2-layer, 32-dim BERT with random weights and a WordPiece tokenizer trained on the spot (``shape``: other
    BertConfig sizes, e.g. the GPU lane's 64-dim heads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(make_sentences(400) + WORDS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side=padding_side,
                                   model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), **{**dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128),
        **shape})
    BertModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Path of a tiny BERT folder (HF layout, no SentenceTransformer files). Treat as read-only."""
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def tiny_bert_without_dropout(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT with dropout off, so that two runs can agree to the last bit."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    shutil.copytree(tiny_bert, folder, dirs_exist_ok=True)
    config = BertConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(folder)
    return str(folder)


def launch_two_processes(script_args, config="cpu_multi_process.yaml", timeout=600):
    """``accelerate launch`` with ``accelerate_configs/<config>`` from the repo root (configs name paths from it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / config), *script_args]
    # A session of its own: on a timeout the launcher and its worker processes are killed together.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="session")
def tiny_bert_left_padded(tmp_path_factory) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert_left")), padding_side="left")


@pytest.fixture
def train_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "train.jsonl", make_records(24, seed=1))


@pytest.fixture
def validation_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "validation.jsonl", make_records(8, seed=2))


def make_trainer(model_path, tmp_path, *, records=None, num_hard_negatives=2, objective=None, **overrides):
    """An EmbeddingTrainer over ``records`` (default: 12 random ones) and one collated batch of all of them.

    ``overrides`` become command-line flags (``temperature=0.1`` -> ``--temperature 0.1``). The optimizer is
    created and ``current_gradient_accumulation_steps`` set, so ``training_step`` can be called directly.
    """
    from finetune.training.config import parse_arguments
    from finetune.data.examples import TripletCollator, TripletDataset
    from finetune.data.columns import load_raw_dataset, tokenize_dataset
    from finetune.model.embedding_model import EmbeddingModel
    from finetune.training.trainer import EmbeddingTrainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    argv = ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    _, _, args = parse_arguments(argv)
    model = EmbeddingModel.from_pretrained(model_path)
    records = records if records is not None else make_records(12, num_negatives=2, seed=3)
    raw = load_raw_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    dataset = TripletDataset(tokenize_dataset(raw, model.tokenizer), num_hard_negatives=num_hard_negatives)
    batch = TripletCollator(model.tokenizer)([dataset[i] for i in range(len(dataset))])
    trainer = EmbeddingTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=TripletCollator(model.tokenizer), objective=objective)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests bypass
    return trainer, model, batch


def build_tiny_decoder(directory: str, family: str = "qwen3", **shape) -> str:
    """A 2-layer decoder of ``family`` (qwen3, llama, mistral) with random weights, grouped-query attention
    (4 query heads, 2 key/value heads) and a byte-level BPE tokenizer trained on the spot (EOS, no pad token);
    ``shape``: other config sizes (the GPU lane's 64-dim heads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaModel, MistralConfig, MistralModel, PreTrainedTokenizerFast,
                              Qwen3Config, Qwen3Model)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(make_sentences(400) + WORDS,
                                  trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", model_max_length=128)
    shapes = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=fast.eos_token_id)
    config_class, model_class = {"qwen3": (Qwen3Config, Qwen3Model), "llama": (LlamaConfig, LlamaModel),
                                 "mistral": (MistralConfig, MistralModel)}[family]
    config = config_class(**{**shapes, **({"head_dim": 8} if family == "qwen3" else {}), **shape})
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=["qwen3", "llama", "mistral"])
def tiny_decoder(request, tmp_path_factory) -> str:
    """Path of a tiny decoder folder (HF layout) of each family in turn. Treat as read-only."""
    return build_tiny_decoder(str(tmp_path_factory.mktemp(f"tiny_{request.param}")), request.param)


def kill_when(command: list[str], marker, env: dict, timeout: float = 240) -> int:
    """Start ``command``, SIGKILL it as soon as the file ``marker`` exists; returns its exit code (-9 when killed)."""
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """Path of a tiny Qwen3-layout decoder folder (see build_tiny_decoder). Treat as read-only."""
    return build_tiny_decoder(str(tmp_path_factory.mktemp("tiny_qwen3_shared")), "qwen3")

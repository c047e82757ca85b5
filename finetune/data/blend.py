"""Blended training on several datasets (NeMo's weighted ``data_prefix``): specs, the blended dataset, its schedule.

A dataset spec names its files and may set its own ``weight``, ``num_hard_negatives``, prompts
(``query_prefix``/``passage_prefix``: its instruction) and ``hard_negatives_mode``. Written in a recipe
as a list of mappings, or on the command line as ``name=path[:weight]`` (or one JSON object per value).

Every micro-batch comes from one dataset, and at each step every process draws from the same dataset
(the global batch of S processes x B queries is one block of one dataset), so global in-batch negatives
and duplicate masking stay inside a dataset. The schedule of blocks is a pure function of (seed, epoch):
a resumed run replays it exactly.

What an epoch is, by ``--dataset_sampling``:
- ``proportional``: every record of every dataset once (each dataset's blocks, interleaved at random), so
  datasets are seen in proportion to their sizes;
- ``round_robin``: one block of each dataset in turn, until the smallest dataset has been seen once
  (sentence-transformers' round robin);
- ``weighted``: as many blocks as ``proportional``, each drawn from dataset i with probability weight_i
  (NeMo's blend; ``--dataset_temperature T`` sets weight_i = n_i^(1/T) from the sizes instead); within an
  epoch a dataset runs through its records in a new order each time it is used up (every epoch starts anew).
A dataset's records come in a seeded order per pass; a block that a pass leaves short is completed from
the next pass (a new order), so blocks are always full.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np
from torch.utils.data import Dataset, Sampler

from finetune.objectives.losses import NEGATIVE_MODES
from finetune.data.schema import expand_data_files
from finetune.data.text import TextSide

SAMPLING_MODES = ("proportional", "round_robin", "weighted")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a blend; ``None`` options fall back to the run's own (--num_hard_negatives...)."""

    name: str
    files: tuple[str, ...]
    weight: float | None = None
    num_hard_negatives: int | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    hard_negatives_mode: str | None = None

    def query_side(self, default: TextSide) -> TextSide:
        return TextSide(default.prompt if self.query_prefix is None else self.query_prefix, default.max_length)

    def document_side(self, default: TextSide) -> TextSide:
        return TextSide(default.prompt if self.passage_prefix is None else self.passage_prefix, default.max_length)


SPEC_KEYS = tuple(f.name for f in fields(DatasetSpec))


def parse_dataset_specs(values: list[str], option: str) -> list[DatasetSpec]:
    """``--train_datasets`` / ``--validation_datasets`` values -> specs; every problem is a ValueError naming the item.

    A value is a JSON object (a recipe's mapping; ``files`` a path or a list) or ``name=path[:weight]``.
    Files must exist (globs allowed); names must be distinct; weights > 0.
    """
    specs = []
    for position, value in enumerate(values, start=1):
        where = f"{option} item {position} ({value if len(str(value)) < 80 else str(value)[:77] + '...'})"
        entry = _entry(value, where)
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(SPEC_KEYS)}.")
        for key in ("name", "files"):
            if not entry.get(key):
                raise ValueError(f"{where}: '{key}' is missing.")
        name = str(entry["name"])
        if not _NAME.match(name):
            raise ValueError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names metrics).")
        files = entry["files"] if isinstance(entry["files"], list) else [entry["files"]]
        try:
            expand_data_files([str(path) for path in files])
        except FileNotFoundError as error:
            raise ValueError(f"{where}: {error}") from None
        spec = DatasetSpec(name, tuple(str(path) for path in files), **{
            key: entry[key] for key in SPEC_KEYS[2:] if entry.get(key) is not None})
        if spec.weight is not None and not (isinstance(spec.weight, (int, float)) and spec.weight > 0):
            raise ValueError(f"{where}: weight must be a number > 0, got {spec.weight!r}.")
        if spec.num_hard_negatives is not None and not (isinstance(spec.num_hard_negatives, int)
                                                        and spec.num_hard_negatives >= 0):
            raise ValueError(f"{where}: num_hard_negatives must be an integer >= 0, got {spec.num_hard_negatives!r}.")
        if spec.hard_negatives_mode is not None and spec.hard_negatives_mode not in NEGATIVE_MODES:
            raise ValueError(f"{where}: hard_negatives_mode must be one of {NEGATIVE_MODES}.")
        specs.append(spec)
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{option}: duplicate dataset name(s) {duplicates}; each dataset needs its own name.")
    return specs


def _entry(value, where: str) -> dict:
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if text.startswith("{"):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping.")
        return entry
    if "=" not in text:
        raise ValueError(f"{where}: expected name=path[:weight] or a mapping with name and files.")
    name, path = text.split("=", 1)
    entry = {"name": name.strip(), "files": path}
    head, _, tail = path.rpartition(":")
    if head:
        try:
            entry.update(files=head, weight=float(tail))
        except ValueError:
            pass  # a ':' inside the path
    return entry


def blend_weights(sizes: list[int], weights: list[float | None], temperature: float | None) -> list[float]:
    """Probabilities of drawing each dataset: the given weights, or sizes^(1/T) with a temperature, normalised."""
    if temperature is not None:
        raw = [size ** (1.0 / temperature) for size in sizes]
    else:
        raw = [1.0 if weight is None else float(weight) for weight in weights]
    total = sum(raw)
    return [value / total for value in raw]


@dataclass
class BlendedTripletDataset(Dataset):
    """Several TripletDatasets behind one index: key ``(epoch, dataset_index, index)``.

    Each example also carries ``dataset_index`` so that a batch knows its dataset.
    """

    parts: list
    names: list[str]
    sampling: str = "proportional"
    weights: list[float] = field(default_factory=list)  # draw probabilities for 'weighted'
    ids: list[int] | None = None  # each part's dataset id, shared by training and validation (default: position)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, key) -> dict:
        if isinstance(key, int):  # flat index (evaluation helpers): dataset after dataset
            for dataset_index, part in enumerate(self.parts):
                if key < len(part):
                    return {**part[(0, key)], "dataset_index": self._id(dataset_index)}
                key -= len(part)
            raise IndexError(key)
        epoch, dataset_index, index = key
        return {**self.parts[dataset_index][(epoch, index)], "dataset_index": self._id(dataset_index)}

    def _id(self, position: int) -> int:
        return position if self.ids is None else self.ids[position]


class BlendedEpochSampler(Sampler):
    """Keys ``(epoch, dataset_index, index)`` in blocks of ``block = processes x per-device batch`` keys of one dataset.

    The DataLoader cuts the stream into per-device batches and accelerate hands batch j to process j mod S,
    so every process's batch at a step comes from the same block, hence the same dataset.
    """

    def __init__(self, dataset: BlendedTripletDataset, block: int, seed: int = 42):
        self.sizes = [len(part) for part in dataset.parts]
        if min(self.sizes) == 0:
            raise ValueError("Every dataset of a blend needs at least one record.")
        self.sampling = dataset.sampling
        self.weights = dataset.weights
        self.block = block
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def blocks_per_pass(self) -> list[int]:
        """Blocks that one pass over each dataset takes."""
        return [math.ceil(size / self.block) for size in self.sizes]

    def schedule(self, epoch: int) -> list[int]:
        """The dataset index of each block of ``epoch`` (a pure function of seed and epoch)."""
        counts = self.blocks_per_pass()
        rng = np.random.default_rng((self.seed, epoch, 7))
        if self.sampling == "round_robin":
            return [d for _ in range(min(counts)) for d in range(len(counts))]
        if self.sampling == "weighted":
            return rng.choice(len(counts), size=sum(counts), p=self.weights).tolist()
        order = [d for d, count in enumerate(counts) for _ in range(count)]
        return [order[i] for i in rng.permutation(len(order))]

    def __len__(self) -> int:
        return len(self.schedule(self.epoch)) * self.block

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        streams = [self._records(epoch_seed=(self.seed, self.epoch, d), size=size) for d, size in enumerate(self.sizes)]
        for dataset_index in self.schedule(self.epoch):
            for _ in range(self.block):
                yield (self.epoch, dataset_index, next(streams[dataset_index]))

    @staticmethod
    def _records(epoch_seed: tuple, size: int) -> Iterator[int]:
        """A dataset's record indices: one seeded permutation after another (a new one each pass)."""
        for cycle in itertools.count():
            yield from np.random.default_rng((*epoch_seed, cycle)).permutation(size).tolist()


class BlendedEvalSampler(Sampler):
    """Validation keys dataset after dataset, each padded (repeating its first records) to whole blocks.

    Every per-device batch then holds one dataset (its k and prompts); the few repeated records weigh
    slightly more in the validation loss. Retrieval metrics are computed per dataset, without repeats.
    """

    def __init__(self, dataset: BlendedTripletDataset, block: int):
        self.keys = []
        for dataset_index, part in enumerate(dataset.parts):
            indices = list(range(len(part)))
            indices += indices[:(-len(indices)) % block] if len(indices) >= block else \
                [indices[i % len(indices)] for i in range(block - len(indices))]
            self.keys += [(0, dataset_index, index) for index in indices]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return iter(self.keys)


def blocks_per_dataset(sampler: BlendedEpochSampler, num_blocks: int) -> list[int]:
    """How many of the first ``num_blocks`` blocks of the schedule (epoch 0, 1, ...) each dataset gave.

    ``num_blocks`` may run past the end of training: counting stops at the blocks it names."""
    counts = [0] * len(sampler.sizes)
    epoch = 0
    while num_blocks > 0:
        schedule = sampler.schedule(epoch)[:num_blocks]
        for dataset_index in schedule:
            counts[dataset_index] += 1
        num_blocks -= len(schedule)
        epoch += 1
    return counts


def blocks_consumed(sampler: BlendedEpochSampler, optimizer_steps: int, accumulation: int) -> int:
    """Blocks the Trainer used for ``optimizer_steps`` updates: one block per micro-step, and the last update of
    an epoch takes only the blocks the epoch has left (transformers' remainder handling)."""
    per_epoch = len(sampler.schedule(0))  # the same length every epoch
    epochs, updates = divmod(optimizer_steps, math.ceil(per_epoch / accumulation))
    return epochs * per_epoch + min(updates * accumulation, per_epoch)

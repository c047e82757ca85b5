"""The samplers that feed ``TripletDataset`` ``(epoch, index)`` keys, the callback that keeps their epoch right on
resume, and the builders the trainer calls (``--train_sampling_strategy``; blends get ``finetune.data.blend``'s)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback

from finetune.data.blend import BlendedEpochSampler, BlendedEvalSampler, BlendedTripletDataset
from finetune.data.columns import example_lengths
from finetune.data.examples import TripletDataset

class EpochShuffleSampler(Sampler):
    """A seeded random permutation per epoch that yields ``(epoch, index)`` keys for TripletDataset.

    Accelerate and the Trainer call ``set_epoch`` (it reaches samplers through their wrappers,
    unlike ``Dataset.set_epoch``), and the order depends only on (seed, epoch), so resuming
    mid-epoch with skipped batches reproduces the same stream.
    """

    def __init__(self, num_samples: int, seed: int = 42, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist() if self.shuffle else range(self.num_samples)
        for index in order:
            yield (self.epoch, index)


class LengthGroupedEpochSampler(EpochShuffleSampler):
    """Like EpochShuffleSampler, but consecutive batches hold examples of similar length.

    Per epoch: a seeded permutation is cut into mega-batches of ``batch_size * mega_batches``
    examples; each is sorted by length (longest first) and its batches are then shuffled among
    themselves. Batches stay random in content, yet each is padded to a similar length. In-batch
    negatives then come from examples of similar length, a mild bias the README discusses;
    padding-free encoding (the default) already removes most of what this saves.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 42, mega_batches: int = 50):
        super().__init__(len(lengths), seed)
        self.lengths = lengths
        self.batch_size = batch_size
        self.mega_batches = mega_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        size = self.batch_size * self.mega_batches
        for start in range(0, len(order), size):
            mega = sorted(order[start:start + size], key=lambda index: -self.lengths[index])
            batches = [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
            for batch_index in torch.randperm(len(batches), generator=generator).tolist():
                for index in batches[batch_index]:
                    yield (self.epoch, index)


def epoch_sampler_of(dataloader) -> Sampler | None:
    """Our epoch sampler under the wrappers of a prepared DataLoader (accelerate's ``BatchSamplerShard`` and, on
    resume, ``SkipBatchSampler``), or None."""
    seen, stack = set(), [dataloader]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, (EpochShuffleSampler, BlendedEpochSampler)):
            return node
        stack.extend(getattr(node, name, None) for name in ("batch_sampler", "sampler", "base_dataloader"))
    return None


class SamplerEpochCallback(TrainerCallback):
    """Sets the training sampler's epoch at the start of every epoch, the resumed one included.

    The Trainer's own ``set_epoch`` does not reach the sampler under several processes once the dataloader is
    wrapped for skipping the batches a resumed epoch already trained (``SkipBatchSampler`` around
    ``BatchSamplerShard``): the resumed epoch would then replay epoch 0's order and negatives. ``state.epoch`` is
    ``epoch + fraction done``, so its integer part is the epoch that begins.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = epoch_sampler_of(train_dataloader)
        if sampler is not None:
            sampler.set_epoch(int(state.epoch))


def build_train_sampler(dataset: TripletDataset, strategy: str, batch_size: int, seed: int,
                        world_size: int = 1) -> Sampler:
    """The sampler of ``--train_sampling_strategy``: random, group_by_length or sequential (validated by the arguments).

    Every sampler yields ``(epoch, index)`` keys for TripletDataset; a blend of datasets gets its own
    schedule (``finetune.data.blend.BlendedEpochSampler``: blocks of world_size x batch_size keys of one dataset).
    """
    if isinstance(dataset, BlendedTripletDataset):
        return BlendedEpochSampler(dataset, block=world_size * batch_size, seed=seed)
    if strategy == "group_by_length":
        return LengthGroupedEpochSampler(example_lengths(dataset.tokenized), batch_size, seed=seed)
    return EpochShuffleSampler(len(dataset), seed=seed, shuffle=strategy != "sequential")


def build_eval_sampler(dataset, batch_size: int, world_size: int = 1) -> Sampler | None:
    """A blend of validation datasets: batches that each hold one dataset; None (the Trainer's own) otherwise."""
    return BlendedEvalSampler(dataset, world_size * batch_size) if isinstance(dataset, BlendedTripletDataset) else None

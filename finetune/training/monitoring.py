"""What the trainer watches every step: non-finite values and the objective's named components.

Both are decided or reduced over all data-parallel processes together, so that no process takes a
different path (a skipped backward, a missing collective) from the others.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.distributed as dist

from finetune.training.distributed import world

logger = logging.getLogger("finetune.training.trainer")

ON_NON_FINITE = ("stop", "skip")
# Components that count things in a process's share of the batch (``false_negatives_masked``, Matryoshka's
# ``false_negatives_masked_dim64``...): summed over the processes, so that the log counts the whole batch.
SUMMED_COMPONENTS = ("false_negatives_masked",)


class NonFiniteError(RuntimeError):
    """The loss or the gradients became inf/NaN."""


def finite_everywhere(value: torch.Tensor, collective: bool = True) -> bool:
    """True when ``value`` is finite here and, with ``collective`` and several processes, on every process.

    Every process must call it at the same point when ``collective`` is set (one all-reduce).
    """
    finite = torch.isfinite(value.detach()).all()
    if collective and world()[1] > 1:
        flag = finite.to(device=value.device, dtype=torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(finite)


class NonFiniteGuard:
    """Stop (``--on_non_finite stop``) or skip a batch whose loss or gradient norm is inf/NaN, naming the likely causes."""

    def __init__(self, args):
        self.args = args

    def check(self, value: torch.Tensor, what: str, step: int, collective: bool = True) -> bool:
        """True to go on; False to skip this batch (policy 'skip'); raises NonFiniteError (policy 'stop').

        With ``collective`` the decision is the same on every process: one process's inf skips (or
        stops) the step everywhere, so none enters a collective the others left out.
        """
        if finite_everywhere(value, collective):
            return True
        args = self.args
        causes = (f"temperature {args.temperature} (scale {args.scale:g}) too low, "
                  f"{'fp16 overflow (try --bf16), ' if args.fp16 else ''}"
                  f"learning rate {args.learning_rate:g} too high, or inf/NaN weights in the model")
        if args.on_non_finite == "skip":
            logger.warning("Non-finite %s at step %d: skipping this batch (likely causes: %s).", what, step, causes)
            return False
        here = value.detach().float().max().item()
        shown = f"{here}" if not torch.isfinite(value.detach()).all() else "on another process"
        raise NonFiniteError(f"Non-finite {what} ({shown}) at step {step}. Likely causes: {causes}. "
                             "Pass --on_non_finite skip to skip such batches instead.")


class ComponentMeter:
    """Running means of the objective's named components between two logging steps (per step; over processes,
    the mean, or the sum for the counts of ``SUMMED_COMPONENTS``)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        self.count = 0

    def add(self, components: dict[str, torch.Tensor]) -> None:
        for name, value in components.items():
            self.sums[name] = self.sums[name].to(value.device) + value.detach().float()
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        """The means since the last call, averaged (counts: summed) over processes (every process must call it
        together)."""
        if not self.count or not self.sums:
            self.count = 0
            return {}
        names = sorted(self.sums)
        means = torch.stack([self.sums[name] for name in names]) / self.count
        if world()[1] > 1:
            dist.all_reduce(means)
            summed = torch.tensor([name.startswith(SUMMED_COMPONENTS) for name in names], device=means.device)
            means = torch.where(summed, means, means / world()[1])
        self.sums.clear()
        self.count = 0
        return {name: value for name, value in zip(names, means.tolist())}

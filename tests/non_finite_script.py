"""Run under 2 processes by tests/test_non_finite_collective.py: the loss of process 1 only turns inf at its 2nd call.

    accelerate launch --config_file accelerate_configs/cpu_multi_process.yaml tests/non_finite_script.py [train flags]
"""

import math
import sys

import torch.distributed as dist

from finetune.objectives import builtin as objectives
from finetune import train
from finetune.training.distributed import end_process_group

real_ranking_loss = objectives.ranking_loss
calls = {"n": 0}


def ranking_loss_inf_on_rank_1(*args, **kwargs):
    calls["n"] += 1
    loss = real_ranking_loss(*args, **kwargs)
    return loss * math.inf if calls["n"] == 2 and dist.get_rank() == 1 else loss


objectives.ranking_loss = ranking_loss_inf_on_rank_1
train.main(sys.argv[1:])
end_process_group()  # as train.cli ends a run

"""A training run: its options, its inputs, the Trainer subclass and what keeps a run safe.

    checkpointing.py      atomic writes, staged saves, checkpoint markers
    gradcache.py          the cached (GradCache) step
    trainer_internals.py  the ``transformers.Trainer`` internals we rely on, and why
    distributed.py        gathering over processes, sharding checks, the end of a run
    out_of_memory.py      the one-line out-of-memory message
    monitoring.py         non-finite guard and per-component loss logs
    arguments.py          the options (dataclasses; their help is the options page's one source)
    config.py             recipe file + command line -> the option dataclasses
    trainer.py            the thin Trainer subclass
    inputs.py             reads and checks the data, builds the datasets, the evaluator and the objective of a run
"""

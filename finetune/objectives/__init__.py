"""What training minimises, given the embeddings of one batch.

    losses.py   pure scoring and loss functions with shape contracts
    base.py     the interface: ``EmbeddedBatch`` -> objective -> ``ObjectiveOutput``; gathering over processes
    guide.py    the frozen guide model that scores candidates for false-negative filtering (GISTEmbed)
    builtin.py  the objectives this project ships and ``build_objective`` (from the training arguments)
"""

"""Training data: records -> tokenized columns -> sampled examples -> batches.

    schema.py    the record format (question, pos_doc, neg_doc, optional scores), reading and its errors
    text.py      the one text path per side (prompt, truncation, tokenization)
    blend.py     several datasets in one run: weights, schedules, per-dataset settings
    columns.py   JSON -> ``datasets`` columns, tokenized and cached; the checks the training data needs
    examples.py  the dataset of sampled examples and the collator that pads them into batches
    samplers.py  epoch samplers (random, length-grouped, sequential), their builders and the epoch callback
"""

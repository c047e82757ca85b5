"""Command-line tools that prepare NeMo SBERT-format data: validate, convert, mine, split.

They share the record schema (``finetune.schema``) and the encoder (``finetune.modeling``).
"""

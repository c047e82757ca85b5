"""Command-line tools that prepare NeMo SBERT-format data: validate, convert, mine, split.

They share the record schema (``finetune.data.schema``) and the encoder (``finetune.model.embedding_model``).
"""

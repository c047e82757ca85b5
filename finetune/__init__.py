"""Fine-tune Sentence-BERT style embedding models on NeMo SBERT-format triplets.

Imports flow one way: pooling/losses <- modeling <- data <- trainer <- train.
"""

__version__ = "0.1.0"

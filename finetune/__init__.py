"""Fine-tune Sentence-BERT style embedding models on NeMo SBERT-format triplets.

Imports flow one way, in the order of the README's project layout (tests/test_layout.py checks it).
"""

__version__ = "0.1.0"

"""The retrieval metric module (retrieval.py), loadable with evaluate.load on this folder."""

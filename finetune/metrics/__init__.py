"""`evaluate` metric modules kept in the repository, loaded from their local folders (no Hub)."""

from pathlib import Path

RETRIEVAL_METRIC_DIR = str(Path(__file__).resolve().parent / "retrieval")


def load_retrieval_metric():
    """The retrieval metric module through ``evaluate.load`` on its local folder."""
    import evaluate

    return evaluate.load(RETRIEVAL_METRIC_DIR)

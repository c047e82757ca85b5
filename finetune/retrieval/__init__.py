"""Retrieval: one stack from texts to metrics, used by evaluation during training, ``python -m finetune.evaluate``,
``data_prep.mine`` and ``data_prep.score``.

    sets.py        queries, corpus, qrels (seed-format records or a BEIR folder)
    embedder.py    the one model loader: a folder or Hub id -> texts of a side -> embeddings
    work_parts.py  numbered pieces of work shared over processes, resumable (one file per finished piece)
    embeddings.py  encode in fixed batches -> shards of rows, in memory or on disk (fp32 or fp16), one layout
    similarity.py  cosine or dot product, as a transform of the embeddings
    topk.py        exact top-k over chunks of a corpus, in bounded memory, with a fixed tie order
    search.py      query blocks searched over the shards (top-k plus the scores of chosen rows)
    reranking.py   candidate lists scored by a cross-encoder; the in-training RerankEvaluator
    evaluation.py  the metrics of a search; the in-training evaluator; evaluate_model for the command
    significance.py  paired statistics of per-query values: bootstrap interval, sign-flip randomisation p-value
    mteb_results.py  our metrics as MTEB result files; named MTEB tasks run with mteb, when installed
    comparison.py  several models' per-query metrics: JSON Lines, each model against the first
    rerank_candidates.py  a search's top k per query reranked by a cross-encoder (finetune.evaluate --reranker)
"""

"""The embedding model: a Hugging Face encoder or decoder, pooling (+ normalisation), saved as a SentenceTransformer.

    pooling.py            mean / cls / last-token pooling
    decoders.py           what decoder LLMs need as embedders (EOS, left padding, attention direction)
    lora.py               LoRA adapters (peft) and their merge
    attention_kernels.py  packed attention kernels (fused variable-length on CUDA, grouped SDPA on CPU)
    st_layout.py          the SentenceTransformer folder files
    packing.py            padding-free encoding
    embedding_model.py    ``EmbeddingModel``: load any HF model or ST folder, encode, save an ST folder
"""

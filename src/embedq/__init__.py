"""embedq: Sentence-BERT sentence embeddings over gRPC, batched through Redis."""

__version__ = "0.1.0"

"""Model inference the rungs share: generation, label scoring, grammars, embeddings,
retrieval, the LM judge and the openai: backend."""

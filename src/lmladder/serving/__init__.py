"""lmladder serve internals: ``engine`` (the model worker: queue, batching, adapters,
decoding) and ``api`` (the OpenAI-compatible FastAPI app, errors, auth, metrics).

Imported only by ``lmladder serve`` (heavy libraries load inside functions)."""

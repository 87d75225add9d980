"""The search server: FastAPI over a published index directory (``clip-serve``, ``python -m app``).

Imports ``clip_model`` and the index reader ``indexer.store.reader``, nothing else of ``indexer``."""

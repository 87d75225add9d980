"""Offline indexer: image folder -> index directory (built in the indexer issue)."""

"""Offline indexer: image folder -> index directory."""

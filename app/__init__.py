"""FastAPI search service over a published index directory (built in the app issue)."""

"""zhiku: ingest room."""

"""zhiku: rag room."""

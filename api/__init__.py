"""zhiku: api room."""

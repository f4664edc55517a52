"""zhiku: memory room."""

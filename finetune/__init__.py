"""zhiku: finetune room."""

"""The console scripts ``ingest``, ``rag`` and ``finetune``: argument parsing, progress, one-line errors.

Downstream of every room: the commands call ``memory/`` (knowledge bases),
``rag/`` (retrieval, the same as chat's), ``api/`` (the server) and
``finetune/``; nothing imports from here.
"""

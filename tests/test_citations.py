"""Citations added where the generator left them out: same text streamed or whole."""

from __future__ import annotations

from rag.citations import CitationAdder

PASSAGES = [
    "数据备份：每天凌晨 2 点自动把 /data 目录备份到 NAS，备份保留 30 天。",
    "实验室服务器配置说明：本机安装了 4 块 NVIDIA A100 显卡，每块 80GB 显存。在终端运行 nvidia-smi 命令可以查看显存占用。",
]
ANSWER = "服务器上安装了 4 块 NVIDIA A100 显卡，每块 80GB 显存。备份保留 30 天。\n今天天气很好，适合出门散步。"


def _streamed(text: str, size: int) -> str:
    adder = CitationAdder(PASSAGES)
    return "".join(adder.feed(text[i : i + size]) for i in range(0, len(text), size)) + adder.finish()


def test_a_sentence_from_a_passage_gets_its_number_and_others_stay_as_they_are():
    cited = _streamed(ANSWER, len(ANSWER))
    assert cited == "服务器上安装了 4 块 NVIDIA A100 显卡，每块 80GB 显存 [2]。备份保留 30 天 [1]。\n今天天气很好，适合出门散步。"


def test_streaming_in_any_pieces_gives_the_same_text():
    whole = _streamed(ANSWER, len(ANSWER))
    assert all(_streamed(ANSWER, size) == whole for size in (1, 2, 3, 7))


def test_existing_citations_code_and_english_sentences():
    adder = CitationAdder(["The AOA DISAGREE alert needs a difference of more than 10 degrees for 10 seconds."])
    text = "The alert needs more than 10 degrees for 10 seconds. It needs 10 degrees [1].\n```\nmore than 10 degrees for 10 seconds\n```\n"
    assert adder.feed(text) + adder.finish() == (
        "The alert needs more than 10 degrees for 10 seconds [1]. It needs 10 degrees [1].\n```\nmore than 10 degrees for 10 seconds\n```\n"
    )
    assert CitationAdder([]).feed("anything.") == "anything."


def test_a_sentence_that_only_restates_the_question_cites_nothing():
    question = "服务器上安装了几块 NVIDIA A100 显卡？"
    adder = CitationAdder(PASSAGES, question)
    assert adder.feed("服务器上安装了几块 NVIDIA A100 显卡的问题如下：\n") == "服务器上安装了几块 NVIDIA A100 显卡的问题如下：\n"
    assert adder.feed("一共 4 块，每块 80GB 显存。") == "一共 4 块，每块 80GB 显存 [2]。"

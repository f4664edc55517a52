"""Prompt assembly: passages numbered with sources, the client's system text kept,
history and passages fitted to the budget, the question never cut."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rag.generation import ContextOverflow
from rag.prompt import (
    DEFAULT_TEMPLATE_ZH,
    Templates,
    assemble,
    language_of,
    render_system_message,
    retrieval_query,
)


@dataclass(frozen=True)
class P:
    text: str
    source: str
    pages: tuple[int, ...] = ()


def chars(messages) -> int:
    """A stand-in token counter: one token per character (the real one is the generator's)."""
    return sum(len(m["content"]) + 4 for m in messages)


PASSAGES = [P("购买后七天内可以申请退款。", "/docs/shop.pdf", (3,)), P("nvidia-smi 查看显存。", "/docs/gpu.md")]


def test_system_message_numbers_passages_with_sources_under_wenda_template():
    text = render_system_message(PASSAGES, "zh")
    assert text.startswith("学习以下文段, 用中文回答用户问题。只根据文段内容回答")
    assert "[1] (来源: shop.pdf, 第 3 页)\n购买后七天内可以申请退款。" in text
    assert "[2] (来源: gpu.md)\nnvidia-smi 查看显存。" in text


def test_english_question_gets_the_english_template():
    assert language_of("How do I get a refund?") == "en"
    assert language_of("如何申请退款？") == "zh"
    assert language_of("运行 `pip install -e .[dev]` 报错 `ModuleNotFoundError: No module named torch` 怎么办？") == "zh"
    assert language_of("```python\nimport torch\nprint(torch.cuda.is_available())\n```") == "en"  # code only: as written
    assert "[1] (source: shop.pdf, page 3)" in render_system_message(PASSAGES, "en")


def test_client_system_message_is_kept_first():
    text = render_system_message(PASSAGES, "zh", client_system="你是售后客服。")
    assert text.startswith("你是售后客服。\n\n学习以下文段")


def test_templates_must_have_a_passages_slot():
    with pytest.raises(ValueError, match="passages"):
        Templates(zh="no slot")
    custom = Templates(zh="资料：\n{passages}")
    assert render_system_message(PASSAGES, "zh", custom).startswith("资料：\n[1]")


def test_retrieval_query_adds_the_previous_turn_for_references():
    history = [{"role": "user", "content": "知库支持哪些文件格式？"}, {"role": "assistant", "content": "PDF、TXT、Markdown。"}]
    assert retrieval_query(history, "它们的大小有限制吗？") == "知库支持哪些文件格式？\n它们的大小有限制吗？"
    standalone = "如何在 GPU 上用 LoRA 微调生成模型并部署到服务器？"
    assert retrieval_query(history, standalone) == standalone


def test_assemble_keeps_question_and_drops_oldest_history_first():
    history = []
    for i in range(10):
        history += [{"role": "user", "content": f"问题{i}" * 20}, {"role": "assistant", "content": f"回答{i}" * 20}]
    messages = [{"role": "system", "content": "你是客服。"}, *history, {"role": "user", "content": "最后的问题？"}]
    result = assemble(messages, PASSAGES, count_tokens=chars, context_window=700, max_tokens=100)
    assert chars(result.messages) <= 600
    assert result.messages[-1] == {"role": "user", "content": "最后的问题？"}
    assert result.messages[0]["content"].startswith("你是客服。") and "[1]" in result.messages[0]["content"]
    assert result.dropped_turns > 0
    kept = result.messages[1:-1]
    assert kept == history[len(history) - len(kept):] and kept[0]["role"] == "user"


def test_assemble_packs_passages_in_rank_order_under_the_budget():
    long = [P("甲" * 300, "/a.txt"), P("乙" * 300, "/b.txt"), P("丙" * 30, "/c.txt")]
    question = [{"role": "user", "content": "问题？"}]
    budget_for_one = chars([{"role": "system", "content": render_system_message(long[:1], "zh")}, *question]) + 80
    result = assemble(question, long, count_tokens=chars, context_window=budget_for_one + 10, max_tokens=10)
    assert [p.source for p in result.passages] == ["/a.txt", "/c.txt"]  # b does not fit, the short c does


def test_question_that_cannot_fit_is_a_context_overflow():
    with pytest.raises(ContextOverflow) as caught:
        assemble([{"role": "user", "content": "字" * 500}], PASSAGES, count_tokens=chars, context_window=400, max_tokens=50)
    assert "maximum context length is 400" in str(caught.value)


def test_last_message_must_be_the_user():
    with pytest.raises(ValueError, match="user"):
        assemble([{"role": "assistant", "content": "hi"}], [], count_tokens=chars, context_window=100, max_tokens=10)


def test_default_template_is_wenda_style():
    assert "{passages}" in DEFAULT_TEMPLATE_ZH


def test_cited_numbers_reads_the_citation_forms_models_write():
    from rag.prompt import cited_numbers

    assert cited_numbers("显卡有 4 块 [2]，见 [1][2] 与 [1, 3]、[4，5]。") == [2, 1, 3, 4, 5]
    assert cited_numbers("as the template says, [n] or [x]") == []


def test_says_unknown_recognises_both_languages_and_not_an_answer():
    from rag.prompt import says_unknown

    assert says_unknown("文段中没有相关内容。") and says_unknown("The documents do not contain this information.")
    assert says_unknown("无法从文段中得到答案。") and says_unknown("The passages do not contain the answer.")
    assert not says_unknown("服务器上装了 4 块 A100 [1]。") and not says_unknown("Fire and theft.")


def test_passage_tokens_caps_the_passages_and_cuts_a_too_long_best_one():
    passages = [P("甲" * 300, "/a.txt"), P("乙" * 300, "/b.txt"), P("丙" * 300, "/c.txt")]
    question = [{"role": "user", "content": "问题？"}]
    roomy = dict(count_tokens=chars, context_window=100_000, max_tokens=10)
    assert len(assemble(question, passages, **roomy).passages) == 3
    two = assemble(question, passages, passage_tokens=900, **roomy)  # the template's own text counts too
    assert [p.source for p in two.passages] == ["/a.txt", "/b.txt"]
    cut = assemble(question, [P("甲" * 2000, "/a.txt"), *passages[1:]], passage_tokens=600, **roomy)
    assert [p.source for p in cut.passages] == ["/a.txt"] and 300 < len(cut.passages[0].text) < 600

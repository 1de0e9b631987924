"""Scoring packed pairs with a cross-encoder: the engines, and scoring a request set with them (the
micro-batch plan, packing and padding are in `micro_batches.py`).

All pairs of all requests that Triton hands one `execute` are scored together: they are
sorted by length and cut into micro-batches under a token budget, so that short pairs ride
together, long ones get forwards of their own, and memory per forward stays bounded. Scores
are scattered back to each pair's original position.

Engines:
- `PackedEngine`: our packed (unpadded) encoder from `triton_rerank.models.cross_encoder`,
  attention in OpenAI-Triton kernels or torch SDPA.
- `HFEngine`: Hugging Face `AutoModelForSequenceClassification` on padded micro-batches, the
  reference the packed encoder is checked against.
- `OpenVINOEngine` (`openvino_engine.py`): the checkpoint exported to OpenVINO, on padded
  micro-batches; cross-encoders on the CPU, where engine auto (the default) picks it.
- `PackedDecoderEngine` / `HFDecoderEngine`: the same pair for decoder rerankers (Qwen3-Reranker):
  our packed causal decoder (`triton_rerank.models.qwen3_reranker`), and transformers'
  `AutoModelForCausalLM` on padded micro-batches; both score logit(yes) - logit(no) at each
  prompt's last token.
"""

from __future__ import annotations

import json
import locale
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.dtypes import QUANTIZE_NAMES, auto_dtype, torch_dtype
from ..models.families import ENGINE_NAMES, auto_engine, reranker_kind
from .micro_batches import PackedBatch, micro_batches, padded_inputs
from .packed_inputs import PackedInputLimits, PackedRequest
from .prefix_sharing import (
    DEFAULT_MIN_SHARED_PREFIX,
    SharedBatch,
    SharingPairs,
    gather_shared,
    plan_shared_micro_batches,
    shared_prefix_length,
)

# Token budget of one forward when config.pbtxt says 0: small micro-batches stay in a CPU's caches
# (measured 25-30% faster than 16384 on 2 cores); a GPU needs large ones to fill its SMs.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
# The OpenVINO engine pads each micro-batch to its longest pair: smaller ones pad less. Measured on
# DL19 request mixes of 4 requests (2-core Zen 5, bf16): 1024 tokens 265 pairs/s, 4096 tokens 235.
OPENVINO_BATCH_TOKENS = 1024


class HFEngine:
    """Reference engine: transformers' sequence classifier on padded micro-batches (SDPA)."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForSequenceClassification

        self.device = device
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa"
        ).to(device).eval()
        self.pad_token_id = self.model.config.pad_token_id or 0
        self.uses_token_types = self.model.config.type_vocab_size > 1

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        inputs = padded_inputs(batch, self.pad_token_id, self.uses_token_types)
        return self.model(**{name: t.to(self.device) for name, t in inputs.items()}).logits[:, 0].float()


class HFDecoderEngine:
    """Reference engine for decoder rerankers: transformers' causal LM on right-padded micro-batches,
    logit(yes) - logit(no) read at each prompt's last real token."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM

        from ..models.qwen3_reranker import label_token_ids

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
        self.model = self.model.to(device).eval()
        self.labels = torch.tensor(label_token_ids(model_path), device=device)  # (yes, no)
        self.pad_token_id = self.model.config.pad_token_id or 0

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        inputs = padded_inputs(batch, self.pad_token_id, with_token_types=False)
        last = inputs["attention_mask"].sum(1).to(self.device) - 1  # [B] index of each prompt's last token
        hidden = self.model.model(**{name: t.to(self.device) for name, t in inputs.items()}).last_hidden_state
        rows = hidden[torch.arange(len(last), device=self.device), last]  # [B, hidden]
        logits = self.model.lm_head(rows)[:, self.labels].float()  # [B, 2]
        return logits[:, 0] - logits[:, 1]


class PackedDecoderEngine:
    """Our packed causal decoder for Qwen3-Reranker: no compute on padding, two label rows of the LM head."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, attention_backend: str | None):
        from ..models.qwen3_reranker import load_qwen3_reranker

        self.device = device
        self.model = load_qwen3_reranker(model_path, dtype=dtype, device=device, attention_backend=attention_backend)

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(batch.input_ids.to(self.device, non_blocking=True), batch.cu_seqlens, batch.max_seqlen)

    @torch.inference_mode()
    def score_shared(self, batch: SharedBatch) -> torch.Tensor:
        """Scores of pairs whose requests' heads are computed once (serving/prefix_sharing.py)."""
        return self.model.forward_shared(batch.prefix_ids.to(self.device, non_blocking=True), batch.prefix_cu,
                                         batch.input_ids.to(self.device, non_blocking=True), batch.cu_seqlens,
                                         batch.groups, batch.max_seqlen, batch.max_prefix)


class PackedEngine:
    """Our packed encoder: no compute spent on padding."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, attention_backend: str | None,
                 quantize: str = "none", compile: bool = False):
        from ..models.cross_encoder import load_cross_encoder

        self.device = device
        self.model = load_cross_encoder(model_path, dtype=dtype, device=device, attention_backend=attention_backend,
                                        quantize=quantize, compile=compile)

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        # cu_seqlens stays on the host: the model checks it there and copies it over once.
        return self.model(
            batch.input_ids.to(self.device, non_blocking=True),
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.token_type_ids.to(self.device, non_blocking=True),
        )


@dataclass
class EncoderSettings:
    """The cross_encoder model's parameters (config.pbtxt), resolved for this instance."""

    model_path: str
    engine: str = "packed"  # resolved: engine auto is one of ENGINE_NAMES here
    engine_reason: str = ""  # why this engine ("auto: a cross-encoder on the CPU"), for the startup log
    # "cross-encoder" or "decoder" (models/families.py), read from config.json unless config.pbtxt forces it.
    reranker_kind: str = "cross-encoder"
    attention_backend: str | None = None
    dtype: torch.dtype = torch.float32
    dtype_reason: str = ""  # why this dtype ("auto: this CPU has AVX512-BF16"), for the startup log
    quantize: str = "none"  # or "int8": the packed cross-encoder's linears (models/int8_linear.py)
    compile: bool = False  # torch.compile the packed cross-encoder's layers at load (int8 always is)
    device: torch.device = torch.device("cpu")
    max_batch_tokens: int = 16384
    num_threads: int = 0
    # Decoder rerankers: compute each request's shared prompt head once (serving/prefix_sharing.py),
    # for heads of at least min_shared_prefix tokens.
    prefix_sharing: bool = True
    min_shared_prefix: int = DEFAULT_MIN_SHARED_PREFIX
    # Per-request limits (the tokenizer step's): documents, windows of one document (pairs per
    # request = their product), and tokens of one pair (0 = the model's).
    max_documents: int = 1000
    max_chunks_per_doc: int = 64
    max_length: int = 0

    @classmethod
    def from_parameters(cls, params: dict, instance_kind: str = "CPU", device_id: int = 0,
                        model_dir: Path | None = None) -> EncoderSettings:
        """Settings from config.pbtxt parameters; a relative model_path is looked up in `model_dir`
        (the Triton model's directory) first."""
        from .model_files import resolve_model_path

        device = params.get("device", "auto") or "auto"
        if device == "auto":
            # Triton's KIND_AUTO gives a GPU instance on a GPU host; the Python backend moves no
            # tensors itself, so the instance kind decides where the model lives.
            device = f"cuda:{device_id}" if instance_kind == "GPU" and torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        dtype = params.get("dtype", "auto") or "auto"
        dtype_reason = "set in config.pbtxt"
        if dtype == "auto":
            dtype, dtype_reason = auto_dtype(device.type)
            dtype_reason = f"auto: {dtype_reason}"
        max_batch_tokens = int(params.get("max_batch_tokens") or 0)
        if max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens must be positive (or 0 for the device default), got {max_batch_tokens}")
        quantize = params.get("quantize") or "none"
        if quantize not in QUANTIZE_NAMES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_NAMES)}, got {quantize!r}")
        compile = _as_switch("compile", params.get("compile") or "false")
        model_path = resolve_model_path(params["model_path"], progress=False, base=model_dir)
        kind = reranker_kind(json.loads((model_path / "config.json").read_text()),
                             params.get("reranker_kind") or "auto")
        engine = params.get("engine", "auto") or "auto"
        engine_reason = "set in config.pbtxt"
        if engine == "auto":
            engine, engine_reason = auto_engine(kind, device.type, dtype, quantize, compile)
            engine_reason = f"auto: {engine_reason}"
        if max_batch_tokens == 0:
            max_batch_tokens = OPENVINO_BATCH_TOKENS if engine == "openvino" else DEFAULT_BATCH_TOKENS[device.type]
        return cls(
            model_path=str(model_path),
            engine=engine,
            engine_reason=engine_reason,
            reranker_kind=kind,
            attention_backend=params.get("attention_backend") or None,
            dtype=torch_dtype(dtype),
            dtype_reason=dtype_reason,
            quantize=quantize,
            compile=compile,
            device=device,
            max_batch_tokens=max_batch_tokens,
            num_threads=int(params.get("num_threads") or 0),
            prefix_sharing=_as_switch("prefix_sharing", params.get("prefix_sharing") or "true"),
            min_shared_prefix=int(params.get("min_shared_prefix") or 0) or DEFAULT_MIN_SHARED_PREFIX,
            max_documents=int(params.get("max_documents") or cls.max_documents),
            max_chunks_per_doc=int(params.get("max_chunks_per_doc") or cls.max_chunks_per_doc),
            max_length=int(params.get("max_length") or 0),
        )

    @property
    def shared_prefix_threshold(self) -> int | None:
        """Fewest head tokens worth sharing, or None where heads are not shared (off, or a cross-encoder,
        whose pairs attend both ways: its query tokens depend on the document)."""
        if not self.prefix_sharing or self.reranker_kind != "decoder" or self.engine != "packed":
            return None
        return self.min_shared_prefix

    def input_limits(self) -> PackedInputLimits:
        """What one request may carry: the model's vocabulary, type and position tables, and the limits."""
        config = json.loads((Path(self.model_path) / "config.json").read_text())
        return PackedInputLimits.from_model_config(config, max_documents=self.max_documents, max_length=self.max_length,
                                                   max_chunks_per_doc=self.max_chunks_per_doc)


def _as_switch(name: str, value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"parameter {name} must be true or false, got {value!r}")
    return value.lower() in ("true", "1")


def use_utf8_file_encoding() -> None:
    """Makes open()'s default encoding UTF-8 in this process where it is not.

    Python embedded in Triton's stub does not set its locale from the environment, so files open
    as ASCII there even under LANG=C.UTF-8, and torch.compile (quantize int8) fails reading its own
    UTF-8 code templates.
    """
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            return
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue


def build_engine(settings: EncoderSettings):
    """The engine named by settings.engine: "packed" (default), "hf" (the transformers reference) or
    "openvino" (cross-encoders on the CPU, optional package)."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    decoder = settings.reranker_kind == "decoder"
    if settings.quantize != "none" and (decoder or settings.engine not in ("packed", "openvino")):
        raise ValueError(f"quantize {settings.quantize} is for the packed and openvino engines of cross-encoders, "
                         f"not the {settings.engine} engine of a {settings.reranker_kind} reranker; set quantize to "
                         "none")
    if settings.compile and (decoder or settings.engine != "packed"):
        raise ValueError(f"compile is for the packed engine of cross-encoders, not the {settings.engine} engine "
                         f"of a {settings.reranker_kind} reranker; set compile to false")
    if settings.engine == "hf":
        return (HFDecoderEngine if decoder else HFEngine)(settings.model_path, settings.dtype, settings.device)
    if settings.engine == "openvino":
        if decoder:
            raise ValueError("engine openvino is for cross-encoders; decoder rerankers run on the packed or hf engine")
        from .openvino_engine import OpenVINOEngine

        return OpenVINOEngine(settings.model_path, settings.dtype, settings.device, settings.num_threads,
                              settings.quantize)
    if settings.engine == "packed":
        if decoder:
            return PackedDecoderEngine(settings.model_path, settings.dtype, settings.device, settings.attention_backend)
        if settings.quantize != "none" or settings.compile:
            use_utf8_file_encoding()
        return PackedEngine(settings.model_path, settings.dtype, settings.device, settings.attention_backend,
                            settings.quantize, settings.compile)
    raise ValueError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {settings.engine!r}")


def score_pairs(
    engine, input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray, max_batch_tokens: int,
    observe: Callable[[int, float], None] | None = None,
) -> np.ndarray:
    """Scores of every pair (float32, input order) of a packed set of pairs.

    `observe(tokens, seconds)` is called after each micro-batch (for metrics); the seconds
    include the copy of the scores to the host, which waits for the device to finish.
    """
    scores = np.empty(len(lengths), dtype=np.float32)
    for group, batch in micro_batches(input_ids, token_type_ids, lengths, max_batch_tokens):
        started = time.perf_counter()
        scores[group] = engine(batch).cpu().numpy()
        if observe is not None:
            observe(int(batch.input_ids.numel()), time.perf_counter() - started)
    return scores


def max_over_windows(scores: np.ndarray, chunk_counts: np.ndarray) -> np.ndarray:
    """[num_documents] float32: each document's best window, its windows being the next chunk_counts[i]
    scores. A document with a non-finite window (NaN, or an overflow to -inf the max would hide)
    gets that value, so that it is refused rather than answered."""
    if len(chunk_counts) == len(scores):
        return scores
    starts = np.zeros(len(chunk_counts), dtype=np.int64)
    np.cumsum(chunk_counts[:-1], out=starts[1:])
    best = np.maximum.reduceat(scores, starts)
    bad = ~np.isfinite(scores)
    if bad.any():
        best[np.repeat(np.arange(len(chunk_counts)), chunk_counts)[bad]] = scores[bad]
    return best


def score_requests(
    engine, requests: list[PackedRequest], max_batch_tokens: int,
    observe: Callable[[int, float], None] | None = None, min_shared_prefix: int | None = None,
) -> list[np.ndarray]:
    """Scores of each request's documents: all pairs of all requests packed and scored together,
    then each document's windows reduced to their max.

    With min_shared_prefix (decoder engines), a request of several pairs whose pairs share at least
    that many leading tokens has that head computed once (serving/prefix_sharing.py); the others
    take the plain path. Requests must have passed `check_packed_request`: one whose lengths did
    not sum to its ids would shift the pairs of every request after it.
    """
    heads = [0] * len(requests)
    if min_shared_prefix is not None and hasattr(engine, "score_shared"):
        heads = [shared_prefix_length(r.input_ids, r.lengths) for r in requests]
        heads = [h if h >= max(min_shared_prefix, 1) else 0 for h in heads]
    scores: list[np.ndarray | None] = [None] * len(requests)
    plain = [i for i, head in enumerate(heads) if not head]
    if plain:
        input_ids, token_type_ids, lengths = (
            np.concatenate(parts) for parts in
            zip(*((requests[i].input_ids, requests[i].token_type_ids, requests[i].lengths) for i in plain), strict=True)
        )
        flat = score_pairs(engine, input_ids, token_type_ids, lengths, max_batch_tokens, observe=observe)
        for i, part in zip(plain, np.split(flat, np.cumsum([len(requests[i].lengths) for i in plain])[:-1]),
                           strict=True):
            scores[i] = part
    shared = [i for i, head in enumerate(heads) if head]
    if shared:
        flat = score_shared_pairs(engine, [(requests[i].input_ids, requests[i].lengths, heads[i]) for i in shared],
                                  max_batch_tokens, observe=observe)
        for i, part in zip(shared, np.split(flat, np.cumsum([len(requests[i].lengths) for i in shared])[:-1]),
                           strict=True):
            scores[i] = part
    return [max_over_windows(part, r.chunk_counts) for part, r in zip(scores, requests, strict=True)]


def score_shared_pairs(engine, requests: list[tuple[np.ndarray, np.ndarray, int]], max_batch_tokens: int,
                       observe: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Scores of every pair (float32, input order) of requests given as (ids, lengths, head tokens),
    each request's head computed once per micro-batch holding any of its pairs."""
    pairs = SharingPairs.split(requests)
    offsets = np.zeros(len(pairs.own_lengths), dtype=np.int64)
    np.cumsum(pairs.own_lengths[:-1], out=offsets[1:])
    head_lengths = np.array([len(head) for head in pairs.heads], dtype=np.int64)
    scores = np.empty(len(pairs.own_lengths), dtype=np.float32)
    for batch in plan_shared_micro_batches(pairs.own_lengths, pairs.group, head_lengths, max_batch_tokens):
        packed = gather_shared(pairs, offsets, batch)
        started = time.perf_counter()
        scores[batch] = engine.score_shared(packed).cpu().numpy()
        if observe is not None:
            observe(packed.tokens, time.perf_counter() - started)
    return scores


def non_finite_error(scores: np.ndarray, dtype: torch.dtype) -> str | None:
    """The error to return instead of scores that are not all finite numbers (None if they are)."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size == 0:
        return None
    return (
        f"the model produced a non-finite score ({scores[bad[0]]}) for document {int(bad[0])}"
        f"{f' and {bad.size - 1} more' if bad.size > 1 else ''}; in {str(dtype).removeprefix('torch.')} "
        "activations can overflow: serve with --dtype bfloat16 or float32"
    )

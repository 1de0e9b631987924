"""GPU-check stage 5, ``decoder``: the packed Qwen3-Reranker decoder against Hugging Face's recipe.

Two real shapes, Qwen3-Reranker-0.6B and -4B (the configs of the data folder), with random weights
(speed does not depend on their values), score the Qwen3-Reranker prompts of DL19 queries with
their BM25 passages, built by the server's own `PromptTokenizer`. Contenders, per shape:

* ``packed_triton`` / ``packed_sdpa``: our packed causal decoder (`PackedQwen3Reranker`) with
  Triton and with SDPA attention, cut into micro-batches as the server cuts them
  (`plan_micro_batches` under --token-budget), logit(yes) - logit(no) from its two-row head;
* ``hf_padded``: Hugging Face the model card's way: `AutoModelForCausalLM` with SDPA attention on
  left-padded batches of --hf-batch-size in workload order, ``logits[:, -1, [no, yes]]``.

All in bfloat16, as the releases ship (float32 in the CPU smoke mode). Reported per variant:
pairs/s, real tokens/s and useful TFLOP/s (MFU against stage env's measured bf16 matmul rate and
the ratio to HF are derived in results.py); per shape, score agreement: max |difference| of
logit(yes) - logit(no), ours vs HF in bfloat16, and ours and HF vs a float32 reference on a few
prompts: HF's model computing in float32 with the same weights, its decoder layers converted one
at a time (`float32_streamed`), so that not even the reference holds a float32 copy of a 4B model.

Useful FLOPs (`decoder_flops`) are the matmul work the scores need: every layer but the last at
every token (projections, SwiGLU MLP, causal attention over the L(L+1)/2 visible pairs), the last
layer's keys and values at every token but the rest of it at the last token only, and the two
label rows of the LM head there. HF's forward executes more: every layer in full at every
position, padding included, and the full-vocabulary LM head at every position; that count is
recorded beside (``executed_flops`` of ``hf_padded``, ``hf_vocab_head_flops`` its head alone).

The model is built once per shape, on the device in bfloat16 (transformers' init; a 4B model never
exists in float32), and handed to our module as a state dict: `packed_from_hf` runs the loader's
own mapping (`convert_hf_state_dict`, `assign_weights`) on the live tensors, so a 4B model's 8 GB
never go to disk and back. The first shape also takes the file path (save_pretrained, then
`load_qwen3_reranker`), timed, and its weights must equal the direct ones (``load_path``). Why
not the files for all: the encoder stage's H200 run took 10 s to build and save its 1.1 GB model,
so the 4B's 8 GB would cost most of a minute of this stage's three, to get the same tensors.

Shapes share the stage's time: each gets a slot in proportion to SLOT_WEIGHTS of what is left;
a variant whose slot is nearly spent is skipped and recorded as such; everything is flushed as
it is measured, so a stage killed at its deadline leaves the finished shapes recorded.

``--device cpu`` (smoke): `make_test_decoder`'s tiny model (2 layers, the real Qwen3 tokenizer)
on a few short prompts, Triton kernels interpreted.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from ...models.checkpoint import assign_weights
from ...models.dtypes import torch_dtype
from ...models.qwen3_reranker import (
    DecoderConfig,
    PackedQwen3Reranker,
    convert_hf_state_dict,
    hf_name_map,
    label_token_ids,
    load_qwen3_reranker,
)
from ...serving.micro_batches import gather_pairs, plan_micro_batches
from ...serving.prefix_sharing import (
    DEFAULT_MIN_SHARED_PREFIX,
    SharingPairs,
    gather_shared,
    plan_shared_micro_batches,
    shared_prefix_length,
)
from ..random_model import (
    QWEN3_RERANKER_CONFIG_FILES,
    QWEN3_TOKENIZER_CONFIG,
    QWEN3_TOKENIZER_FILE,
    make_test_decoder,
    qwen3_tokenizer_file,
    random_decoder,
    save_model_dir,
    write_decoder_tokenizer,
)
from ..workload import DL19_FILE, fixed_size_batches, load_dl19, resolve_data_dir, spread_indices
from .stage_recorder import StageRecorder, error_text, guarded, log
from .timing import sync, time_passes

SHAPES = ("0.6B", "4B")
TINY_SHAPE = "tiny"
# DL19 queries per shape (each with its first DOCS_PER_QUERY BM25 passages): full run, --quick.
QUERIES = {"0.6B": (20, 5), "4B": (10, 2)}
DOCS_PER_QUERY = 100
# The smoke run: interpreted Triton kernels cost 30-60 ms a token for the tiny model, so three
# prompts of 3 queries (~95 tokens: documents cut to 16), still two micro-batches and a padded HF batch.
TINY_QUERIES, TINY_DOCS, TINY_DOC_TOKENS, TINY_TOKEN_BUDGET, TINY_HF_BATCH = 2, 2, 16, 200, 3
# Share of the stage's remaining time each shape may use (the 4B costs about 8x the FLOPs per token).
SLOT_WEIGHTS = {"0.6B": 1.0, "4B": 1.5, TINY_SHAPE: 1.0}
# Prompts of the score agreement (bf16 vs bf16) and of the float32 reference (a subset of them).
AGREEMENT_PAIRS, REFERENCE_PAIRS = 64, 8
TINY_AGREEMENT_PAIRS, TINY_REFERENCE_PAIRS = 2, 2
# A variant is not started with less of its shape's slot left than this.
VARIANT_MIN_SECONDS = 15.0
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "tie_word_embeddings")


# --------------------------------------------------------------------------------------------
# Parameter and FLOP counts of a Qwen3-style causal decoder
# --------------------------------------------------------------------------------------------


def _dims(cfg: dict) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, heads, kv heads, head_dim, intermediate, layers, vocab) of a Qwen3 config.json."""
    heads = int(cfg["num_attention_heads"])
    return (int(cfg["hidden_size"]), heads, int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or 128),
            int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"]))


def decoder_param_counts(cfg: dict) -> dict[str, int]:
    """Parameter counts of a Qwen3ForCausalLM from its config.json (no biases; q/k norms per head)."""
    h, heads, kv, d, inter, layers, vocab = _dims(cfg)
    per_layer = (
        h * heads * d + 2 * h * kv * d + heads * d * h  # q, k, v, o projections
        + 3 * h * inter  # gate, up, down
        + 2 * h + 2 * d  # input and post-attention RMSNorm, q_norm and k_norm
    )
    non_embedding = layers * per_layer + h  # + the final norm
    embedding = vocab * h
    lm_head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    return {"per_layer": per_layer, "non_embedding": non_embedding, "embedding": embedding, "lm_head": lm_head,
            "total": non_embedding + embedding + lm_head}


def decoder_flops(lengths: Sequence[int], cfg: dict, *, head_rows: int = 2, every_position: bool = False) -> float:
    """Matmul FLOPs of scoring prompts of the given lengths (no padding) with a causal decoder.

    Per token and layer: 2 * (q, k, v, o and MLP weights); causal attention over a sequence of L
    tokens: QK^T and PV over its L(L + 1) / 2 visible pairs, 2 * heads * head_dim * L(L + 1).

    Default (useful work, what a score needs): every layer but the last in full; the last layer's
    keys and values at every token, its query, attention row (4 * heads * head_dim * L), output
    projection and MLP at the last token; ``head_rows`` rows of the LM head at the last token (2:
    "yes" and "no"). ``every_position``: every layer in full at every token and the head's
    ``head_rows`` rows at every token: a causal LM's plain forward (HF's, with the vocabulary as
    head_rows and the padded lengths as lengths). Norms, RoPE and softmax are not counted.
    """
    h, heads, kv, d, inter, layers, _ = _dims(cfg)
    q, kv_proj, o, mlp = 2 * h * heads * d, 2 * h * 2 * kv * d, 2 * heads * d * h, 2 * 3 * h * inter
    layer_token = q + kv_proj + o + mlp
    head = 2 * h * head_rows
    total = 0.0
    for n in lengths:
        n = int(n)
        attention = 2.0 * heads * d * n * (n + 1)
        if every_position:
            total += layers * (n * layer_token + attention) + n * head
        else:
            total += (layers - 1) * (n * layer_token + attention)
            total += n * kv_proj + q + 4.0 * heads * d * n + o + mlp + head
    return float(total)


# --------------------------------------------------------------------------------------------
# Prompts on the device
# --------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """Tokenized prompts as the server holds them (flat ids, lengths), cut into batches on the device."""

    input_ids: np.ndarray  # [T] int32
    offsets: np.ndarray  # [N] int64
    lengths: np.ndarray  # [N] int64
    device: str
    queries: np.ndarray | None = None  # [N] the request (DL19 query) of each prompt

    @classmethod
    def of(cls, sequences: Sequence[np.ndarray], device: str, queries: Sequence[int] | None = None) -> Prompts:
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return cls(np.concatenate(sequences).astype(np.int32), offsets, lengths, device,
                   None if queries is None else np.asarray(queries, dtype=np.int64))

    def sharing(self) -> tuple[SharingPairs, np.ndarray, np.ndarray]:
        """The prompts as the scoring step shares their heads: each request's (query's) longest common
        token prefix once, when it reaches min_shared_prefix, and every prompt's own tokens; with the own
        tokens' offsets and the head lengths. Requests whose head is too short keep a head of 0 tokens,
        which forward_shared cannot take: the variant then reports the gap instead of timing."""
        requests = []
        for query in np.unique(self.queries):
            members = np.flatnonzero(self.queries == query)
            ids = np.concatenate([self.input_ids[self.offsets[i]:self.offsets[i] + self.lengths[i]] for i in members])
            lengths = self.lengths[members].astype(np.int32)
            head = shared_prefix_length(ids, lengths)
            requests.append((ids, lengths, head if head >= DEFAULT_MIN_SHARED_PREFIX else 0))
        pairs = SharingPairs.split(requests)
        offsets = np.zeros(len(pairs.own_lengths), dtype=np.int64)
        np.cumsum(pairs.own_lengths[:-1], out=offsets[1:])
        return pairs, offsets, np.array([len(h) for h in pairs.heads], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def _gather(self, group: Sequence[int]):
        ids = self.input_ids
        return gather_pairs(ids, np.zeros_like(ids), self.offsets, self.lengths, np.asarray(group, dtype=np.int64))

    def packed(self, group: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids on the device, cu_seqlens on the host, max_seqlen): the packed decoder's arguments, as the
        server passes them (the model checks cu_seqlens on the host and copies it over once)."""
        b = self._gather(group)
        return b.input_ids.to(self.device), b.cu_seqlens, b.max_seqlen

    def left_padded(self, group: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Hugging Face inputs of the group, padded on the left to its longest prompt (the recipe's
        `tokenizer.pad` with padding_side="left"), on the device."""
        b = self._gather(group)
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).long()
        width = b.max_seqlen
        mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
        ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
        ids[mask] = b.input_ids
        return {"input_ids": ids.to(self.device), "attention_mask": mask.long().to(self.device)}


def dl19_prompts(model_dir: Path, records: Sequence[dict], n_queries: int, docs: int, max_length: int,
                 max_document_tokens: int | None = None) -> list[np.ndarray]:
    """The Qwen3-Reranker prompt ids of each of the first n_queries DL19 queries with its first `docs` passages."""
    from ...serving.prompt_tokenization import PromptTokenizer

    tokenizer = PromptTokenizer(model_dir, max_length=max_length)
    sequences: list[np.ndarray] = []
    for record in records[:n_queries]:
        packed = tokenizer.encode(record["query"], [c["text"] for c in record["candidates"][:docs]],
                                  max_document_tokens=max_document_tokens)
        ends = np.cumsum(packed.lengths)
        sequences += np.split(packed.input_ids, ends[:-1])
    return sequences


# --------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------


def packed_from_hf(hf, label_token_ids: tuple[int, int], dtype: torch.dtype, device: str | torch.device,
                   attention_backend: str = "sdpa"):
    """Our PackedQwen3Reranker holding copies of a live Hugging Face Qwen3ForCausalLM's weights.

    `load_qwen3_reranker` without the files: the same config parsing, name mapping and strict
    assignment, fed by the model's state dict instead of a checkpoint directory.
    """
    cfg = DecoderConfig.from_hf_dict(hf.config.to_dict())
    with torch.device("meta"):
        model = PackedQwen3Reranker(cfg, label_token_ids=label_token_ids, attention_backend=attention_backend)
    with torch.no_grad():
        state = convert_hf_state_dict(cfg, hf.state_dict(), model.label_token_ids)
        assign_weights(model, state, dtype=dtype, device=torch.device(device), source_names=hf_name_map(cfg))
        model.head.float()
        for name, param in model.head.named_parameters():  # the checkpoint's values, as the loader keeps them
            param.copy_(state[f"head.{name}"])
    return model.eval().requires_grad_(False)


def _write_tokenizer_dir(out: Path, cfg: dict, tokenizer_file: Path) -> Path:
    """config.json and the Qwen3 tokenizer files: what PromptTokenizer and the label ids are read from."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_decoder_tokenizer(out, tokenizer_file, cfg)
    return out


def _build_hf(shape: str, cfg: dict | None, model_dir: Path, dtype: torch.dtype, device: str):
    """The Hugging Face model: the tiny one from its directory; a real shape built on the device in dtype."""
    if shape == TINY_SHAPE:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    else:
        hf = random_decoder(cfg, seed=0, dtype=dtype, device=device, attn_implementation="sdpa")
    return hf.eval().requires_grad_(False)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _measure_file_path(entry: dict, hf, packed, tmp: Path, labels: tuple[int, int], dtype: torch.dtype,
                       device: str) -> None:
    """The other way to our model: save_pretrained + load_qwen3_reranker, timed; its weights must be the direct ones."""
    saved = tmp / "saved"
    try:
        t0 = time.perf_counter()
        save_model_dir(saved, hf)
        entry["save_s"] = time.perf_counter() - t0
        entry["saved_bytes"] = sum(f.stat().st_size for f in saved.glob("*.safetensors"))
        t0 = time.perf_counter()
        loaded = load_qwen3_reranker(saved, dtype=dtype, device=device, attention_backend="sdpa",
                                     label_token_ids=labels)
        sync(device)
        entry["load_saved_s"] = time.perf_counter() - t0
        entry["saved_equals_direct"] = _same_weights(loaded, packed)
        del loaded
    finally:
        shutil.rmtree(saved, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Forwards, scores, agreement
# --------------------------------------------------------------------------------------------


def _packed_forward(model, backend: str) -> Callable[[tuple], torch.Tensor]:
    def fwd(batch):
        ids, cu, max_len = batch
        model.attention_backend = backend
        return model(ids, cu, max_len)

    return fwd


def _hf_forward(hf, no_yes: torch.Tensor) -> Callable[[dict], torch.Tensor]:
    # The recipe: logits of the whole vocabulary at every position, then the last one's (no, yes).
    return lambda inputs: hf(**inputs).logits[:, -1, no_yes]


def _hf_scores(hf, no_yes: torch.Tensor, prompts: Prompts, idx: Sequence[int], batch_size: int,
               pad_id: int) -> torch.Tensor:
    """logit(yes) - logit(no) of HF's recipe for the prompts idx (in batches), float32 on the host."""
    out = []
    for start in range(0, len(idx), batch_size):
        pair = _hf_forward(hf, no_yes)(prompts.left_padded(idx[start:start + batch_size], pad_id)).float()
        out.append((pair[:, 1] - pair[:, 0]).cpu())
    return torch.cat(out)


def _packed_scores(model, backend: str, prompts: Prompts, idx: Sequence[int]) -> torch.Tensor:
    return _packed_forward(model, backend)(prompts.packed(idx)).float().reshape(-1).cpu()


def _diff(got: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    d = (got - ref).abs()
    return {"n": len(ref), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "finite": bool(torch.isfinite(got).all())}


# --------------------------------------------------------------------------------------------
# One shape
# --------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """One shape's inputs and models, and where its measurements go (``entry``, flushed by ``rec``)."""

    name: str
    entry: dict
    rec: StageRecorder
    device: str
    time_left: Callable[[], float]
    token_budget: int
    hf_batch: int
    cfg: dict = None  # type: ignore[assignment]
    model_dir: Path = None  # type: ignore[assignment]
    prompts: Prompts = None  # type: ignore[assignment]
    labels: tuple[int, int] = (0, 0)  # (yes, no)
    pad_id: int = 0

    @property
    def tiny(self) -> bool:
        return self.name == TINY_SHAPE

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.device == "cuda" else "float32"

    def time_variant(self, name: str, fwd: Callable, plan: Sequence[Sequence[int]], prepare: Callable,
                     passes: int, extra: dict) -> None:
        """Time `fwd` over the prompts cut as `plan` (batches built by `prepare` before timing); records it."""
        entry: dict[str, Any] = {"batches": len(plan), **extra}
        self.entry["variants"][name] = entry
        if self.time_left() < VARIANT_MIN_SECONDS:
            entry["error"] = "skipped: stage deadline near"
            self.rec.flush()
            return
        prepared = None
        pairs, tokens, flops = len(self.prompts), int(self.prompts.lengths.sum()), self.entry["flops_per_pass"]
        try:
            prepared = [prepare(group) for group in plan]
            times = time_passes(fwd, prepared, self.device, passes, self.time_left, entry)
            mean = sum(times) / len(times)
            entry.update({
                "pass_times_s": times, "pass_s": mean, "pairs_per_s": pairs / mean,
                "pairs_per_s_best_pass": pairs / min(times), "tokens_per_s": tokens / mean, "tflops": flops / mean / 1e12,
            })
            if entry.get("executed_flops"):
                entry["executed_tflops"] = entry["executed_flops"] / mean / 1e12
            log(f"decoder {self.name} {name}: {mean:.3f} s/pass, {pairs / mean:.1f} pairs/s, "
                f"{tokens / mean:.0f} tokens/s, {flops / mean / 1e12:.3g} useful TFLOP/s")
        except Exception as exc:
            entry["error"] = error_text(exc)
            self.rec.error(f"{self.name} variant {name}", exc)
        finally:
            prepared = None  # free this variant's batches before the next one allocates
            if self.device == "cuda":
                torch.cuda.empty_cache()
        self.rec.flush()


def _time_shared_heads(shape: Shape, packed, passes: int) -> None:
    """Both backends again with each request's shared head computed once (forward_shared), micro-batched
    as the scoring step does; the gain the token counts predict (all prompt tokens over the tokens run
    with sharing) is recorded beside it, and the scores are compared with the plain forward's."""
    pairs, offsets, head_lengths = shape.prompts.sharing()
    whole = int(shape.prompts.lengths.sum())
    if not head_lengths.all():
        shape.entry["shared_heads"] = {"error": "a request's head is under min_shared_prefix tokens: not shared"}
        return
    plan = plan_shared_micro_batches(pairs.own_lengths, pairs.group, head_lengths, shape.token_budget)
    shared_tokens = int(pairs.own_lengths.sum()) + int(sum(head_lengths[np.unique(pairs.group[b])].sum() for b in plan))
    shape.entry["shared_heads"] = {"head_tokens_mean": float(head_lengths.mean()), "tokens_whole": whole,
                                   "tokens_shared": shared_tokens, "predicted_gain": whole / shared_tokens}

    def prepare(batch):
        b = gather_shared(pairs, offsets, batch)
        return (b.prefix_ids.to(shape.device), b.prefix_cu, b.input_ids.to(shape.device), b.cu_seqlens, b.groups,
                b.max_seqlen, b.max_prefix)

    for backend in ("sdpa", "triton"):
        def fwd(batch, backend=backend):
            packed.attention_backend = backend
            return packed.forward_shared(*batch)

        shape.time_variant(f"packed_{backend}_shared", fwd, plan, prepare, passes,
                           {"token_budget": shape.token_budget, "executed_tokens": shared_tokens})
    with guarded(shape.rec, f"{shape.name} shared-head scores"):
        backend = "triton" if shape.device == "cuda" else "sdpa"  # the serving default of each device
        packed.attention_backend = backend
        order = np.argsort(np.concatenate(plan), kind="stable")  # plan order -> prompt order
        shared = torch.cat([packed.forward_shared(*prepare(b)).float().cpu() for b in plan])[order]
        plain = _packed_scores(packed, backend, shape.prompts, list(range(len(shape.prompts))))
        shape.entry["shared_heads"]["vs_plain"] = _diff(shared, plain)
    shape.rec.flush()


def _prepare_inputs(shape: Shape, args: argparse.Namespace, data_dir: Path, records: list[dict], tmp: Path) -> None:
    """The shape's config, tokenizer directory (tiny: the whole model directory) and DL19 prompts; recorded."""
    t0 = time.time()
    if shape.tiny:
        shape.model_dir = make_test_decoder(tmp / "model", data_dir=data_dir)
        shape.cfg = json.loads((shape.model_dir / "config.json").read_text())
        shape.entry["model"] = "make_test_decoder's tiny Qwen3 with the real tokenizer"
    else:
        cfg_file = data_dir / QWEN3_RERANKER_CONFIG_FILES[shape.name]
        shape.cfg = json.loads(cfg_file.read_text())
        shape.model_dir = _write_tokenizer_dir(tmp / "tokenizer", shape.cfg, qwen3_tokenizer_file(data_dir))
        shape.entry["model"] = f"Qwen3-Reranker-{shape.name} shape ({cfg_file})"
    counts = decoder_param_counts(shape.cfg)
    shape.entry.update({"config": {k: shape.cfg.get(k) for k in CONFIG_KEYS}, "dtype": shape.dtype_name,
                        "params_non_embedding": counts["non_embedding"], "params_total_formula": counts["total"]})
    shape.labels = label_token_ids(shape.model_dir)
    tokenizer = Tokenizer.from_file(str(shape.model_dir / "tokenizer.json"))
    shape.pad_id = tokenizer.token_to_id(QWEN3_TOKENIZER_CONFIG["pad_token"])

    if shape.tiny:
        n_queries, docs, doc_tokens = TINY_QUERIES, TINY_DOCS, TINY_DOC_TOKENS
    else:
        n_queries, docs, doc_tokens = QUERIES[shape.name][1 if args.quick else 0], DOCS_PER_QUERY, None
    sequences = dl19_prompts(shape.model_dir, records, n_queries, docs, args.max_length, doc_tokens)
    queries = np.repeat(np.arange(n_queries), [min(docs, len(r["candidates"])) for r in records[:n_queries]])
    if args.pairs and args.pairs < len(sequences):
        kept = spread_indices(len(sequences), args.pairs)
        sequences, queries = [sequences[i] for i in kept], queries[kept]
    prompts = shape.prompts = Prompts.of(sequences, shape.device, queries)
    shape.entry["workload"] = {
        "source": "dl19", "queries": n_queries, "docs_per_query": docs, "pairs": len(prompts),
        "tokens": int(prompts.lengths.sum()), "mean_length": float(prompts.lengths.mean()),
        "max_length": int(prompts.lengths.max()), "min_length": int(prompts.lengths.min()),
        "truncation_length": args.max_length, "document_tokens_cap": doc_tokens, "prepare_s": time.time() - t0,
    }
    shape.entry["flops_per_pass"] = decoder_flops(prompts.lengths.tolist(), shape.cfg)
    shape.rec.flush()
    log(f"decoder {shape.name}: {len(prompts)} prompts, {int(prompts.lengths.sum())} tokens (mean "
        f"{prompts.lengths.mean():.0f}, max {prompts.lengths.max()}), "
        f"{shape.entry['flops_per_pass'] / 1e12:.3g} useful TFLOP/pass")


def _build_models(shape: Shape, tmp: Path, measure_file_path: bool):
    """(HF model, our packed model) of the shape, timed; with measure_file_path also the way through files."""
    dtype = torch_dtype(shape.dtype_name)
    build: dict[str, Any] = {"method": "direct state dict (packed_from_hf)"}
    shape.entry["load_path"] = build
    t0 = time.perf_counter()
    hf = _build_hf(shape.name, shape.cfg, shape.model_dir, dtype, shape.device)
    sync(shape.device)
    build["hf_build_s"] = time.perf_counter() - t0
    shape.entry["params_total"] = sum(p.numel() for p in hf.parameters())
    shape.entry["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    t0 = time.perf_counter()
    packed = packed_from_hf(hf, shape.labels, dtype, shape.device)
    sync(shape.device)
    build["pack_direct_s"] = time.perf_counter() - t0
    shape.rec.flush()
    log(f"decoder {shape.name}: HF model built in {build['hf_build_s']:.1f}s "
        f"({shape.entry['params_total'] / 1e6:.0f}M params), packed copy of its weights in {build['pack_direct_s']:.2f}s")
    if measure_file_path:
        with guarded(shape.rec, f"{shape.name} file path"):
            _measure_file_path(build, hf, packed, tmp, shape.labels, dtype, shape.device)
            log(f"decoder {shape.name}: through files instead: save_pretrained {build['save_s']:.1f}s + "
                f"load_qwen3_reranker {build['load_saved_s']:.1f}s, the same weights: {build['saved_equals_direct']}")
        shape.rec.flush()
    return hf, packed


def _agreement(shape: Shape, hf, packed, no_yes: torch.Tensor, hf_batch: int) -> dict[str, torch.Tensor]:
    """Scores of both packed backends vs HF's on a spread subset (recorded); returns the scores by contender."""
    prompts = shape.prompts
    n = min(TINY_AGREEMENT_PAIRS if shape.tiny else AGREEMENT_PAIRS, len(prompts))
    agree: dict[str, Any] = {"n": n, "indices": spread_indices(len(prompts), n)}
    shape.entry["agreement"] = agree
    scores: dict[str, torch.Tensor] = {}
    if shape.time_left() < VARIANT_MIN_SECONDS:
        agree["skipped"] = "stage deadline near"
        shape.rec.flush()
        return scores
    with guarded(shape.rec, f"{shape.name} agreement"), torch.inference_mode():
        scores["hf"] = _hf_scores(hf, no_yes, prompts, agree["indices"], hf_batch, shape.pad_id)
        agree["hf_score_std"] = float(scores["hf"].std()) if n > 1 else None
        for backend in ("sdpa", "triton"):
            try:
                scores[backend] = _packed_scores(packed, backend, prompts, agree["indices"])
                agree[f"packed_{backend}_vs_hf"] = _diff(scores[backend], scores["hf"])
            except Exception as exc:
                shape.rec.error(f"{shape.name} agreement packed_{backend}", exc)
        log(f"decoder {shape.name}: max |d| of scores: "
            + ", ".join(f"{k} {v['max_abs_diff']:.3g}" for k, v in agree.items() if isinstance(v, dict)))
    shape.rec.flush()
    return scores


def float32_streamed(hf) -> Callable[[], None]:
    """Makes a bf16 HF Qwen3ForCausalLM compute in float32, with its weights' exact values; returns the undo.

    Never a float32 copy of the whole model: the embedding, the final norm, the rotary embedding and
    the LM head are converted for good, each decoder layer just before it runs and back to its dtype
    after it (exact both ways). The float32 cost is the embedding's and one layer's weights.
    """
    base = hf.model
    dtype = next(base.layers[0].parameters()).dtype
    with torch.no_grad():
        for module in (base.embed_tokens, base.norm, base.rotary_emb, hf.lm_head):
            module.float()

    def to_float32(module, args) -> None:  # hooks return None: a value would replace the inputs or outputs
        module.float()

    def back(module, args, output) -> None:
        module.to(dtype)

    handles = []
    for layer in base.layers:
        handles += [layer.register_forward_pre_hook(to_float32), layer.register_forward_hook(back)]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return undo


def _float32_reference(shape: Shape, hf, no_yes: torch.Tensor, scores: dict[str, torch.Tensor],
                       hf_batch: int) -> None:
    """HF's model computing in float32 (its bf16 weights, exactly) on a few prompts: the reference of both
    bf16 contenders (`float32_streamed`: no float32 copy of the model), when the card has the room."""
    agree = shape.entry["agreement"]
    n = min(TINY_REFERENCE_PAIRS if shape.tiny else REFERENCE_PAIRS, len(agree["indices"]))
    ref: dict[str, Any] = {"n": n, "method": "float32 compute, decoder layers converted one at a time"}
    agree["float32_reference"] = ref
    in_layers = {id(p) for p in hf.model.layers.parameters()}
    outside = sum(p.numel() for p in hf.parameters() if id(p) not in in_layers)
    layer = max(sum(p.numel() for p in module.parameters()) for module in hf.model.layers)
    longest = int(shape.prompts.lengths[agree["indices"][:n]].max())
    # float32 weights outside the layers and of one layer, the full-vocabulary logits of a batch, 2 GiB to spare
    need = 4 * (outside + layer + min(n, hf_batch) * longest * int(shape.cfg["vocab_size"])) + 2 * 2**30
    ref["needed_gib"] = need / 2**30
    if shape.device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        ref["free_gib"] = free / 2**30
        if free < need:
            ref["skipped"] = "not enough free device memory"
            return
    undo = float32_streamed(hf)
    try:
        with torch.no_grad():
            reference = _hf_scores(hf, no_yes, shape.prompts, agree["indices"][:n], hf_batch, shape.pad_id)
    finally:
        undo()
    ref["score_std"] = float(reference.std()) if n > 1 else None
    for name, key in (("hf", "hf_vs_float32"), ("sdpa", "packed_sdpa_vs_float32"), ("triton", "packed_triton_vs_float32")):
        if name in scores:
            agree[key] = _diff(scores[name][:n], reference)
    log(f"decoder {shape.name}: max |d| vs the float32 reference: "
        + ", ".join(f"{k} {v['max_abs_diff']:.3g}" for k, v in agree.items() if k.endswith("_vs_float32")))


def _run_shape(shape: Shape, args: argparse.Namespace, data_dir: Path, records: list[dict], tmp: Path,
               measure_file_path: bool) -> None:
    """One shape: inputs, models, then HF, packed SDPA, score agreement, float32 reference, packed Triton.

    Torch-only paths come first, so that a Triton fault (which ends the CUDA context) cannot cost
    the baselines; the HF model is freed before the Triton path is timed.
    """
    if shape.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _prepare_inputs(shape, args, data_dir, records, tmp)
    hf, packed = _build_models(shape, tmp, measure_file_path)
    prompts, cfg, entry = shape.prompts, shape.cfg, shape.entry
    lengths = prompts.lengths.tolist()
    no_yes = torch.tensor([shape.labels[1], shape.labels[0]], device=shape.device)
    # The smoke run reports its one (warmup) pass: it exercises the code, its speed means nothing.
    passes = 0 if shape.tiny else (1 if args.quick else 2)
    token_budget, hf_batch = shape.token_budget, shape.hf_batch
    server_plan = plan_micro_batches(prompts.lengths, token_budget)
    hf_plan = fixed_size_batches(lengths, hf_batch, sort=False)
    padded = [max(lengths[i] for i in group) for group in hf_plan for _ in group]
    vocab, hidden = int(cfg["vocab_size"]), int(cfg["hidden_size"])
    entry["hf_executed_flops_per_pass"] = decoder_flops(padded, cfg, head_rows=vocab, every_position=True)
    entry["hf_vocab_head_flops_per_pass"] = 2.0 * hidden * vocab * sum(padded)
    entry["hf_executed_over_useful"] = entry["hf_executed_flops_per_pass"] / entry["flops_per_pass"]
    entry["variants"] = {}
    packed_extra = {"token_budget": token_budget, "executed_tokens": sum(lengths), "pad_fraction": 0.0}

    shape.time_variant("hf_padded", _hf_forward(hf, no_yes), hf_plan, lambda g: prompts.left_padded(g, shape.pad_id),
                       passes, {"batch_size": hf_batch, "executed_tokens": sum(padded),
                                "pad_fraction": 1.0 - sum(lengths) / sum(padded),
                                "executed_flops": entry["hf_executed_flops_per_pass"]})
    shape.time_variant("packed_sdpa", _packed_forward(packed, "sdpa"), server_plan, prompts.packed, passes,
                       dict(packed_extra))
    scores = _agreement(shape, hf, packed, no_yes, hf_batch)
    if scores:
        with guarded(shape.rec, f"{shape.name} float32 reference"):
            _float32_reference(shape, hf, no_yes, scores, hf_batch)
        shape.rec.flush()
    del hf
    gc.collect()
    if shape.device == "cuda":
        torch.cuda.empty_cache()
    shape.time_variant("packed_triton", _packed_forward(packed, "triton"), server_plan, prompts.packed, passes,
                       dict(packed_extra))
    _time_shared_heads(shape, packed, passes)
    if shape.device == "cuda":
        entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _missing_files(data_dir: Path | None, shapes: Sequence[str]) -> list[str]:
    files = [DL19_FILE, QWEN3_TOKENIZER_FILE, *(QWEN3_RERANKER_CONFIG_FILES[s] for s in shapes if s != TINY_SHAPE)]
    return [f for f in files if data_dir is None or not (data_dir / f).is_file()]


def stage_decoder(args: argparse.Namespace, rec: StageRecorder) -> None:
    device = args.device
    tiny = device != "cuda"
    shapes = (TINY_SHAPE,) if tiny else SHAPES
    data_dir = resolve_data_dir(args.data_dir)
    token_budget = min(args.token_budget, TINY_TOKEN_BUDGET) if tiny else args.token_budget
    hf_batch = min(args.hf_batch_size, TINY_HF_BATCH) if tiny else args.hf_batch_size
    rec.data.update({"device": device, "dtype": "float32" if tiny else "bfloat16", "token_budget": token_budget,
                     "hf_batch_size": hf_batch})
    rec.set("shapes", {})
    missing = _missing_files(data_dir, shapes)
    if missing:
        raise FileNotFoundError(f"the decoder stage needs {', '.join(missing)} in the data folder ({data_dir}); "
                                "pack them with `python -m triton_rerank.bench.gpu.carry`")
    records = load_dl19(data_dir / DL19_FILE)
    for i, name in enumerate(shapes):
        entry: dict[str, Any] = {"status": "running"}
        rec.data["shapes"][name] = entry
        left = rec.time_left()
        # This shape's slot: its weight's share of what is left (the last shape gets all of it).
        weights = [SLOT_WEIGHTS[s] for s in shapes[i:]]
        slot_end = time.time() + left * weights[0] / sum(weights)
        entry["slot_s"] = round(min(left, slot_end - time.time()), 1)
        if left < 2 * VARIANT_MIN_SECONDS:
            entry.update({"status": "skipped", "reason": f"stage deadline near ({left:.0f}s left)"})
            rec.flush()
            continue
        rec.flush()
        log(f"decoder {name}: start (slot {entry['slot_s']:.0f}s of {left:.0f}s left)")
        shape = Shape(name, entry, rec, device, lambda slot_end=slot_end: min(rec.time_left(), slot_end - time.time()),
                      token_budget, hf_batch)
        t0, n_errors = time.time(), len(rec.data["errors"])
        tmp = Path(tempfile.mkdtemp(prefix=f"gpu_check_decoder_{name}_"))
        try:
            _run_shape(shape, args, data_dir, records, tmp, measure_file_path=i == 0)
            if any("pairs_per_s" not in v for v in entry["variants"].values()):
                entry["status"] = "incomplete"
            else:
                entry["status"] = "ok" if len(rec.data["errors"]) == n_errors else "ok (with errors)"
        except Exception as exc:
            entry.update({"status": "error", "error": error_text(exc)})
            rec.error(name, exc)
        finally:
            shape = None
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        entry["seconds"] = round(time.time() - t0, 1)
        rec.flush()
        log(f"decoder {name}: {entry['status']} in {entry['seconds']:.1f}s")

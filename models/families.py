"""Facts about the model families served, read from a Hugging Face ``config.json`` dict.

No torch here: the tokenizer step (a process of its own that must not load torch) and the
encoder share these rules, so that both agree on how long a pair may be.
"""

from __future__ import annotations

# Families whose position ids start at pad_token_id + 1 (RoBERTa's numbering; CamemBERT and
# XLM-R are RoBERTa models), and families numbering positions from 0.
ROBERTA_TYPES = ("xlm-roberta", "roberta", "camembert")
BERT_TYPES = ("bert",)
CROSS_ENCODER_TYPES = ROBERTA_TYPES + BERT_TYPES
# Decoder LLMs scored by their next-token logits for "yes" and "no" (Qwen3-Reranker).
DECODER_TYPES = ("qwen3",)
DECODER_ARCHITECTURES = ("Qwen3ForCausalLM",)

# How a model reranks: "cross-encoder" (a one-logit classification head on the pair) or "decoder"
# (a causal LM's logit(yes) - logit(no) after a prompt). "auto" reads config.json.
RERANKER_KINDS = ("cross-encoder", "decoder")
# The scoring step's engines: our packed encoder/decoder, transformers (the reference), and OpenVINO
# (cross-encoders on the CPU). "auto" (the default) picks one by what runs where: auto_engine.
ENGINE_NAMES = ("packed", "hf", "openvino")
ENGINE_CHOICES = ("auto", *ENGINE_NAMES)


def auto_engine(reranker_kind: str, device_type: str, dtype: str, quantize: str = "none",
                compile: bool = False) -> tuple[str, str]:
    """(engine, why) that engine=auto runs: OpenVINO for cross-encoders on the CPU, where it measured
    1.36-1.57x our packed torch encoder served (README: The OpenVINO engine); the packed engine for
    decoders, GPUs, float16, quantize and compile (what it alone runs), or without the openvino package."""
    import importlib.util

    if reranker_kind == "decoder":
        return "packed", "a decoder reranker"
    if device_type != "cpu":
        return "packed", f"on {device_type}"
    if dtype == "float16":
        return "packed", "float16"
    if compile or quantize != "none":
        return "packed", "compile" if compile else f"quantize {quantize}"
    if importlib.util.find_spec("openvino") is None:
        return "packed", "the openvino package is not installed"
    return "openvino", "a cross-encoder on the CPU"


def position_offset(model_type: str, pad_token_id: int) -> int:
    """The position id of a sequence's first token."""
    return pad_token_id + 1 if model_type in ROBERTA_TYPES else 0


def default_pad_token_id(model_type: str) -> int:
    """What transformers assumes when config.json names no pad_token_id."""
    return 1 if model_type in ROBERTA_TYPES else 0


def max_input_length(config: dict) -> int:
    """Longest sequence the position table covers: the most tokens one (query, document) pair may have.

    RoBERTa-style models lose the first ``pad_token_id + 1`` slots of the table to the offset:
    8194 - (1 + 1) = 8192 for bge-reranker-v2-m3. BERT-style models use all of it (512 for
    cross-encoder/ms-marco-MiniLM-L-6-v2).
    """
    model_type = config.get("model_type", "")
    pad = config.get("pad_token_id")
    pad = default_pad_token_id(model_type) if pad is None else int(pad)
    return int(config["max_position_embeddings"]) - position_offset(model_type, pad)


def reranker_kind(config: dict, forced: str = "auto") -> str:
    """ "cross-encoder" or "decoder" for a config.json dict; `forced` (not "auto") is checked and returned.

    Detection reads `architectures` first (a Qwen3ForCausalLM is a decoder reranker), then
    `model_type`. A config it cannot place is a ValueError that names the flag to force the kind.
    """
    model_type = config.get("model_type", "")
    if forced not in ("auto", *RERANKER_KINDS):
        raise ValueError(f"reranker kind must be auto or one of {', '.join(RERANKER_KINDS)}, got {forced!r}")
    if forced == "decoder" and model_type not in DECODER_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a decoder this server runs (it runs "
                         f"{', '.join(DECODER_TYPES)})")
    if forced == "cross-encoder" and model_type not in CROSS_ENCODER_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a cross-encoder this server runs (it runs "
                         f"{', '.join(CROSS_ENCODER_TYPES)})")
    if forced != "auto":
        return forced
    architectures = config.get("architectures") or []
    if any(a in DECODER_ARCHITECTURES for a in architectures):
        return "decoder"
    if model_type in CROSS_ENCODER_TYPES:
        return "cross-encoder"
    if model_type in DECODER_TYPES and not architectures:
        return "decoder"
    named = f"architectures {architectures} and model_type {model_type!r}" if architectures else \
        f"model_type {model_type!r}"
    raise ValueError(
        f"cannot tell how to rerank with a model of {named}: this server runs cross-encoders "
        f"({', '.join(CROSS_ENCODER_TYPES)} sequence classifiers with one label) and decoder rerankers "
        f"({', '.join(DECODER_ARCHITECTURES)}, scored by logit(yes) - logit(no)); pass --reranker-kind "
        "decoder or cross-encoder if the model is one of these")

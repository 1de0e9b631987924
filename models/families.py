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

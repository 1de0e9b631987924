"""The benchmark's model: a random-weight cross-encoder of a real shape, saved with its tokenizer.

Speed does not depend on weight values, so a model directory with the real `config.json` of
cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT, 6 layers, hidden 384, 12 heads), random weights and
the bert-base-uncased `tokenizer.json` runs exactly as fast as the real checkpoint. Both files
come from ../shared/data when present. Without them the same shape is built from the config below
with a small generated WordPiece tokenizer (`tiny_model.train_tokenizer`); only the vocabulary
(embedding table) differs, which does not change the encoder's cost.

The directory is an ordinary Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, special_tokens_map.json): our server, transformers and
Infinity (sentence-transformers' CrossEncoder) all load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .workload import resolve_data_dir

MINILM_CONFIG_FILE = "configs/ms-marco-MiniLM-L-6-v2.json"
BERT_TOKENIZER_FILE = "tokenizers/bert-base-uncased/tokenizer.json"
MARKER = "bench_model.json"

# config.json of cross-encoder/ms-marco-MiniLM-L-6-v2, used when the shared data folder is absent.
MINILM_L6_CONFIG: dict = {
    "architectures": ["BertForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 384,
    "id2label": {"0": "LABEL_0"},
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "label2id": {"LABEL_0": 0},
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 6,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 30522,
}


def model_sources(data_dir: Path | None) -> dict[str, str]:
    """Where the config and the tokenizer come from: files of the data folder, or 'generated'."""
    config = data_dir / MINILM_CONFIG_FILE if data_dir else None
    tokenizer = data_dir / BERT_TOKENIZER_FILE if data_dir else None
    return {
        "config": str(config) if config and config.is_file() else "built-in ms-marco-MiniLM-L-6-v2",
        "tokenizer": str(tokenizer) if tokenizer and tokenizer.is_file() else "generated WordPiece (tiny vocab)",
    }


def describe_model(model_dir: Path) -> str:
    """A one-line description of a model directory for reports (name, layers, hidden, heads, vocab)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    marker = Path(model_dir) / MARKER
    name = json.loads(marker.read_text()).get("name") if marker.is_file() else Path(model_dir).name
    return (f"{name} ({cfg.get('model_type')}, {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, "
            f"{cfg.get('num_attention_heads')} heads, vocab {cfg.get('vocab_size')}, random weights)")


def build_bench_model(out: str | Path, data_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Writes (or reuses) the random-weight MiniLM-L6-shaped BERT cross-encoder in `out`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    out = Path(out)
    data = resolve_data_dir(str(data_dir) if data_dir else None)
    sources = model_sources(data)
    marker = {"name": "ms-marco-MiniLM-L-6-v2-shape", "seed": seed, **sources}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        return out
    out.mkdir(parents=True, exist_ok=True)
    if Path(sources["config"]).is_file():
        cfg = json.loads(Path(sources["config"]).read_text())
    else:
        cfg = dict(MINILM_L6_CONFIG)
    if Path(sources["tokenizer"]).is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(sources["tokenizer"])
    else:
        from .tiny_model import train_tokenizer

        tokenizer = train_tokenizer("bert", seed=seed)
        cfg["vocab_size"] = tokenizer.get_vocab_size()
    tokenizer.no_padding()
    tokenizer.no_truncation()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("sbert_")}
    config = BertConfig(**{k: v for k, v in cfg.items() if k != "architectures"}, num_labels=1)
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=int(cfg["max_position_embeddings"]),
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(out)
    # transformers 5 writes its own class name; older releases (Infinity's venv) need a known one.
    tok_config = out / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "tokenizer_class": "BertTokenizer"}, indent=1))
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out

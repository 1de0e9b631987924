"""Small random-weight cross-encoders with trained tokenizers, for tests and offline demos.

`triton-rerank make-test-model OUT --arch xlm-roberta|bert` writes a Hugging Face model
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that every
part of the service loads exactly as it loads a real checkpoint. Scores are meaningless as
relevance; the model exists so the whole pipeline runs without the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ARCHES = ("xlm-roberta", "bert")

_WORDS = (
    "panda bear bamboo china forest animal giant black white eats lives mountain zoo the a of and in is "
    "what where how why when who search engine query document passage rank score relevance model neural "
    "network transformer attention token vocabulary language english french german water river city "
    "capital country population history science physics chemistry biology computer program python code "
    "server client request response fast slow large small long short first second answer question"
).split()


def _corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 24))) for _ in range(lines)]


def train_tokenizer(arch: str, vocab_size: int = 600, seed: int = 0):
    """A fast tokenizer with the arch's special tokens and pair template, trained on a tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        tokenizer.train_from_iterator(_corpus(2000, seed), trainer)
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    elif arch == "xlm-roberta":
        # XLM-R's standard ids: <s>=0, <pad>=1, </s>=2, <unk>=3.
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
        tokenizer.train_from_iterator(_corpus(2000, seed), trainer)
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
    else:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    return tokenizer


def make_test_model(out: str | Path, arch: str = "xlm-roberta", *, hidden_size: int = 64, layers: int = 2,
                    heads: int = 2, seed: int = 0) -> Path:
    """Writes a random-weight 1-label sequence classifier and its tokenizer to `out`."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(arch, seed=seed)
    common = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=4 * hidden_size, num_labels=1,
                  hidden_act="gelu", initializer_range=0.2)
    if arch == "bert":
        config = BertConfig(**common, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
        model_class = BertForSequenceClassification
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                                       model_max_length=512)
    else:
        config = XLMRobertaConfig(**common, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                  bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
        model_class = XLMRobertaForSequenceClassification
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                                       mask_token="<mask>", model_max_length=512)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Default init gives near-identical tiny logits for every pair; widen the classifier so
    # that ranking and parity tests see scores that differ between documents.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("classifier") and name.endswith("weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-test-model",
        help="write a tiny random-weight cross-encoder with a trained tokenizer",
        description="Writes a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) "
        "of a small random-weight 1-label classifier, for tests and offline demos. Its scores carry no "
        "meaning as relevance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--arch", choices=["xlm-roberta", "bert"], default="xlm-roberta")
    p.add_argument("--hidden-size", type=int, default=64, help="hidden size; head size = hidden / heads must be 32-128 for the triton attention kernel")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        out = make_test_model(args.out, args.arch, hidden_size=args.hidden_size, layers=args.layers,
                              heads=args.heads, seed=args.seed)
        print(f"wrote a random-weight {args.arch} cross-encoder to {out}")
        return 0

    p.set_defaults(func=run)

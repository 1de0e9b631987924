"""Random-weight cross-encoders as Hugging Face model directories: the one builder of bench and tests.

Speed does not depend on weight values, so a model of a real `config.json` with random weights
runs exactly as fast as the real checkpoint; and a tiny one with a trained tokenizer lets every
test and offline demo run the whole pipeline without the Hugging Face Hub. Scores carry no
meaning as relevance.

One builder, in layers:
- `random_model(config)`: a transformers `AutoModelForSequenceClassification` (one label) of a
  config (a dict, a config.json file or a model directory) with transformers' own random init;
- `save_model_dir(out, model, tokenizer)`: config.json, model.safetensors and, given a tokenizer
  (a `tokenizers.Tokenizer` or a tokenizer.json file), tokenizer.json and tokenizer_config.json
  with the family's special tokens (BERT or XLM-R);
- `build_random_model(out, config, tokenizer)`: both, the vocabulary sized to the tokenizer;
- presets: `make_test_model` (tiny XLM-R/BERT with a tokenizer trained here, also
  `triton-rerank make-test-model`), `build_bench_model` (the serving benchmark's
  ms-marco-MiniLM-L-6-v2 shape with the bert-base-uncased tokenizer from ../shared/data).
The GPU check builds its bge-reranker-v2-m3 with `random_model` + `save_model_dir` too.

Decoder rerankers (Qwen3-Reranker: a `Qwen3ForCausalLM` scored by logit("yes") - logit("no")):
`random_decoder(config)`, `build_random_decoder(out, config, tokenizer)` (real shapes of
../shared/data/configs/Qwen3-Reranker-*.json) and `make_test_decoder(out)` (tiny, with the real
Qwen3 tokenizer of ../shared/data, also `triton-rerank make-test-model --arch qwen3`); they write
`save_model_dir`'s files with the Qwen3 tokenizer's tokenizer.json copied as is.

The directories are ordinary Hugging Face model directories: transformers, our loader and
Infinity (sentence-transformers' CrossEncoder) load them as they load a real checkpoint.
torch, transformers and tokenizers are imported inside the functions only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.families import ROBERTA_TYPES, max_input_length
from .workload import resolve_data_dir

ARCHES = ("xlm-roberta", "bert")

# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

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


def _family(model_type: str) -> str:
    """'xlm-roberta' for RoBERTa-style models (<s> q </s></s> d </s>), 'bert' for the others."""
    return "xlm-roberta" if model_type in ROBERTA_TYPES else "bert"


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


def load_tokenizer(tokenizer):
    """A private copy of a `tokenizers.Tokenizer`, or one read from a tokenizer.json (or its folder)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return Tokenizer.from_str(tokenizer.to_str())
    path = Path(tokenizer)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


def write_tokenizer(out: str | Path, tokenizer, config: dict, tokenizer_class: str | None = None) -> None:
    """tokenizer.json and tokenizer_config.json of `tokenizer` with the special tokens of the config's family.

    Padding and truncation are left to the reader (the server, transformers); the longest input
    (`model_max_length`) is what the position table covers. `tokenizer_class` overrides the class
    name transformers writes (transformers 5 writes its own, which older releases do not know).
    """
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    tokenizer = load_tokenizer(tokenizer)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    common = dict(tokenizer_object=tokenizer, model_max_length=max_input_length(config))
    if _family(config.get("model_type", "")) == "bert":
        fast = PreTrainedTokenizerFast(**common, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    else:
        fast = PreTrainedTokenizerFast(**common, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    fast.save_pretrained(out)
    if tokenizer_class:
        path = out / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": tokenizer_class}, indent=1))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def config_dict(config: dict | str | Path) -> dict[str, Any]:
    """A config.json as a dict: from a dict (copied), a config.json file, or a model directory."""
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        path = Path(config)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    if "model_type" not in cfg:
        raise ValueError("the config names no model_type (e.g. 'bert', 'xlm-roberta')")
    # sentence-transformers' keys are not transformers' business.
    return {k: v for k, v in cfg.items() if not k.startswith("sbert_")}


def hf_config(config: dict | str | Path):
    """The transformers config of a one-label sequence classifier (a cross-encoder) of `config`."""
    from transformers import AutoConfig

    cfg = config_dict(config)
    if len(cfg.get("id2label") or {}) != 1:
        cfg.pop("id2label", None)
        cfg.pop("label2id", None)
        cfg["num_labels"] = 1
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def random_model(config: dict | str | Path, *, seed: int = 0, device: str | None = None, dtype=None,
                 attn_implementation: str | None = None, classifier_std: float | None = None,
                 init: Callable[[Any], None] | None = None):
    """A random-weight `AutoModelForSequenceClassification` of `config`, in eval mode.

    Weights come from transformers' own init after `torch.manual_seed(seed)`, built directly on
    `device` (a 0.5 B model need not pass through host memory). `classifier_std` redraws the
    classification head's weights wider (default init gives near-identical logits for every
    pair); `init(model)` may redraw anything else.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    config = hf_config(config)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        if attn_implementation is None:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            try:
                model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)
            except TypeError:  # a transformers without the argument
                config._attn_implementation = attn_implementation
                model = AutoModelForSequenceClassification.from_config(config)
    model = model.eval()
    if classifier_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith("classifier") and name.endswith("weight"):
                    param.normal_(0.0, classifier_std)
    if init is not None:
        init(model)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def save_model_dir(out: str | Path, model, tokenizer=None, *, tokenizer_class: str | None = None) -> Path:
    """Writes `model` (config.json, model.safetensors) and, when given, its tokenizer files to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(out, safe_serialization=True)
    except TypeError:  # an argument transformers may drop (safetensors is its default)
        model.save_pretrained(out)
    if tokenizer is not None:
        write_tokenizer(out, tokenizer, model.config.to_dict(), tokenizer_class)
    return out


def build_random_model(out: str | Path, config: dict | str | Path, tokenizer=None, *, seed: int = 0,
                       classifier_std: float | None = None, tokenizer_class: str | None = None,
                       init: Callable[[Any], None] | None = None) -> Path:
    """Writes a random-weight model of `config` with `tokenizer` (a Tokenizer, a tokenizer.json, or None).

    With a tokenizer the embedding table gets exactly its vocabulary (a trained tiny tokenizer
    makes a small table; a real tokenizer matches its real config anyway).
    """
    cfg = config_dict(config)
    if tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer)
        cfg["vocab_size"] = tokenizer.get_vocab_size()
    model = random_model(cfg, seed=seed, classifier_std=classifier_std, init=init)
    return save_model_dir(out, model, tokenizer, tokenizer_class=tokenizer_class)


# --------------------------------------------------------------------------------------------
# Presets: the tiny test model, the serving benchmark's model
# --------------------------------------------------------------------------------------------


def tiny_config(arch: str = "xlm-roberta", *, hidden_size: int = 64, layers: int = 2, heads: int = 2) -> dict:
    """config.json of a small 1-label classifier of the arch (vocab_size is the trained tokenizer's)."""
    common = dict(vocab_size=600, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden_size, num_labels=1, hidden_act="gelu", initializer_range=0.2)
    if arch == "bert":
        return dict(model_type="bert", **common, max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
    if arch == "xlm-roberta":
        return dict(model_type="xlm-roberta", **common, max_position_embeddings=514, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")


def make_test_model(out: str | Path, arch: str = "xlm-roberta", *, hidden_size: int = 64, layers: int = 2,
                    heads: int = 2, seed: int = 0) -> Path:
    """Writes a tiny random-weight 1-label classifier of the arch and a tokenizer trained for it to `out`."""
    config = tiny_config(arch, hidden_size=hidden_size, layers=layers, heads=heads)
    # Default init gives near-identical tiny logits for every pair; a wider classifier makes
    # ranking and parity tests see scores that differ between documents.
    return build_random_model(out, config, train_tokenizer(arch, seed=seed), seed=seed, classifier_std=0.5)


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
    """Where the bench model's config and tokenizer come from: files of the data folder, or built in/generated."""
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
    """Writes (or reuses) the random-weight ms-marco-MiniLM-L-6-v2-shaped BERT cross-encoder in `out`.

    The real config.json (BERT, 6 layers, hidden 384, 12 heads) and the bert-base-uncased
    tokenizer.json come from the data folder when present; without them the same shape is built
    from the built-in config with a small trained WordPiece tokenizer: only the vocabulary
    (embedding table) differs, which does not change the encoder's cost. A marker file records
    the sources, so that an unchanged model is reused.
    """
    out = Path(out)
    sources = model_sources(resolve_data_dir(str(data_dir) if data_dir else None))
    marker = {"name": "ms-marco-MiniLM-L-6-v2-shape", "seed": seed, **sources}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        return out
    config = sources["config"] if Path(sources["config"]).is_file() else MINILM_L6_CONFIG
    tokenizer = sources["tokenizer"] if Path(sources["tokenizer"]).is_file() else train_tokenizer("bert", seed=seed)
    # transformers 5 writes its own tokenizer class name; older releases (Infinity's venv) need a known one.
    build_random_model(out, config, tokenizer, seed=seed, tokenizer_class="BertTokenizer")
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


# --------------------------------------------------------------------------------------------
# Decoder rerankers: random-weight Qwen3ForCausalLM directories with the Qwen3 tokenizer
# --------------------------------------------------------------------------------------------

QWEN3_TOKENIZER_FILE = "tokenizers/qwen3/tokenizer.json"
QWEN3_VOCAB_SIZE = 151669  # the Qwen3 tokenizer's 151,643 BPE tokens + 26 added tokens
QWEN3_RERANKER_CONFIG_FILES = {size: f"configs/Qwen3-Reranker-{size}.json" for size in ("0.6B", "4B", "8B")}
# What the Qwen3 releases' tokenizer_config.json says, less the chat template: "<|endoftext|>"
# pads, "<|im_end|>" ends a turn, no BOS. Left padding, as Qwen3-Reranker's recipe pads a batch
# and reads each prompt's next-token logits at position -1.
QWEN3_TOKENIZER_CONFIG: dict = {
    "tokenizer_class": "Qwen2TokenizerFast",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "add_bos_token": False,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "padding_side": "left",
}


def decoder_config(config: dict | str | Path):
    """The transformers config of a causal LM (Qwen3ForCausalLM for model_type qwen3) of `config`."""
    from transformers import AutoConfig

    cfg = config_dict(config)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def random_decoder(config: dict | str | Path, seed: int = 0, dtype=None, *, device: str | None = None,
                   attn_implementation: str | None = None, init: Callable[[Any], None] | None = None):
    """A random-weight `AutoModelForCausalLM` (Qwen3ForCausalLM) of `config`, in eval mode.

    Weights come from transformers' own init after `torch.manual_seed(seed)`, built directly on
    `device` in `dtype` (an 8 B model never exists in float32); `init(model)` may redraw anything.
    Init scale is the config's `initializer_range` (0.02 in the real configs: right for speed, but
    logit(yes) - logit(no) then hardly depends on the document; `make_test_decoder` uses 0.2).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = decoder_config(config)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if init is not None:
        init(model)
    return model.eval()


def write_decoder_tokenizer(out: str | Path, tokenizer_file: str | Path, config: dict) -> None:
    """The Qwen3 tokenizer.json (copied byte for byte) and a tokenizer_config.json transformers' AutoTokenizer loads."""
    import shutil

    out = Path(out)
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    tokenizer_config = {**QWEN3_TOKENIZER_CONFIG, "model_max_length": max_input_length(config)}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))


def build_random_decoder(out: str | Path, config_file: dict | str | Path, tokenizer_file: str | Path,
                         seed: int = 0, dtype=None, *, init: Callable[[Any], None] | None = None) -> Path:
    """Writes a random-weight decoder reranker of `config_file` (e.g. Qwen3-Reranker-0.6B.json) with its tokenizer.

    The config's vocabulary must hold the tokenizer's (151,669 for the real configs and tokenizer).
    `dtype` is the dtype it is built and saved in (the releases are bfloat16; None: float32).
    """
    from tokenizers import Tokenizer

    cfg = config_dict(config_file)
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    if vocab > cfg["vocab_size"]:
        raise ValueError(f"the tokenizer has {vocab} tokens, more than the config's vocab_size {cfg['vocab_size']}")
    model = random_decoder(cfg, seed, dtype, init=init)
    out = save_model_dir(out, model)
    write_decoder_tokenizer(out, tokenizer_file, model.config.to_dict())
    return out


def qwen3_tokenizer_file(data_dir: str | Path | None = None) -> Path:
    """The Qwen3 tokenizer.json of the shared data folder; FileNotFoundError where there is none."""
    data = resolve_data_dir(str(data_dir) if data_dir else None)
    file = data / QWEN3_TOKENIZER_FILE if data else None
    if file is None or not file.is_file():
        raise FileNotFoundError(f"no {QWEN3_TOKENIZER_FILE} in the data folder ({data or 'none found'}): the Qwen3 "
                                "tokenizer comes from ../shared/data")
    return file


def tiny_decoder_config(*, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                        head_dim: int = 32, tie_word_embeddings: bool = False) -> dict:
    """config.json of a small Qwen3ForCausalLM with the real Qwen3 vocabulary (so the real tokenizer fits)."""
    return dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=QWEN3_VOCAB_SIZE,
                hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=2 * hidden_size,
                max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                tie_word_embeddings=tie_word_embeddings, bos_token_id=151643, eos_token_id=151645,
                # Qwen3's 0.02 leaves attention near uniform and the last token (the same for every
                # prompt) dominating: logit(yes) - logit(no) would barely differ between documents.
                # 0.2 spreads a DL19-style request's scores over a few units.
                initializer_range=0.2)


def make_test_decoder(out: str | Path, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 32, seed: int = 0, tie_word_embeddings: bool = False,
                      data_dir: str | Path | None = None) -> Path:
    """Writes a tiny random-weight Qwen3 reranker with the real Qwen3 tokenizer (from the data folder) to `out`.

    head_dim 32 is the smallest the triton attention kernel accepts.
    """
    config = tiny_decoder_config(hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, tie_word_embeddings=tie_word_embeddings)
    return build_random_decoder(out, config, qwen3_tokenizer_file(data_dir), seed)


# --------------------------------------------------------------------------------------------
# `triton-rerank make-test-model`
# --------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-test-model",
        help="write a random-weight cross-encoder (tiny, or of a given config) with its tokenizer",
        description="Writes a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) "
        "of a random-weight 1-label classifier, for tests, benchmarks and offline demos: by default a small "
        "XLM-R or BERT with a tokenizer trained here; with --config the shape of a real config.json (with "
        "--tokenizer, its real tokenizer). With --arch qwen3 (or a qwen3 --config) a Qwen3ForCausalLM decoder "
        "reranker with the Qwen3 tokenizer of ../shared/data instead. Its scores carry no meaning as relevance.",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--arch", choices=(*ARCHES, "qwen3"), default="xlm-roberta",
                   help="family of the tiny model (default: %(default)s; qwen3: a decoder reranker with the Qwen3 "
                   "tokenizer of ../shared/data); with --config its model_type decides")
    p.add_argument("--config", default=None, help="a config.json (or a model directory) whose shape to build")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json to ship (the vocabulary sizes the embedding table); default: train a "
                   "small one for the family")
    p.add_argument("--hidden-size", type=int, default=None, help="hidden size (tiny default 64); head size = "
                   "hidden / heads must be 32-128 for the triton attention kernel")
    p.add_argument("--layers", type=int, default=None, help="layers (tiny default 2)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (tiny default 2; qwen3: 4, with half "
                   "as many key/value heads, of size 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the trained tokenizer "
                   "(default: %(default)s)")

    def run(args) -> int:
        decoder = (config_dict(args.config)["model_type"] if args.config else args.arch) == "qwen3"
        if decoder and args.config is None and args.tokenizer is None:
            heads = args.heads or 4
            out = make_test_decoder(args.out, hidden_size=args.hidden_size or 64, layers=args.layers or 2,
                                    heads=heads, kv_heads=heads // 2 if heads % 2 == 0 else heads, seed=args.seed)
            what = "qwen3 decoder reranker"
        elif decoder:
            config = config_dict(args.config) if args.config else tiny_decoder_config()
            for key, value in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                               ("num_attention_heads", args.heads)):
                if value is not None:
                    config[key] = value
            out = build_random_decoder(args.out, config, args.tokenizer or qwen3_tokenizer_file(), args.seed)
            what = f"qwen3 decoder reranker ({config['num_hidden_layers']} layers, hidden {config['hidden_size']})"
        elif args.config is None and args.tokenizer is None:
            out = make_test_model(args.out, args.arch, hidden_size=args.hidden_size or 64, layers=args.layers or 2,
                                  heads=args.heads or 2, seed=args.seed)
            what = f"{args.arch} cross-encoder"
        else:
            config = config_dict(args.config) if args.config else tiny_config(
                args.arch, hidden_size=args.hidden_size or 64, layers=args.layers or 2, heads=args.heads or 2)
            if args.config:
                for key, value in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                                   ("num_attention_heads", args.heads)):
                    if value is not None:
                        config[key] = value
                if args.hidden_size is not None:
                    config["intermediate_size"] = 4 * args.hidden_size
            tokenizer = args.tokenizer or train_tokenizer(_family(config["model_type"]), seed=args.seed)
            out = build_random_model(args.out, config, tokenizer, seed=args.seed, classifier_std=0.5)
            what = f"{config['model_type']} cross-encoder ({config.get('num_hidden_layers')} layers, hidden " \
                   f"{config.get('hidden_size')})"
        print(f"wrote a random-weight {what} to {out}")
        return 0

    p.set_defaults(func=run)

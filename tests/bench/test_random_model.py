"""CPU tests of the one random-model builder: configs and tokenizers in, loadable model directories out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from triton_rerank.bench import random_model as rm

SMALL_XLMR = {"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 130, "pad_token_id": 1,
              "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1, "id2label": {"0": "LABEL_0"},
              "architectures": ["XLMRobertaForSequenceClassification"], "sbert_ce_default_activation_function": "x"}


def test_config_file_and_tokenizer_file_make_a_loadable_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from triton_rerank.models.cross_encoder import load_cross_encoder
    from triton_rerank.serving.tokenization import PairTokenizer

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(SMALL_XLMR))
    tokenizer_file = tmp_path / "tokenizer.json"
    trained = rm.train_tokenizer("xlm-roberta")
    trained.save(str(tokenizer_file))
    out = rm.build_random_model(tmp_path / "model", config_file, tokenizer_file, seed=1)

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == trained.get_vocab_size() < 1000  # the table fits the tokenizer
    assert config["architectures"] == ["XLMRobertaForSequenceClassification"] and len(config["id2label"]) == 1
    assert not any(k.startswith("sbert_") for k in config)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 128  # 130 - (1 + 1)

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer("what is a panda", "a giant bear eats bamboo", return_tensors="pt")
    packed = PairTokenizer(out).encode("what is a panda", ["a giant bear eats bamboo"])
    assert encoded["input_ids"][0].tolist() == packed.input_ids.tolist()
    ours = load_cross_encoder(str(out), dtype=torch.float32, device="cpu", attention_backend="sdpa")
    ids = torch.as_tensor(packed.input_ids, dtype=torch.long)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.inference_mode():
        expected = hf(**encoded).logits[0, 0]
        got = ours(ids, cu, len(ids)).reshape(-1)[0]
    assert float(got) == pytest.approx(float(expected), abs=1e-4)


def test_weights_follow_the_seed_and_the_hooks():
    cfg = dict(SMALL_XLMR, vocab_size=50)
    a, b = rm.random_model(cfg, seed=3), rm.random_model(cfg, seed=3)
    c = rm.random_model(cfg, seed=4)
    key = "roberta.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key]) and not torch.equal(a.state_dict()[key],
                                                                                       c.state_dict()[key])
    assert a.config.num_labels == 1 and not a.training
    wide = rm.random_model(cfg, seed=3, classifier_std=0.5)
    assert wide.classifier.out_proj.weight.std() > 5 * a.classifier.out_proj.weight.std()
    seen = []
    half = rm.random_model(cfg, init=seen.append, dtype=torch.float16)
    assert seen == [half] and half.classifier.out_proj.weight.dtype == torch.float16
    two_labels = dict(cfg, id2label={"0": "a", "1": "b"}, label2id={"a": 0, "b": 1})
    assert rm.random_model(two_labels).config.num_labels == 1  # a cross-encoder has one logit
    with pytest.raises(ValueError, match="model_type"):
        rm.config_dict({"hidden_size": 8})


def test_model_without_tokenizer(tmp_path):
    """What the GPU check does: a model object to time, and its directory for our loader."""
    model = rm.random_model(dict(SMALL_XLMR, vocab_size=64), attn_implementation="sdpa")
    out = rm.save_model_dir(tmp_path / "m", model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["classifier.out_proj.weight"], model.classifier.out_proj.weight)


@pytest.mark.parametrize("arch", rm.ARCHES)
def test_tiny_models_of_the_fixture(tiny_model_dirs, arch):
    from tokenizers import Tokenizer

    config = json.loads((tiny_model_dirs[arch] / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_model_dirs[arch] / "tokenizer.json"))
    assert config["model_type"] == arch and config["vocab_size"] == tokenizer.get_vocab_size() < 1000
    assert (config["hidden_size"], config["num_hidden_layers"], config["initializer_range"]) == (64, 2, 0.2)


def test_make_test_model_command(tmp_path, capsys):
    from triton_rerank import cli

    config_file = tmp_path / "bge-like.json"
    config_file.write_text(json.dumps(SMALL_XLMR))
    assert cli.main(["make-test-model", str(tmp_path / "m"), "--config", str(config_file), "--layers", "2"]) == 0
    assert "xlm-roberta cross-encoder (2 layers, hidden 64)" in capsys.readouterr().out
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["max_position_embeddings"] == 130
    assert config["vocab_size"] < 1000  # a tokenizer trained for it
    assert cli.main(["make-test-model", str(tmp_path / "b"), "--arch", "bert", "--hidden-size", "96",
                     "--heads", "3"]) == 0
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["intermediate_size"]) == ("bert", 96, 384)

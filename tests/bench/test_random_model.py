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


# --------------------------------------------------------------------------------------------
# Decoder rerankers (Qwen3)
# --------------------------------------------------------------------------------------------

SMALL_QWEN3 = {"model_type": "qwen3", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96,
               "max_position_embeddings": 256, "rope_theta": 1000000.0, "tie_word_embeddings": False}


def _qwen3_tokenizer_file():
    try:
        return rm.qwen3_tokenizer_file()
    except FileNotFoundError:
        pytest.skip("the shared data folder with the Qwen3 tokenizer is not here")


def test_random_decoder_follows_the_seed_the_dtype_and_the_hook():
    a, b, c = rm.random_decoder(SMALL_QWEN3, 3), rm.random_decoder(SMALL_QWEN3, seed=3), rm.random_decoder(SMALL_QWEN3, 4)
    assert type(a).__name__ == "Qwen3ForCausalLM" and not a.training
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    assert a.config.rope_parameters["rope_theta"] == 1e6 and a.config.num_key_value_heads == 2
    seen = []
    half = rm.random_decoder(SMALL_QWEN3, dtype=torch.bfloat16, init=seen.append)
    assert seen == [half] and half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_build_random_decoder_of_a_real_config(tmp_path):
    from triton_rerank.models.qwen3_reranker import load_qwen3_reranker

    tokenizer_file = _qwen3_tokenizer_file()
    real = json.loads((rm.resolve_data_dir(None) / rm.QWEN3_RERANKER_CONFIG_FILES["0.6B"]).read_text())
    # The real config with a small width and depth: its vocabulary, RoPE and tying stay.
    config = {**real, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "intermediate_size": 96}
    out = rm.build_random_decoder(tmp_path / "m", config, tokenizer_file, seed=1, dtype=torch.bfloat16)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3ForCausalLM"] and saved["vocab_size"] == 151669
    assert saved["tie_word_embeddings"] is True and saved["max_position_embeddings"] == 40960
    state = load_file(out / "model.safetensors")
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16 and "lm_head.weight" not in state
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    model = load_qwen3_reranker(out)
    assert model.label_token_ids == (9693, 2152) and model.config.rope_theta == 1e6
    with pytest.raises(ValueError, match="more than the config's vocab_size 300"):
        rm.build_random_decoder(tmp_path / "small", SMALL_QWEN3, tokenizer_file)


@pytest.mark.parametrize("tied", [False, True])
def test_make_test_decoder(tmp_path, tied):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from triton_rerank.models.qwen3_reranker import load_qwen3_reranker

    _qwen3_tokenizer_file()
    out = rm.make_test_decoder(tmp_path / "m", tie_word_embeddings=tied)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["vocab_size"]) == ("qwen3", ["Qwen3ForCausalLM"],
                                                                                      151669)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 32)
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tied

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.pad_token, tokenizer.padding_side, tokenizer.model_max_length) == ("<|endoftext|>", "left", 2048)
    prompt = "<|im_start|>user\n<Query>: what is a panda?\n<Document>: 熊猫 eats bamboo<|im_end|>\n"
    assert tokenizer(prompt)["input_ids"] == Tokenizer.from_file(str(out / "tokenizer.json")).encode(prompt).ids

    # Scores differ between documents: the init is wide enough for the context to matter.
    model = load_qwen3_reranker(out)
    reference = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = [torch.tensor(reference.encode(prompt + doc + "\n").ids) for doc in ("hi", "a giant bear", "python code")]
    cu = torch.tensor([0, *torch.tensor([len(x) for x in ids]).cumsum(0).tolist()], dtype=torch.int32)
    with torch.inference_mode():
        scores = model(torch.cat(ids), cu, int(cu.diff().max()))
    assert float(scores.max() - scores.min()) > 0.1


def test_make_test_model_command_qwen3(tmp_path, capsys):
    from triton_rerank import cli

    _qwen3_tokenizer_file()
    assert cli.main(["make-test-model", str(tmp_path / "q"), "--arch", "qwen3", "--layers", "1"]) == 0
    assert "qwen3 decoder reranker" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (1, 2)
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()

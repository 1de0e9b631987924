"""One rule for how long a pair may be, shared by the tokenizer step and the encoder."""

import json

import pytest

from triton_rerank.bench.workload import resolve_data_dir
from triton_rerank.models.cross_encoder import EncoderConfig
from triton_rerank.models.families import max_input_length, reranker_kind

# The fields that matter, as in the real config.json files.
CONFIGS = {
    "BAAI/bge-reranker-v2-m3": ({"model_type": "xlm-roberta", "max_position_embeddings": 8194, "pad_token_id": 1}, 8192),
    "cross-encoder/ms-marco-MiniLM-L-6-v2": ({"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0}, 512),
    "camembert-base": ({"model_type": "camembert", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    "roberta-base": ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tokenizer_and_encoder_agree_on_the_longest_pair(name):
    config, expected = CONFIGS[name]
    assert max_input_length(config) == expected
    encoder = EncoderConfig.from_hf_dict({**config, "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "intermediate_size": 64, "num_labels": 1})
    assert encoder.max_seqlen == expected


def test_missing_pad_token_id_takes_the_family_default():
    assert max_input_length({"model_type": "xlm-roberta", "max_position_embeddings": 514}) == 512
    assert max_input_length({"model_type": "bert", "max_position_embeddings": 512}) == 512


DATA = resolve_data_dir(None)


@pytest.mark.parametrize(("config", "kind"), [
    ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, "decoder"),
    ({"model_type": "qwen3"}, "decoder"),
    ({"model_type": "xlm-roberta", "architectures": ["XLMRobertaForSequenceClassification"]}, "cross-encoder"),
    ({"model_type": "bert"}, "cross-encoder"),
])
def test_reranker_kind_is_read_from_config(config, kind):
    assert reranker_kind(config) == kind


@pytest.mark.parametrize("name", ["Qwen3-Reranker-0.6B", "Qwen3-Reranker-4B", "Qwen3-Reranker-8B", "bge-reranker-v2-m3",
                                  "ms-marco-MiniLM-L-6-v2"])
def test_real_configs_are_placed(name):
    if DATA is None or not (DATA / "configs" / f"{name}.json").is_file():
        pytest.skip("the shared data folder's model configs are not present")
    path = DATA / "configs" / f"{name}.json"
    expected = "decoder" if name.startswith("Qwen3") else "cross-encoder"
    assert reranker_kind(json.loads(path.read_text())) == expected


@pytest.mark.parametrize(("config", "forced", "message"), [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "auto", "--reranker-kind"),
    # A Qwen3 converted to a sequence classifier is neither of the families this server runs.
    ({"model_type": "qwen3", "architectures": ["Qwen3ForSequenceClassification"]}, "auto", "cannot tell"),
    ({"model_type": "bert"}, "decoder", "not a decoder"),
    ({"model_type": "qwen3"}, "cross-encoder", "not a cross-encoder"),
    ({"model_type": "qwen3"}, "lm", "reranker kind must be"),
])
def test_reranker_kind_refusals_say_why(config, forced, message):
    with pytest.raises(ValueError, match=message):
        reranker_kind(config, forced)


def test_forced_kind_wins_where_detection_cannot_tell():
    assert reranker_kind({"model_type": "qwen3", "architectures": ["Qwen3ForSequenceClassification"]},
                         "decoder") == "decoder"

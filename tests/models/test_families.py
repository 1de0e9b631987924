"""One rule for how long a pair may be, shared by the tokenizer step and the encoder."""

import pytest

from triton_rerank.models.cross_encoder import EncoderConfig
from triton_rerank.models.families import max_input_length

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

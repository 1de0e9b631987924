"""PackedCrossEncoder vs transformers on tiny random XLM-R, CamemBERT and BERT cross-encoders (CPU, fast).

The triton backend runs under TRITON_INTERPRET on CPU, so its cases are kept tiny.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from triton_rerank.models.cross_encoder import EncoderConfig, PackedCrossEncoder, load_cross_encoder
from triton_rerank.models.int8_linear import Int8Linear, int8_instructions

# tests/conftest.py does this too; repeated so this file also runs on its own. It must happen
# before triton is first imported: the encoder imports the kernels lazily, but transformers'
# model classes import triton too, so this file imports transformers only inside functions.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The triton backend runs compiled on a GPU and interpreted on CPU; sdpa is checked on CPU.
GPU = torch.cuda.is_available()


def _device(backend: str) -> str:
    return "cuda" if GPU and backend == "triton" else "cpu"


VOCAB = 300
# hidden 64 / 2 heads: head_dim 32 is the smallest varlen_attention accepts.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    num_labels=1,
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # HF's init (std 0.02, LayerNorm 1/0) gives near-constant logits; make every tensor matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# Per kind: the fields the tiny config adds to TINY (special-token ids as in the real models).
KINDS = {
    "xlmr": {"model_type": "xlm-roberta", "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
             "max_position_embeddings": 66, "type_vocab_size": 1},
    "camembert": {"model_type": "camembert", "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
                  "max_position_embeddings": 66, "type_vocab_size": 1},
    "bert": {"model_type": "bert", "pad_token_id": 0, "max_position_embeddings": 64},
}


def _save_tiny(kind: str, path, seed: int = 0):
    from triton_rerank.bench.random_model import build_random_model

    return build_random_model(path, {**TINY, **KINDS[kind]}, init=lambda m: _randomize(m, seed))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {kind: _save_tiny(kind, tmp_path_factory.mktemp(kind)) for kind in ("xlmr", "camembert", "bert")}


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    from transformers import AutoModelForSequenceClassification

    return {
        kind: AutoModelForSequenceClassification.from_pretrained(d, attn_implementation="eager").eval()
        for kind, d in model_dirs.items()
    }


def _random_pairs(kind: str, lengths: list[int], seed: int):
    """Per sequence: token ids (no special / pad ids) and, for BERT, 0/1 segment ids."""
    g = torch.Generator().manual_seed(seed)
    low = 1 if kind == "bert" else 3  # XLM-R / CamemBERT: 0 <s>, 1 <pad>, 2 </s>; BERT: 0 [PAD]
    ids = [torch.randint(low, VOCAB, (n,), generator=g) for n in lengths]
    types = []
    for n in lengths:
        split = int(torch.randint(1, n + 1, (1,), generator=g))
        types.append(
            torch.cat([torch.zeros(split, dtype=torch.long), torch.ones(n - split, dtype=torch.long)])
        )
    return ids, (types if kind == "bert" else None)


def _packed_logits(model: PackedCrossEncoder, ids, types) -> torch.Tensor:
    lengths = torch.tensor([len(x) for x in ids])
    cu = torch.zeros(len(ids) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(torch.cat(ids).to(device), cu.to(device), int(lengths.max()),
                    None if types is None else torch.cat(types).to(device))
    return out.cpu()


def _padded(ids, types, pad_id: int):
    """Right-padded [B, L] ids, mask and (None without types) token types."""
    L = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), L), pad_id)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    token_types = torch.zeros(len(ids), L, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], mask[i, : len(x)] = x, 1
        if types is not None:
            token_types[i, : len(x)] = types[i]
    return input_ids, mask, (None if types is None else token_types)


def _hf_logits(hf, pad_id: int, ids, types) -> torch.Tensor:
    input_ids, mask, token_types = _padded(ids, types, pad_id)
    with torch.inference_mode():
        return hf(input_ids=input_ids, attention_mask=mask, token_type_ids=token_types).logits[:, 0]


@pytest.mark.parametrize("kind", ["xlmr", "camembert", "bert"])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_parity_with_transformers(kind, backend, model_dirs, hf_models):
    if backend == "sdpa":
        lengths = torch.randint(2, 61, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    else:  # interpreter: keep it tiny
        lengths = [37, 5, 18, 2]
    ids, types = _random_pairs(kind, lengths, seed=2)
    model = load_cross_encoder(model_dirs[kind], attention_backend=backend, device=_device(backend))
    got = _packed_logits(model, ids, types)
    want = _hf_logits(hf_models[kind], hf_models[kind].config.pad_token_id, ids, types)
    assert got.dtype == torch.float32 and got.shape == (len(lengths),)
    assert want.abs().max() > 0.1  # the test would be vacuous with near-zero logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["xlmr", "camembert", "bert"])
@pytest.mark.parametrize("lengths", [[64, 3, 17], [1, 1], [5]])  # the longest a position table holds; lone tokens
def test_padded_forward_equals_transformers(kind, lengths, model_dirs, hf_models):
    """The padded forward (what the OpenVINO engine traces) on right-padded batches, last layer cut to
    the first tokens, against transformers on the same batches."""
    model = load_cross_encoder(model_dirs[kind])
    ids, types = _random_pairs(kind, lengths, seed=7)
    pad_id = hf_models[kind].config.pad_token_id
    with torch.inference_mode():
        got = model.forward_padded(*_padded(ids, types, pad_id))
    want = _hf_logits(hf_models[kind], pad_id, ids, types)
    assert got.dtype == torch.float32 and got.shape == (len(lengths),)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, _packed_logits(model, ids, types), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [0, 1])
def test_padded_forward_with_no_layer_or_only_the_last(layers):
    """With one layer it is the last (cut to the first tokens) from the start; with none the embeddings feed the head."""
    cfg = EncoderConfig("bert", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    torch.manual_seed(0)
    model = PackedCrossEncoder(cfg).eval()
    ids, types = _random_pairs("bert", [9, 2, 30], seed=8)
    with torch.inference_mode():
        got = model.forward_padded(*_padded(ids, types, 0))
    expected = _packed_logits(model, ids, types)
    assert expected.std() > 1e-3  # pairs score apart
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_null_pad_token_id_is_the_familys():
    common = dict(vocab_size=10, hidden_size=8, num_hidden_layers=0, num_attention_heads=2, intermediate_size=8,
                  max_position_embeddings=20, num_labels=1)
    assert EncoderConfig.from_hf_dict({"model_type": "bert", "pad_token_id": None, **common}).pad_token_id == 0
    assert EncoderConfig.from_hf_dict({"model_type": "xlm-roberta", "pad_token_id": None, **common}).pad_token_id == 1


@pytest.mark.parametrize(("backend", "n_pairs", "max_len"), [("sdpa", 64, 60), ("triton", 6, 40)])
@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_batch_invariance(kind, backend, n_pairs, max_len, model_dirs):
    model = load_cross_encoder(model_dirs[kind], attention_backend=backend, device=_device(backend))
    lengths = torch.randint(2, max_len + 1, (n_pairs,), generator=torch.Generator().manual_seed(3)).tolist()
    ids, types = _random_pairs(kind, lengths, seed=4)
    packed = _packed_logits(model, ids, types)
    alone = torch.cat(
        [_packed_logits(model, [ids[i]], None if types is None else [types[i]]) for i in range(n_pairs)]
    )
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_position_ids_per_sequence():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    common = dict(
        vocab_size=10,
        hidden_size=8,
        num_hidden_layers=0,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=20,
        layer_norm_eps=1e-5,
    )
    with torch.device("meta"):  # positions depend on the config only; no weights needed
        xlmr = PackedCrossEncoder(EncoderConfig("xlm-roberta", type_vocab_size=1, pad_token_id=1, **common))
        xlmr_pad5 = PackedCrossEncoder(EncoderConfig("roberta", type_vocab_size=1, pad_token_id=5, **common))
        bert = PackedCrossEncoder(EncoderConfig("bert", type_vocab_size=2, pad_token_id=0, **common))
    # XLM-R / RoBERTa count from pad_token_id + 1, like HF's create_position_ids_from_input_ids.
    assert xlmr.position_ids(cu, 9).tolist() == [2, 3, 4, 2, 3, 2, 3, 4, 5]
    assert xlmr_pad5.position_ids(cu, 9).tolist() == [6, 7, 8, 6, 7, 6, 7, 8, 9]
    assert bert.position_ids(cu, 9).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert xlmr.config.max_seqlen == 18 and bert.config.max_seqlen == 20


def test_xlmr_longest_sequence_uses_last_position(model_dirs, hf_models):
    # max_position_embeddings 66 with pad 1: a 64-token sequence uses positions 2..65, the last row.
    model = load_cross_encoder(model_dirs["xlmr"])
    ids, _ = _random_pairs("xlmr", [64, 3], seed=5)
    torch.testing.assert_close(
        _packed_logits(model, ids, None), _hf_logits(hf_models["xlmr"], 1, ids, None), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="max_seqlen 65 exceeds"):
        model(torch.ones(65, dtype=torch.long), torch.tensor([0, 65], dtype=torch.int32), 65)


def test_bert_token_type_ids_default_to_zero(model_dirs):
    model = load_cross_encoder(model_dirs["bert"])
    ids, _ = _random_pairs("bert", [9, 4], seed=6)
    zeros = [torch.zeros_like(x) for x in ids]
    assert torch.equal(_packed_logits(model, ids, None), _packed_logits(model, ids, zeros))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(model_dirs, tmp_path):
    d = _copy(model_dirs["xlmr"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["roberta.encoder.layer.1.attention.self.key.bias"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing .*roberta\.encoder\.layer\.1\.attention\.self\.key\.bias"):
        load_cross_encoder(d)


def test_unexpected_tensor_is_named(model_dirs, tmp_path):
    d = _copy(model_dirs["bert"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    save_file(state, d / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"unexpected .*bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight"
    ):
        load_cross_encoder(d)


def test_shape_mismatch_is_named(model_dirs, tmp_path):
    d = _copy(model_dirs["xlmr"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["classifier.out_proj.weight"] = torch.zeros(2, 64)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"classifier\.out_proj\.weight.*shape"):
        load_cross_encoder(d)


def test_harmless_buffers_are_ignored(model_dirs, tmp_path):
    d = _copy(model_dirs["xlmr"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    state["roberta.embeddings.position_ids"] = torch.arange(66)[None]
    state["roberta.embeddings.token_type_ids"] = torch.zeros(1, 66, dtype=torch.long)
    state["roberta.pooler.dense.weight"] = torch.zeros(64, 64)
    save_file(state, d / "model.safetensors")
    ids, _ = _random_pairs("xlmr", [7, 3], seed=7)
    assert torch.equal(
        _packed_logits(load_cross_encoder(d), ids, None),
        _packed_logits(load_cross_encoder(model_dirs["xlmr"]), ids, None),
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"id2label": {"0": "NO", "1": "YES"}, "label2id": {"NO": 0, "YES": 1}}, "num_labels=2"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"model_type": "deberta-v2"}, "model_type 'deberta-v2'"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
)
def test_bad_config_is_rejected(change, match, model_dirs, tmp_path):
    d = _copy(model_dirs["xlmr"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=match):
        load_cross_encoder(d)


def test_pytorch_model_bin_with_legacy_names(model_dirs, tmp_path):
    # Old BERT checkpoints: pytorch_model.bin, LayerNorm gamma/beta, a saved position_ids buffer.
    d = _copy(model_dirs["bert"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    legacy["bert.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(legacy, d / "pytorch_model.bin")
    ids, types = _random_pairs("bert", [11, 6, 2], seed=8)
    assert torch.equal(
        _packed_logits(load_cross_encoder(d), ids, types),
        _packed_logits(load_cross_encoder(model_dirs["bert"]), ids, types),
    )


def test_sharded_safetensors(model_dirs, tmp_path):
    d = _copy(model_dirs["xlmr"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, d / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids, _ = _random_pairs("xlmr", [10, 4], seed=9)
    assert torch.equal(
        _packed_logits(load_cross_encoder(d), ids, None),
        _packed_logits(load_cross_encoder(model_dirs["xlmr"]), ids, None),
    )


def test_loaded_model_state(model_dirs):
    model = load_cross_encoder(model_dirs["xlmr"])
    assert model.attention_backend == "sdpa"  # default off CUDA
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.layers[0].qkv.weight.shape == (3 * 64, 64)  # query, key, value fused at load time
    with pytest.raises(ValueError, match="attention_backend"):
        model.attention_backend = "hf"
    with pytest.raises(ValueError, match="attention_backend"):
        load_cross_encoder(model_dirs["xlmr"], attention_backend="hf")


def test_qkv_fusion_order(model_dirs):
    model = load_cross_encoder(model_dirs["bert"])
    state = load_file(model_dirs["bert"] / "model.safetensors")
    qkv = model.layers[1].qkv.weight
    for i, name in enumerate(("query", "key", "value")):
        assert torch.equal(
            qkv[i * 64 : (i + 1) * 64], state[f"bert.encoder.layer.1.attention.self.{name}.weight"]
        )


@pytest.mark.parametrize(
    "backend", ["sdpa", pytest.param("triton", marks=pytest.mark.skipif(not GPU, reason="half precision kernels on GPU"))]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, backend, model_dirs):
    ids, _ = _random_pairs("xlmr", [30, 12, 3], seed=10)
    model = load_cross_encoder(model_dirs["xlmr"], dtype=dtype, attention_backend=backend, device=_device(backend))
    assert model.layers[0].qkv.weight.dtype == dtype
    got = _packed_logits(model, ids, None)
    assert got.dtype == torch.float32
    want = _packed_logits(load_cross_encoder(model_dirs["xlmr"]), ids, None)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize(
    ("cu", "max_seqlen", "match"),
    [
        ([1, 4, 6], 5, "from 0 to total_tokens"),
        ([0, 4, 5], 5, "from 0 to total_tokens"),
        ([0, 4, 4, 6], 5, "at least one token"),
        ([0, 5, 6], 4, "smaller than the longest"),
    ],
)
def test_inconsistent_cu_seqlens_is_refused_on_the_host(backend, cu, max_seqlen, match, model_dirs):
    # Checked once per forward on the host copy, before anything is launched, for both backends.
    model = load_cross_encoder(model_dirs["xlmr"], attention_backend=backend, device=_device(backend))
    device = next(model.parameters()).device
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        model(torch.full((6,), 5, device=device), torch.tensor(cu, dtype=torch.int32), max_seqlen)


int8_cpu = pytest.mark.skipif(not int8_instructions(), reason="this CPU has no int8 dot-product instructions")


@int8_cpu
@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_scores_follow_float32(kind, dtype, model_dirs):
    ids, types = _random_pairs(kind, [30, 12, 3, 57, 1], seed=11)
    model = load_cross_encoder(model_dirs[kind], dtype=dtype, quantize="int8")
    assert all(isinstance(getattr(layer, name), Int8Linear) for layer in model.layers
               for name in ("qkv", "attn_out", "ffn_in", "ffn_out"))
    assert model.embeddings.word_embeddings.weight.dtype == dtype and model.head.dense.weight.dtype == torch.float32
    got = _packed_logits(model, ids, types)
    want = _packed_logits(load_cross_encoder(model_dirs[kind]), ids, types)
    assert got.dtype == torch.float32
    # As loose as half precision's bound: int8 rounds activations to 127 steps per token.
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    assert not torch.equal(got, want)  # quantized for real


@int8_cpu
def test_int8_compiles_at_load_never_on_a_request(model_dirs):
    import torch._dynamo
    from torch._dynamo.utils import counters

    # (Graphs compiled by earlier tests in this process may serve this model too: same code, same shapes.)
    model = load_cross_encoder(model_dirs["bert"], dtype=torch.bfloat16, quantize="int8")
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    # Token counts and batch sizes the warm-up did not run, one sequence of one token included.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([1], [7], [40, 2, 9], [64] * 5):
            ids, types = _random_pairs("bert", lengths, seed=len(lengths))
            assert _packed_logits(model, ids, types).shape == (len(lengths),)
    assert counters["stats"]["unique_graphs"] == compiled


@int8_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_keep_the_activation_dtype(dtype, model_dirs):
    # The int8 linears keep their bias in float32; no layer may hand float32 on to the next (and its attention).
    from triton_rerank.models.cross_encoder import _TorchOps

    model = load_cross_encoder(model_dirs["bert"], dtype=dtype, quantize="int8")
    x = torch.randn(7, model.config.hidden_size).to(dtype)
    ops = _TorchOps()
    with torch.inference_mode():
        for layer in model.layers:
            qkv = layer.project(x)
            assert qkv.dtype == dtype
            x = layer.finish(qkv[:, : x.shape[1]], x, ops)
            assert x.dtype == dtype


def test_quantize_names_are_checked(model_dirs):
    with pytest.raises(ValueError, match="quantize must be one of none, int8, got 'int4'"):
        load_cross_encoder(model_dirs["bert"], quantize="int4")


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_compiled_layers_keep_parity_with_transformers(kind, model_dirs, hf_models):
    from torch._dynamo.eval_frame import OptimizedModule

    ids, types = _random_pairs(kind, [30, 12, 3, 57, 1], seed=12)
    model = load_cross_encoder(model_dirs[kind], compile=True)
    assert not isinstance(model.layers[0], OptimizedModule)  # the layer's blocks are compiled, not the layer
    assert getattr(model.layers[0].finish, "_torchdynamo_orig_callable", None) is not None
    pad = json.loads((model_dirs[kind] / "config.json").read_text())["pad_token_id"]
    got = _packed_logits(model, ids, types)
    torch.testing.assert_close(got, _hf_logits(hf_models[kind], pad, ids, types), atol=1e-4, rtol=0)

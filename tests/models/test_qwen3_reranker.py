"""PackedQwen3Reranker vs transformers' Qwen3ForCausalLM on tiny random decoders (CPU, fast).

The score is logit("yes") - logit("no") at each sequence's last token. Model-only tests use a
small vocabulary with label ids inside it; the tests with the real Qwen3 tokenizer need the
shared data folder and skip without it. The triton backend runs under TRITON_INTERPRET on CPU,
so its cases are kept tiny.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from triton_rerank.models.qwen3_reranker import (
    DecoderConfig,
    PackedQwen3Reranker,
    label_token_ids,
    load_qwen3_reranker,
)

# tests/conftest.py does this too; repeated so this file also runs on its own. It must happen
# before triton is first imported: the decoder imports the kernels lazily, but transformers'
# model classes import triton too, so this file imports transformers only inside functions.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The triton backend runs compiled on a GPU and interpreted on CPU; sdpa is checked on CPU.
GPU = torch.cuda.is_available()

VOCAB = 300
YES, NO = 201, 37  # label token ids of the tiny vocabulary
LABELS = (YES, NO)
LENGTHS = [1, 2, 7, 33, 100]

# heads * head_dim (128) differs from hidden_size (64), as in Qwen3 (0.6B: 16 * 128 vs 1024).
TINY = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=32,
            intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
            initializer_range=0.2)
# Per kind: attention heads, key/value heads, tied embeddings.
KINDS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "mha": dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
}


def _device(backend: str) -> str:
    return "cuda" if GPU and backend == "triton" else "cpu"


def _triton_kernels_missing() -> str | None:
    """Why the triton backend cannot run yet (kernels it calls that the package lacks), or None."""
    from triton_rerank import kernels

    missing = [name for name in ("rms_norm", "silu_mul") if not hasattr(kernels, name)]
    if "causal" not in inspect.signature(kernels.varlen_attention).parameters:
        missing.append("varlen_attention(causal=...)")
    return f"the kernels package has no {', '.join(missing)}" if missing else None


def _skip_without_kernels(backend: str) -> None:
    if backend == "triton" and (why := _triton_kernels_missing()):
        pytest.skip(why)


def _randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    # HF initializes every RMSNorm weight to 1; random weights make a wrong norm or fusion order show.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _save_tiny(kind: str, path):
    """(directory, the transformers model (eager attention, fp32) it holds)."""
    from triton_rerank.bench.random_model import random_decoder, save_model_dir

    hf = random_decoder({**TINY, **KINDS[kind]}, seed=0, attn_implementation="eager", init=_randomize_norms)
    return save_model_dir(path, hf), hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kind: (model directory, transformers model)}."""
    return {kind: _save_tiny(kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}


def _random_ids(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _pack(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens back to back [T], cu_seqlens int32 [B + 1] on the CPU, longest length)."""
    lengths = torch.tensor([len(x) for x in ids])
    cu = torch.zeros(len(ids) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return torch.cat(ids), cu, int(lengths.max())


def _scores(model: PackedQwen3Reranker, ids: list[torch.Tensor]) -> torch.Tensor:
    tokens, cu, longest = _pack(ids)
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(tokens.to(device), cu, longest).cpu()


def _hf_scores(hf, ids: list[torch.Tensor], labels=LABELS) -> torch.Tensor:
    """logit(yes) - logit(no) at each sequence's last token, from one right-padded transformers batch."""
    L = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], mask[i, : len(x)] = x, 1
    last = torch.tensor([len(x) - 1 for x in ids])
    with torch.inference_mode():
        logits = hf(input_ids=input_ids, attention_mask=mask).logits[torch.arange(len(ids)), last].float()
    return logits[:, labels[0]] - logits[:, labels[1]]


def _load(d, backend: str = "sdpa", **kwargs) -> PackedQwen3Reranker:
    return load_qwen3_reranker(d, label_token_ids=LABELS, attention_backend=backend, device=_device(backend),
                               **kwargs)


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------


# Interpreted triton: GQA untied and MQA tied (multi-head attention is GQA's one-group case).
@pytest.mark.parametrize(("kind", "backend"), [(kind, "sdpa") for kind in KINDS] + [("gqa", "triton"), ("mqa", "triton")])
def test_parity_with_transformers(kind, backend, tiny):
    _skip_without_kernels(backend)
    d, hf = tiny[kind]
    ids = _random_ids(LENGTHS, seed=1)
    got = _scores(_load(d, backend), ids)
    want = _hf_scores(hf, ids)
    assert got.dtype == torch.float32 and got.shape == (len(LENGTHS),)
    assert want.std() > 0.3  # the test would be vacuous if every sequence scored alike
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "backend", ["sdpa", pytest.param("triton", marks=pytest.mark.skipif(not GPU, reason="half precision kernels on GPU"))]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_twice_transformers(dtype, backend, tiny):
    """Ours in half precision is no further from the fp32 reference than twice transformers in that dtype."""
    _skip_without_kernels(backend)
    d, hf = tiny["gqa"]
    ids = _random_ids(LENGTHS + [60, 17], seed=2)
    reference = _hf_scores(hf, ids)
    hf_error = (_hf_scores(copy.deepcopy(hf).to(dtype), ids) - reference).abs().max()
    model = _load(d, backend, dtype=dtype)
    assert model.layers[0].qkv.weight.dtype == dtype and model.head.weight.dtype == torch.float32
    got = _scores(model, ids)
    assert got.dtype == torch.float32
    assert (got - reference).abs().max() <= 2 * hf_error + 0.01


# The interpreted triton kernels cost seconds a forward: fewer, shorter sequences there.
@pytest.mark.parametrize(("kind", "backend", "n_seqs", "max_len"),
                         [("gqa", "sdpa", 24, 100), ("mqa", "sdpa", 24, 100), ("gqa", "triton", 3, 40)])
def test_batch_invariance(kind, backend, n_seqs, max_len, tiny):
    """A sequence scores the same alone as packed with others (and in another bucket of sdpa)."""
    _skip_without_kernels(backend)
    model = _load(tiny[kind][0], backend)
    lengths = torch.randint(1, max_len + 1, (n_seqs,), generator=torch.Generator().manual_seed(3)).tolist()
    ids = _random_ids(lengths, seed=4)
    packed = _scores(model, ids)
    alone = torch.cat([_scores(model, [x]) for x in ids])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_longest_sequence_uses_last_position(tiny):
    d, hf = tiny["gqa"]  # max_position_embeddings 128: positions 0..127
    ids = _random_ids([128, 3], seed=5)
    torch.testing.assert_close(_scores(_load(d), ids), _hf_scores(hf, ids), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="max_seqlen 129 exceeds"):
        _load(d)(torch.ones(129, dtype=torch.long), torch.tensor([0, 129], dtype=torch.int32), 129)


def test_position_ids_restart_per_sequence():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert PackedQwen3Reranker.position_ids(cu, 9).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


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
def test_inconsistent_cu_seqlens_is_refused_on_the_host(backend, cu, max_seqlen, match, tiny):
    # Checked once per forward on the host copy, before anything is launched, for both backends.
    model = _load(tiny["gqa"][0], backend)
    device = next(model.parameters()).device
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        model(torch.full((6,), 5, device=device), torch.tensor(cu, dtype=torch.int32), max_seqlen)


def test_empty_batch(tiny):
    out = _load(tiny["gqa"][0])(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32), 0)
    assert out.shape == (0,) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Shared prompt heads: forward_shared runs each prefix once
# ----------------------------------------------------------------------------------------------


def _skip_without_prefix_kernel(backend: str) -> None:
    _skip_without_kernels(backend)
    from triton_rerank import kernels

    if backend == "triton" and "prefix_starts" not in inspect.signature(kernels.varlen_attention).parameters:
        pytest.skip("varlen_attention has no prefix_starts / prefix_lens yet")


def _shared_case(prefix_lens: list[int], own_lens: list[int], seed: int, same_own: bool = False):
    """(prefixes, own token lists) of random tokens; same_own: every sequence's own tokens alike."""
    prefixes, owns = _random_ids(prefix_lens, seed), _random_ids(own_lens, seed + 100)
    return prefixes, [owns[0]] * len(owns) if same_own else owns


def _joined(prefixes, owns, groups: list[int]) -> list[torch.Tensor]:
    return [torch.cat([prefixes[g], x]) for g, x in zip(groups, owns, strict=True)]


def _shared_scores(model: PackedQwen3Reranker, prefixes, owns, groups: list[int]) -> torch.Tensor:
    prefix_ids, prefix_cu, max_prefix = _pack(prefixes)
    ids, cu, max_seqlen = _pack(owns)
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model.forward_shared(prefix_ids.to(device), prefix_cu, ids.to(device), cu, torch.tensor(groups),
                                    max_seqlen, max_prefix).cpu()


# name: (prefix lengths, own lengths, group of each sequence, every own sequence alike)
SHARED_CASES = {
    "one-group": ([23], [14, 1, 60, 7, 33, 2, 19, 48, 5, 90, 11, 26], [0] * 12, False),
    # 40 + 88 = 128 tokens: the model's last position.
    "prefixes-1-5-40": ([1, 5, 40], [1, 7, 33, 2, 60, 1, 12, 88], [2, 0, 1, 2, 0, 1, 2, 2], False),
    "own-length-1": ([9, 30, 2], [1] * 7, [0, 1, 1, 2, 0, 1, 0], False),
    "identical-own-tokens": ([17, 17], [13] * 5, [0, 0, 1, 1, 0], True),
    "single-sequence-groups": ([6, 50, 3], [20, 5, 41, 9], [1, 0, 1, 2], False),
    # Interpreted triton costs seconds a forward: short, but the 40-token prefix spans two key blocks.
    "triton": ([1, 5, 40], [1, 3, 9, 2, 1], [2, 0, 2, 1, 1], False),
}


@pytest.mark.parametrize(
    ("kind", "backend", "case"),
    [("gqa", "sdpa", case) for case in SHARED_CASES if case != "triton"]
    + [("mqa", "sdpa", "prefixes-1-5-40"), ("mha", "sdpa", "prefixes-1-5-40"),
       ("gqa", "triton", "triton")],
)
def test_shared_prefix_equals_the_full_sequences(kind, backend, case, tiny):
    """forward_shared == forward on prefix[groups[i]] + own[i], fp32 within 1e-5."""
    _skip_without_prefix_kernel(backend)
    prefix_lens, own_lens, groups, same_own = SHARED_CASES[case]
    prefixes, owns = _shared_case(prefix_lens, own_lens, seed=10, same_own=same_own)
    model = _load(tiny[kind][0], backend)
    got = _shared_scores(model, prefixes, owns, groups)
    want = _scores(model, _joined(prefixes, owns, groups))
    assert got.dtype == torch.float32 and got.shape == (len(owns),)
    assert want.std() > 0.1  # sequences score apart: the test would be vacuous otherwise
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if same_own:  # alike documents behind one prefix score alike (up to summation order), behind others not
        by_group = [got[torch.tensor(groups) == g] for g in range(len(prefixes))]
        for scores in by_group:
            torch.testing.assert_close(scores, scores[:1].expand_as(scores), atol=1e-5, rtol=0)
        assert (by_group[0][0] - by_group[1][0]).abs() > 0.01


def test_shared_prefix_matches_transformers(tiny):
    d, hf = tiny["gqa"]
    prefix_lens, own_lens, groups, _ = SHARED_CASES["prefixes-1-5-40"]
    prefixes, owns = _shared_case(prefix_lens, own_lens, seed=11)
    want = _hf_scores(hf, _joined(prefixes, owns, groups))
    torch.testing.assert_close(_shared_scores(_load(d), prefixes, owns, groups), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "backend", ["sdpa", pytest.param("triton", marks=pytest.mark.skipif(not GPU, reason="half precision kernels on GPU"))]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_prefix_half_precision_error_within_twice_the_plain_forward(dtype, backend, tiny):
    _skip_without_prefix_kernel(backend)
    d = tiny["gqa"][0]
    prefix_lens, own_lens, groups, _ = SHARED_CASES["prefixes-1-5-40"]
    prefixes, owns = _shared_case(prefix_lens, own_lens, seed=12)
    joined = _joined(prefixes, owns, groups)
    reference = _scores(_load(d, backend), joined)
    model = _load(d, backend, dtype=dtype)
    plain_error = (_scores(model, joined) - reference).abs().max()
    shared_error = (_shared_scores(model, prefixes, owns, groups) - reference).abs().max()
    assert shared_error <= 2 * plain_error + 2e-3


# sdpa: three groups, sequences of every bucket; interpreted triton: fewer, shorter.
@pytest.mark.parametrize(("backend", "prefix_lens", "n_seqs", "max_len"),
                         [("sdpa", [4, 19, 37], 18, 80), ("triton", [3, 37], 4, 12)])
def test_shared_prefix_batch_invariance(backend, prefix_lens, n_seqs, max_len, tiny):
    """A sequence scores the same with its group alone, or alone with its prefix, as in a bigger call."""
    _skip_without_prefix_kernel(backend)
    model = _load(tiny["gqa"][0], backend)
    g = torch.Generator().manual_seed(13)
    own_lens = torch.randint(1, max_len + 1, (n_seqs,), generator=g).tolist()
    groups = torch.randint(0, len(prefix_lens), (n_seqs,), generator=g).tolist()
    prefixes, owns = _shared_case(prefix_lens, own_lens, seed=14)
    together = _shared_scores(model, prefixes, owns, groups)
    for k, prefix in enumerate(prefixes):
        members = [i for i, gi in enumerate(groups) if gi == k]
        alone = _shared_scores(model, [prefix], [owns[i] for i in members], [0] * len(members))
        torch.testing.assert_close(together[members], alone, atol=1e-5, rtol=0)
    first = _shared_scores(model, [prefixes[groups[0]]], owns[:1], [0])
    torch.testing.assert_close(together[:1], first, atol=1e-5, rtol=0)


_SHARED_INPUTS = dict(prefix_tokens=8, prefix_cu=[0, 3, 8], tokens=6, cu_seqlens=[0, 4, 6], groups=[1, 0], max_seqlen=4,
                      max_prefix=5)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"prefix_cu": [1, 3, 8]}, "prefix_cu must run from 0 to prefix_tokens = 8"),
        ({"prefix_cu": [0, 3, 7]}, "prefix_cu must run from 0 to prefix_tokens = 8"),
        ({"prefix_cu": [0, 3, 3, 8]}, "every prefix must have at least one token"),
        ({"prefix_cu": [0], "prefix_tokens": 0}, "at least one prefix"),
        ({"max_prefix": 4}, r"max_prefix = 4 is smaller than the longest prefix \(5\)"),
        ({"cu_seqlens": [0, 6, 6]}, "at least one token"),
        ({"cu_seqlens": [0, 4, 7]}, "from 0 to total_tokens"),
        ({"max_seqlen": 3}, "smaller than the longest sequence"),
        ({"groups": [2, 0]}, r"groups must name prefixes 0 \.\. 1, got 0 \.\. 2"),
        ({"groups": [1, -1]}, r"groups must name prefixes 0 \.\. 1, got -1 \.\. 1"),
        ({"groups": [1]}, "groups has 1 entries for 2 sequences"),
        ({"groups": torch.tensor([1.0, 0.0])}, "groups must be int32 or int64"),
        ({"max_seqlen": 129}, "max_seqlen 129 exceeds the model's limit of 128"),
        ({"max_prefix": 129}, "max_prefix 129 exceeds the model's limit of 128"),
        ({"input_ids": torch.full((1, 6), 5)}, "must be 1-D"),
        # Sequence 1: 100 prefix + 29 own tokens, one past the model's last position.
        ({"prefix_tokens": 103, "prefix_cu": [0, 3, 103], "max_prefix": 100, "tokens": 33, "cu_seqlens": [0, 4, 33],
          "groups": [0, 1], "max_seqlen": 29},
         r"sequence 1 has 100 prefix \+ 29 own tokens = 129, over the model's limit of 128"),
    ],
)
def test_shared_prefix_bad_inputs_are_refused(backend, change, match, tiny):
    """Checked on the host, before anything is launched, for both backends."""
    model = _load(tiny["gqa"][0], backend)
    device = next(model.parameters()).device
    a = {**_SHARED_INPUTS, **change}
    prefix_cu, cu = (torch.tensor(a[name], dtype=torch.int32) for name in ("prefix_cu", "cu_seqlens"))
    prefix_ids = torch.full((a["prefix_tokens"],), 5, device=device)
    ids = a.get("input_ids", torch.full((a["tokens"],), 5)).to(device)
    groups = a["groups"] if isinstance(a["groups"], torch.Tensor) else torch.tensor(a["groups"])
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        model.forward_shared(prefix_ids, prefix_cu, ids, cu, groups, a["max_seqlen"], a["max_prefix"])


def test_shared_prefix_empty_batch(tiny):
    model = _load(tiny["gqa"][0])
    out = model.forward_shared(torch.full((3,), 5), torch.tensor([0, 3], dtype=torch.int32),
                               torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32),
                               torch.zeros(0, dtype=torch.long), 0, 3)
    assert out.shape == (0,) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_loaded_model_state(tiny):
    d, hf = tiny["gqa"]
    model = _load(d)
    assert model.attention_backend == "sdpa"  # default off CUDA
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="attention_backend"):
        model.attention_backend = "hf"
    with pytest.raises(ValueError, match="attention_backend"):
        load_qwen3_reranker(d, label_token_ids=LABELS, attention_backend="hf")
    state = load_file(d / "model.safetensors")
    layer = "model.layers.1."
    # q, k, v and gate, up fused at load time, in that order.
    assert torch.equal(model.layers[1].qkv.weight, torch.cat(
        [state[f"{layer}self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert model.layers[1].qkv.weight.shape == ((4 + 2 * 2) * 32, 64)
    assert torch.equal(model.layers[1].gate_up.weight, torch.cat(
        [state[f"{layer}mlp.gate_proj.weight"], state[f"{layer}mlp.up_proj.weight"]]))
    # Only the two label rows of the LM head, yes then no.
    assert torch.equal(model.head.weight, state["lm_head.weight"][[YES, NO]])


def test_bfloat16_head_keeps_the_checkpoints_float32_values(tiny):
    d, _ = tiny["gqa"]
    model = _load(d, dtype=torch.bfloat16)
    state = load_file(d / "model.safetensors")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.head.weight, state["lm_head.weight"][[YES, NO]])
    assert torch.equal(model.head.norm.weight, state["model.norm.weight"])


def test_tied_embeddings_use_the_embedding_rows(tiny, tmp_path):
    d, _ = tiny["mqa"]
    state = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in state  # transformers does not save a tied head
    model = _load(d)
    assert torch.equal(model.head.weight, state["model.embed_tokens.weight"][[YES, NO]])
    # A tied checkpoint that carries the head anyway (some exporters write it) loads the same.
    copy_dir = _copy(d, tmp_path / "m")
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
              copy_dir / "model.safetensors")
    ids = _random_ids([9, 4], seed=6)
    assert torch.equal(_scores(_load(copy_dir), ids), _scores(model, ids))


def test_sharded_safetensors(tiny, tmp_path):
    d, hf = tiny["gqa"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    ids = _random_ids([10, 4], seed=7)
    assert torch.equal(_scores(_load(tmp_path / "sharded"), ids), _scores(_load(d), ids))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("kind", "edit", "match"),
    [
        ("gqa", lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"),
         r"missing .*model\.layers\.1\.self_attn\.k_norm\.weight"),
        ("gqa", lambda s: s.pop("lm_head.weight"), r"missing .*lm_head\.weight"),
        ("gqa", lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}),
         r"unexpected .*model\.layers\.0\.self_attn\.q_proj\.bias"),
        ("mqa", lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(97, 64)}),
         r"model\.layers\.1\.mlp\.gate_proj\.weight, model\.layers\.1\.mlp\.up_proj\.weight\) has shape"),
        ("gqa", lambda s: s.update({"model.norm.weight": torch.ones(65)}), r"model\.norm\.weight\) has shape"),
        ("gqa", lambda s: s.update({"lm_head.weight": torch.zeros(VOCAB - 1, 64)}), r"lm_head\.weight\) has shape"),
        ("mqa", lambda s: s.update({"model.embed_tokens.weight": torch.zeros(VOCAB, 32)}),
         r"model\.embed_tokens\.weight\) has shape"),
    ],
)
def test_strict_loading_names_the_tensor(kind, edit, match, tiny, tmp_path):
    d = _copy(tiny[kind][0], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        _load(d)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"num_key_value_heads": 3}, "not divisible by num_key_value_heads 3"),
    ],
)
def test_bad_config_is_rejected(change, match, tiny, tmp_path):
    d = _copy(tiny["gqa"][0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=match):
        _load(d)


def test_config_defaults_follow_transformers():
    from transformers import Qwen3Config

    minimal = dict(model_type="qwen3", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=64,
                   intermediate_size=8)
    ours = DecoderConfig.from_hf_dict(minimal)
    theirs = Qwen3Config(**{k: v for k, v in minimal.items() if k != "model_type"})
    assert (ours.head_dim, ours.num_key_value_heads, ours.rope_theta, ours.rms_norm_eps, ours.tie_word_embeddings,
            ours.max_seqlen) == (theirs.head_dim, theirs.num_key_value_heads, theirs.rope_parameters["rope_theta"],
                                 theirs.rms_norm_eps, theirs.tie_word_embeddings, theirs.max_position_embeddings)
    assert DecoderConfig.from_hf_dict({**minimal, "num_key_value_heads": None}).num_key_value_heads == 64
    # A config.json of the model cards (top-level rope_theta) and one transformers 5 writes agree.
    assert DecoderConfig.from_hf_dict({**minimal, "rope_theta": 1e6}).rope_theta == 1e6
    assert DecoderConfig.from_hf_dict(
        {**minimal, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}).rope_theta == 1e6


def test_label_tokens_must_be_in_the_vocabulary(tiny):
    d, _ = tiny["gqa"]
    with pytest.raises(ValueError, match="'yes' id 300 is outside the vocabulary"):
        load_qwen3_reranker(d, label_token_ids=(VOCAB, NO))
    with pytest.raises(ValueError, match="must differ"):
        load_qwen3_reranker(d, label_token_ids=(YES, YES))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_qwen3_reranker(d)  # the tiny model has no tokenizer to name them


def test_label_tokens_absent_from_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"yes": 0, "maybe": 1}, unk_token="maybe")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no token 'no'"):
        label_token_ids(tmp_path)


# ----------------------------------------------------------------------------------------------
# The real Qwen3 tokenizer (shared data folder)
# ----------------------------------------------------------------------------------------------

PREFIX = ('<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the '
          'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QUERY = "what is a giant panda"
DOCUMENTS = ["The giant panda is a bear native to China.", "Python is a programming language.", "hi",
             "Bamboo forests in the mountains of Sichuan feed the panda.", "熊猫 🐼 eats bamboo",
             "A search engine ranks documents by relevance to a query."]


def _prompt(query: str, document: str) -> str:
    """Qwen3-Reranker's prompt for one (query, document) pair."""
    return f"{PREFIX}<Instruct>: {INSTRUCTION}\n<Query>: {query}\n<Document>: {document}{SUFFIX}"


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    """{tied: tiny Qwen3 reranker directory with the real tokenizer} (skips without the shared data)."""
    from triton_rerank.bench.random_model import QWEN3_TOKENIZER_FILE, make_test_decoder
    from triton_rerank.bench.workload import resolve_data_dir

    data = resolve_data_dir(None)
    if data is None or not (data / QWEN3_TOKENIZER_FILE).is_file():
        pytest.skip("the shared data folder with the Qwen3 tokenizer is not here")
    return {tied: make_test_decoder(tmp_path_factory.mktemp(f"qwen3-tied-{tied}"), tie_word_embeddings=tied)
            for tied in (False, True)}


@pytest.mark.parametrize("tied", [False, True])
def test_real_tokenizer_scores_match_the_reference_recipe(tied, qwen3_dirs):
    """Qwen3-Reranker's own recipe (AutoTokenizer, left padding, logits[:, -1]) on the same weights."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = qwen3_dirs[tied]
    assert label_token_ids(d) == (9693, 2152)
    model = load_qwen3_reranker(d)  # label ids from the directory's tokenizer.json
    assert model.label_token_ids == (9693, 2152)
    prompts = [_prompt(QUERY, doc) for doc in DOCUMENTS]
    ids = [torch.tensor(e.ids) for e in Tokenizer.from_file(str(d / "tokenizer.json")).encode_batch(prompts)]
    got = _scores(model, ids)

    tokenizer = AutoTokenizer.from_pretrained(d)
    assert tokenizer.padding_side == "left"
    hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert [row[row != tokenizer.pad_token_id].tolist() for row in batch["input_ids"]] == [x.tolist() for x in ids]
    with torch.inference_mode():
        logits = hf(**batch, logits_to_keep=1).logits[:, -1]
    want = logits[:, 9693] - logits[:, 2152]
    assert want.std() > 0.3  # documents score apart
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
